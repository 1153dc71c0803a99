"""The benchmark harness on tiny configs: runs, writes a valid record, refuses to time
cases whose outputs differ. No timing is asserted."""

import json
import sys
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit import benchtools

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
pytest.importorskip("peft")


def test_interleave_and_ratios():
    calls = []
    samples = benchtools.interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rotated rounds
    assert all(len(s) == 3 for s in samples.values())
    assert benchtools.median_ratio({"a": [2.0, 4.0, 9.0], "b": [1.0, 1.0, 3.0]}, "a", "b") == 3.0


def test_check_close_refuses_different_outputs():
    benchtools.check_close(torch.ones(3), torch.ones(3), "same")
    with pytest.raises(benchtools.BenchmarkMismatch, match="x vs y: outputs differ .* refusing to report timings"):
        benchtools.check_close(torch.ones(3), torch.zeros(3), "x vs y")


def test_train_step_writes_a_record(tmp_path):
    import train_step

    results = train_step.run(["tiny"], [0.1], ["fp32"], repeats=1, batch=2, seq=8, out_dir=str(tmp_path))
    record = json.loads((tmp_path / "train_step.json").read_text())
    assert record["environment"]["versions"]["torch"] and record["environment"]["threads"] >= 1
    key = "tiny/dropout=0.1/fp32"
    assert set(record["results"][key]["cases"]) == {"lorakit", "lorakit_fast", "peft", "full", "trainer_bf16"}
    assert record["results"][key]["ratios"]["lorakit/peft"] == results[key]["ratios"]["lorakit/peft"] > 0


def test_train_step_refuses_when_lorakit_and_peft_differ(tmp_path, monkeypatch):
    import train_step

    real = train_step.lora_pair

    def broken(base, r, dropout):
        ours, theirs = real(base, r, dropout)
        with torch.no_grad():
            for _, p in lorakit.lora_parameters(ours):
                p.add_(0.5)
        return ours, theirs

    monkeypatch.setattr(train_step, "lora_pair", broken)
    with pytest.raises(benchtools.BenchmarkMismatch, match="lorakit vs PEFT logits"):
        train_step.run(["tiny"], [0.0], ["fp32"], repeats=1, batch=2, seq=8, out_dir=str(tmp_path))
    assert not (tmp_path / "train_step.json").exists()


def test_mixed_batch_bench_checks_peft_and_writes_throughputs(tmp_path):
    import mixed

    results = mixed.run([1, 3], repeats=1, rows=6, seq=5, loaded=5, out_dir=str(tmp_path), model="tiny")
    assert set(results["rows_per_second"]) == {"single", "peft_single", "rows_1", "peft_rows_1", "rows_3", "peft_rows_3",
                                               "rows_3_of_5"}
    assert results["throughput_ratios"]["rows_3/peft_rows_3"] > 0
    assert json.loads((tmp_path / "mixed.json").read_text())["results"]["throughput_ratios"] == results["throughput_ratios"]


def test_latency_scaling_memory_and_report(tmp_path):
    import latency
    import memory
    import report
    import scaling

    latency.run("tiny", [1], repeats=1, seq=8, out_dir=str(tmp_path))
    scaling.run("tiny", [1, 8], [8], [1, 2], repeats=1, out_dir=str(tmp_path))
    memory.run("tiny", steps=1, batch=2, seq=8, out_dir=str(tmp_path), jobs=2)
    text = report.build(tmp_path)
    for title in ("Inference latency", "Scaling with rank", "Peak memory"):
        assert f"## {title}" in text
    assert "| batch=1 | lorakit_merged |" in text


def test_serve_load_test_runs_both_servers_without_failures(tiny_model, tmp_path):
    import serve

    results = serve.run(model=tiny_model, adapters=3, concurrency=(2,), seconds=0.5, rounds=1, out_dir=str(tmp_path))
    cases = results["clients_2"]["cases"]
    assert set(cases) == {"one", "spread", "spread_nobatch"}
    assert all(c["failed"] == 0 and c["rows_per_s"] > 0 for c in cases.values())
    assert json.loads((tmp_path / "serve.json").read_text())["results"]["clients_2"]["ratios"] == results["clients_2"]["ratios"]


def test_generation_load_test_runs_its_servers_and_the_peft_comparison(tiny_llama, tmp_path, monkeypatch):
    import report
    import serve_gen
    from llama_build import build_key

    monkeypatch.setattr(serve_gen, "find_llama_server", lambda given: None)  # no llama.cpp in CI
    started, real_servers = [], serve_gen.servers

    def servers(model, paths, *flag_sets):
        started.extend(flag_sets)
        return real_servers(model, paths, *flag_sets)

    monkeypatch.setattr(serve_gen, "servers", servers)
    results = serve_gen.run(model=tiny_llama, adapters=3, concurrency=(2,), seconds=1, rounds=1, max_tokens=4,
                            precision="fp32", quantize=["int4"], out_dir=str(tmp_path))
    cases = results["clients_2"]["cases"]
    assert set(cases) == {"spread", "one", "nobatch", "int4"}
    assert started[-1][-2:] == ("--quantize", "int4") and not any("--quantize" in f for f in started[:-1])
    assert {"int4/spread", "spread/one"} <= set(results["clients_2"]["ratios"])
    assert all(c["failed"] == 0 and c["tokens_per_s"] > 0 for c in cases.values())
    # (a completion's per-token time needs one finished within the window: on a loaded machine a case may have none)
    assert all(c["per_token_p50_ms"] > 0 for c in cases.values() if c["completions"])
    assert any(c["completions"] for c in cases.values())
    assert results["offline"]["identical_completions"] == 3  # fp32, tiny model: the same greedy tokens as PEFT
    assert all(c["ms_per_token"] > 0 for c in results["offline"]["cases"].values())
    config = json.loads((tmp_path / "serve_gen.json").read_text())["config"]
    assert config["quantize"] == ["int4"] and config["llama_server_build"] is None
    assert config["cpu_build_key"] == build_key(lorakit.precision.cpu_flags())
    text = report.build(tmp_path)
    assert "| 2 | spread |" in text and "| 2 | int4 |" in text and "ms per token" in text


def test_prefix_cache_bench_times_both_servers_and_checks_their_text(tiny_llama, tmp_path):
    import prefix_cache
    import report

    results = prefix_cache.run(model=tiny_llama, adapter_counts=(1, 2), clients=2, seconds=1, rounds=1, max_tokens=4,
                               precision="fp32", check=2, system=prefix_cache.SYSTEM[:400], out_dir=str(tmp_path))
    assert results["identical_completions"] == 2
    for a in (1, 2):
        v = results[f"adapters_{a}"]
        assert set(v["cases"]) == {"on", "off"} and set(v["ratios"]) == {"ttft_p50 off/on", "tokens/s on/off"}
        assert all(c["failed"] == 0 and c["tokens_per_s"] > 0 for c in v["cases"].values())
        assert 0 < v["hit_rate"] < 1  # the on server read the shared system prompt from its cache
    config = json.loads((tmp_path / "prefix_cache.json").read_text())["config"]
    assert config["system_tokens"] > 2 * 16 and isinstance(config["cpu_flags"], list)
    text = report.build(tmp_path)
    assert "| 2 | on |" in text and "| 2 | off |" in text and "| adapters | TTFT p50 off / on |" in text


def test_serve_gen_command_line_passes_quantize_and_the_binary_on(tmp_path, monkeypatch):
    import serve_gen

    calls = []
    monkeypatch.setattr(serve_gen, "run", lambda **kw: calls.append(kw))
    binary = tmp_path / "llama-server"
    binary.write_text("")
    serve_gen.main(["--quick", "--quantize", "int8", "--quantize", "int4", "--llama-server", str(binary)])
    assert calls[-1]["quantize"] == ["int8", "int4"] and calls[-1]["llama_binary"] == str(binary)
    assert calls[-1]["compile"] is False
    serve_gen.main(["--compile"])
    assert calls[-1]["quantize"] is None and calls[-1]["compile"] is True  # run's default: int8 and int4
    with pytest.raises(SystemExit):
        serve_gen.main(["--quantize", "fp8"])


def test_generation_load_test_sends_again_where_a_kept_alive_connection_was_closed_unanswered():
    # llama-server closes its connection after each streamed completion while announcing keep-alive; curl sends the
    # next request again on a fresh connection, and so must the load test, instead of counting a failure
    import asyncio
    import socketserver
    import threading

    import serve_gen

    class Server(socketserver.StreamRequestHandler):
        def handle(self):
            answered = False
            while head := self.request_head():
                length = next(int(h.split(b":")[1]) for h in head if h.lower().startswith(b"content-length"))
                self.rfile.read(length)
                if answered:
                    return  # the next request on this connection: closed without a response
                events = [b'data: {"choices": [{"text": "x"}]}\n\n'] * 4 + [b"data: [DONE]\n\n"]
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                                 b"Keep-Alive: timeout=5, max=100\r\n\r\n"
                                 + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n")
                answered = True

        def request_head(self) -> list[bytes]:  # [] once the client has closed the connection
            head = []
            while (line := self.rfile.readline()) not in (b"\r\n", b""):
                head.append(line)
            return head if line else []

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Server) as httpd:
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        result = asyncio.run(serve_gen.load(url, 1, 1.0, ["p"], lambda i: {"model": "base"}, 4))
        httpd.shutdown()
    assert result["failed"] == 0 and result["resent"] >= 1 and result["completions"] >= 1 and result["tokens"] >= 4


def test_llamacpp_lora_names_each_adapter_by_its_lora_position_and_checks_it_against_lorakit(monkeypatch):
    # llama-server's adapter ids are positions among its --lora files; a request with no (or an empty) `lora` list gets
    # every adapter at its start-up scale 1, so the base is asked for with a listed adapter at scale 0
    import httpx

    import serve_gen

    cmd = serve_gen.llama_server_command("llama-server", Path("m.gguf"), 8080, 4, 256, 2, [Path("a0.gguf"), Path("a1.gguf")])
    assert [cmd[i + 1] for i, x in enumerate(cmd) if x == "--lora"] == ["a0.gguf", "a1.gguf"]
    assert "--lora-init-without-apply" in cmd and cmd[cmd.index("-np") + 1] == "4"
    plain = serve_gen.llama_server_command("llama-server", Path("m.gguf"), 8080, 4, 256, 2)
    assert not {"--lora", "--lora-init-without-apply"} & set(plain)
    assert serve_gen.lora_fields(33, 32) == {"model": "base", "lora": [{"id": 1, "scale": 1.0}], "cache_prompt": False}

    sent = []

    async def complete_all(url, bodies):  # lorakit: a0, a2 change the text; llama.cpp: a3 is wrong, one base differs
        sent.extend((url, b) for b in bodies)
        if url != "llama":
            k = [int(b["model"][1:]) if b["model"] != "smol" else None for b in bodies]
            texts = ["base" if i is None or i % 2 else f"a{i}" for i in k]
            if url == "int4":
                texts = [t.replace("a2", "z") for t in texts]
        else:
            lora = [b["lora"][0] for b in bodies]
            texts = [(f"a{x['id']}" if x["id"] < 3 else "x") if x["scale"] else ("b" if x["id"] == 3 else "base")
                     for x in lora]
        return [{"text": t, "prompt_tokens": 5} for t in texts]

    monkeypatch.setattr(serve_gen, "complete_all", complete_all)
    monkeypatch.setattr(httpx, "get", lambda url: httpx.Response(200, json={"data": [{"id": "smol"}, {"id": "a0"}]}))
    check = serve_gen.check_lora_anchor({"spread": "ours", "int4": "int4"}, "llama", ["p0", "p1", "p2", "p3", "p4"], 4, 16)
    assert check["prompts"] == 4 and check["max_tokens"] == 16 and check["adapter_changes_llamacpp_text"] == 4
    assert check["against"]["spread"] == {"adapter_changes_lorakit_text": 2, "same_text_adapted": 2,
                                          "same_text_where_adapter_changes_lorakit": 2, "same_text_base": 3,
                                          "same_prompt_tokens": 4}
    assert check["against"]["int4"]["same_text_adapted"] == 1  # its a2 text differs from llama.cpp's
    to_llama = [b for url, b in sent if url == "llama"]
    assert len(to_llama) == 8 and all(len(b["lora"]) == 1 and b["cache_prompt"] is False for b in to_llama)
    assert [b["prompt"] for b in to_llama[:4]] == ["p0", "p1", "p2", "p3"]


def test_serve_gen_report_renders_the_llamacpp_lora_anchor_and_its_target(tmp_path):
    import report

    case = {"tokens_per_s": 100.0, "ttft_p50_ms": 10, "ttft_p99_ms": 20, "per_token_p50_ms": 5, "per_token_p99_ms": 9,
            "failed": 0}
    against = {"adapter_changes_lorakit_text": 27, "same_text_adapted": 17, "same_text_where_adapter_changes_lorakit": 13,
               "same_text_base": 17, "same_prompt_tokens": 32}
    check = {"prompts": 32, "max_tokens": 16, "adapter_changes_llamacpp_text": 24,
             "against": {"spread": against, "int4": dict(against, same_text_adapted=25)}}
    offline = {"cases": {k: {"tokens_per_s": 1.0, "ms_per_token": 1.0} for k in ("lorakit", "peft")},
               "lorakit/peft tokens/s": 1.0, "identical_completions": 32}
    config = {"model": "smollm2", "adapters": 32, "r": 4, "max_tokens": 64, "precision": "auto", "seconds": 15,
              "rounds": 2, "cpu_flags": ["avx2"], "llama_server_build": "build-x", "llama_server_slots": 32}
    results = {"offline": offline, "llamacpp_lora_check": check,
               "clients_32": {"cases": {"spread": case, "llamacpp-lora": dict(case, tokens_per_s=40.0)},
                              "ratios": {"spread/llamacpp-lora": 2.5}}}
    benchtools.write_record("serve_gen", config, results, tmp_path)
    text = report.build(tmp_path)
    assert "| 32 | llamacpp-lora | 40.0 |" in text
    assert "llama-server, 32 slots (as `llamacpp`), with the 32 adapters exported by `lorakit export gguf`" in text
    assert ("the adapter changes 24 / 32 of llama.cpp's texts; llama.cpp's text is lorakit's on `spread`: 17 / 32 with "
            "the adapter (13 of the 27 its adapter changes), 17 / 32 base alone; `int4`: 25 / 32 with the adapter") in text
    assert "llama.cpp with the same adapters exported (llamacpp-lora) | >= 2.00 | 2.500 | yes |" in text


AVX2 = {"sse4_2", "avx", "avx2", "bmi2", "fma", "f16c"}
SKYLAKE_X = AVX2 | {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512_vnni"}
ZEN4 = SKYLAKE_X | {"avx512vbmi", "avx512_bf16"}


def test_llama_build_key_and_options_follow_the_flags_that_pick_kernels(tmp_path):
    import subprocess

    import llama_build

    keys = {llama_build.build_key(f) for f in (AVX2, SKYLAKE_X, ZEN4, ZEN4 | {"amx_tile", "amx_int8", "amx_bf16"})}
    assert len(keys) == 4 and llama_build.build_key(AVX2).startswith("build-avx2-")
    assert llama_build.build_key(ZEN4).startswith("build-avx512-")
    assert llama_build.build_key(ZEN4 | {"hypervisor", "sse", "rdrand"}) == llama_build.build_key(ZEN4)  # flags ggml ignores
    options = set(llama_build.cmake_options(AVX2))
    assert {"-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_AVX512=OFF", "-DGGML_AVX512_BF16=OFF"} <= options
    options = set(llama_build.cmake_options(SKYLAKE_X))  # AVX-512 without VBMI / BF16: those stay off
    assert {"-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_VBMI=OFF", "-DGGML_AVX512_BF16=OFF"} <= options
    assert "-DGGML_AMX_INT8=OFF" in llama_build.cmake_options(ZEN4 | {"amx_tile", "amx_int8", "amx_bf16"})
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx2 fma\n")
    assert llama_build.cpu_flags(str(cpuinfo)) == {"fpu", "avx2", "fma"}
    # the build script names its folder with this key: the same as the benchmark computes from lorakit's flags
    script = Path(llama_build.__file__)
    printed = subprocess.run([sys.executable, str(script), "key"], capture_output=True, text=True, check=True).stdout
    assert printed.strip() == llama_build.build_key(lorakit.precision.cpu_flags())


def test_serve_gen_takes_only_a_llama_server_built_for_this_cpu(tmp_path, monkeypatch):
    import llama_build
    import serve_gen

    monkeypatch.setattr(serve_gen, "ROOT", tmp_path)
    monkeypatch.delenv("LLAMA_SERVER", raising=False)
    zen4 = tmp_path / "runs/llamacpp-src/v/vendor/llama.cpp" / llama_build.build_key(ZEN4) / "bin/llama-server"
    zen4.parent.mkdir(parents=True)
    zen4.write_text("")
    assert serve_gen.find_llama_server(None, ZEN4) == str(zen4)  # found by this CPU's key
    assert serve_gen.find_llama_server(None, AVX2) is None  # no build for an AVX2 CPU here
    with pytest.raises(ValueError, match=r"built for build-avx512-\w+, but this CPU is build-avx2-\w+ .* run "
                                         r"bench/build_llama_server.sh on this machine"):
        serve_gen.find_llama_server(str(zen4), AVX2)
    monkeypatch.setenv("LLAMA_SERVER", str(zen4))
    with pytest.raises(ValueError, match="built for build-avx512"):
        serve_gen.find_llama_server(None, AVX2)
    elsewhere = tmp_path / "llama-server"  # not built by the script: its build cannot be checked
    elsewhere.write_text("")
    assert serve_gen.find_llama_server(str(elsewhere), AVX2) == str(elsewhere)
    with pytest.raises(ValueError, match="is not a file"):
        serve_gen.find_llama_server(str(tmp_path / "missing"), AVX2)
    monkeypatch.setattr(serve_gen, "cpu_flags", lambda: frozenset(AVX2))
    monkeypatch.setattr(serve_gen, "run", lambda **kw: pytest.fail("ran with a binary built for another CPU"))
    with pytest.raises(SystemExit, match=r"^serve_gen.py: llama-server .* was built for build-avx512-[^\n]*$"):
        serve_gen.main(["--quick", "--llama-server", str(zen4)])


def test_padding_bench_runs_both_variants_and_reports(tiny_model, tmp_path):
    import padding
    import report

    results = padding.run(tiny_model, epochs=1, max_examples=40, multiples=[1, 8], name="padding", out_dir=str(tmp_path))
    (longest,), (rounded,) = results["multiple=1"]["epochs"], results["multiple=8"]["epochs"]
    assert rounded["padded_tokens"] > longest["padded_tokens"] and rounded["padded_tokens"] % 8 == 0
    assert longest["rss_mb"] > 0 and results["multiple=8"]["epoch time / multiple=1"] > 0
    assert "| 8 | 1 |" in report.build(tmp_path)


def test_qlora_bench_checks_peft_on_the_same_nf4_model_and_reports(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    import qlora
    import report

    monkeypatch.setitem(qlora.SHAPES, "quick", (128, 1, 256, 256, 2, 2, True))
    model = qlora.build_model("quick", "nf4")
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert len(layers) == 7 and not any(p.is_meta for p in model.parameters())
    speed = qlora.run_speed("quick", repeats=1)
    assert speed["check"]["loss_abs_diff"] == 0.0 and set(speed["ratios"]) == {"lorakit/peft", "lorakit/fp32", "peft/fp32"}
    memory = {"quick": {c: {"build_s": 1.0, "loaded_rss_mb": 9.0, "peak_rss_mb": 10.0, "step_s": 1.0} for c in
                        ("lorakit", "peft", "fp32")}}
    memory["quick"]["ratios"] = {"lorakit/fp32 peak": 1.0, "lorakit/peft peak": 1.0}
    benchtools.write_record("qlora", {}, {"memory": memory, "speed": {"quick": speed}}, tmp_path)
    text = report.build(tmp_path)
    assert "## QLoRA: a LoRA step" in text and "| quick | lorakit | default | 1 | 9 | 10 | 1.0 |" in text
    capped = qlora.run_child("quick", "lorakit", "capped")  # its own process, the allocator as lorakit train sets it
    assert capped["allocator"] == "capped" and capped["peak_rss_mb"] > capped["loaded_rss_mb"] > 0

    def differ(ours, theirs, ids):  # PEFT not given lorakit's factors: the losses differ, nothing is timed
        with torch.no_grad():
            loss_a, loss_b = ours(input_ids=ids, labels=ids).loss, theirs(input_ids=ids, labels=ids).loss + 1
        benchtools.check_close(loss_a, loss_b, "lorakit vs PEFT loss on the same nf4 base")

    monkeypatch.setattr(qlora, "check_same_loss", differ)
    with pytest.raises(benchtools.BenchmarkMismatch, match="lorakit vs PEFT loss on the same nf4 base"):
        qlora.run_speed("quick", repeats=1)


def test_dora_bench_checks_peft_and_writes_its_ratios(tmp_path, monkeypatch):
    import dora
    import report

    results = dora.run(dora.TINY, repeats=1, dropout=0.0, name="dora", label="tiny", out_dir=str(tmp_path))
    assert set(results) == {"q_proj,v_proj", "all-linear"}
    for v in results.values():
        assert set(v["cases"]) == set(dora.CASES) and v["ratios"]["lorakit_dora/lorakit_lora"] > 0
        assert v["check"]["dora"]["trainable_tensors"] == 1.5 * v["check"]["lora"]["trainable_tensors"]  # + magnitudes
    assert "| all-linear |" in report.build(tmp_path)

    real = dora.lorakit_model

    def broken(base, theirs):
        ours = real(base, theirs)
        with torch.no_grad():
            for name, p in lorakit.lora_parameters(ours):
                if "magnitude" in name:
                    p.mul_(1.5)
        return ours

    monkeypatch.setattr(dora, "lorakit_model", broken)
    with pytest.raises(benchtools.BenchmarkMismatch, match="lorakit vs PEFT dora: loss"):
        dora.run(dora.TINY, repeats=1, dropout=0.0, name="broken", label="tiny", out_dir=str(tmp_path))
    assert not (tmp_path / "broken.json").exists()


def test_no_bench_script_shadows_a_module_a_library_imports():
    # bitsandbytes' CPU backend runs `from kernels import get_kernel` (the `kernels` package on PyPI); with bench/ on
    # sys.path, as in every bench script and here, a bench/kernels.py would be imported in its place
    import importlib.util

    spec = importlib.util.find_spec("kernels")
    assert spec is None or Path(__file__).resolve().parents[1] / "bench" not in Path(spec.origin).resolve().parents


def test_kernels_bench_checks_every_candidate_and_reports(tmp_path, monkeypatch):
    import argparse

    import quant_kernels as bench_kernels
    import report
    from lorakit.quant import kernels

    monkeypatch.setattr(bench_kernels, "SHAPES", {"tiny 48x64": (48, 64)})
    monkeypatch.setattr(bench_kernels, "LAYER", [(48, 64), (64, 64)])
    monkeypatch.setattr(bench_kernels, "VOCAB", 96)
    monkeypatch.setattr(bench_kernels, "HIDDEN", 64)
    args = argparse.Namespace(quick=True, rows=[1, 3], threads=[1], step_threads=[1], step_rows=[1, 3], repeats=1)
    isas = ["avx2"]
    matrices = bench_kernels.time_matrices(args, isas)
    cases = {m["case"] for m in matrices}
    assert {"fp32", "int8pack (bf16 x)", "int4pack", "fbgemm dynamic int8", "q8_0@avx2", "q4_1@avx2", "q4_0@avx2",
            "q4_1@avx2 (int8 x)"} <= cases
    assert all(m["ms"] > 0 and m["rel_err"] < 0.2 for m in matrices)
    step = bench_kernels.time_decode_step(args, isas)
    assert step["matrices"] == 2 * 2 + 1
    assert step["cases"]["q4_1@avx2 rows=3 t=1"]["weight_bytes"] == (2 * (48 + 64) + 96) * 64 * 20 // 32
    step_cases = {(c["case"], c["rows"]) for c in step["cases"].values()}
    assert {("fp32", 3), ("q4_1@avx2", 3), ("fbgemm dynamic int8", 3), ("int4pack (bf16 x)", 1)} <= step_cases
    assert ("int4pack (bf16 x)", 3) not in step_cases  # the stock bf16 kernels at 1 row only
    benchtools.write_record("kernels", {}, {"matrices": matrices, "decode_step": step}, tmp_path)
    text = report.build(tmp_path)
    assert "## Weight-only quantized linear kernels" in text and "| tiny 48x64 | 3 | 1 |" in text
    assert "\n| 3 | 1 | " in text  # the decode step's row for 3 rows, 1 thread
    assert "`python bench/quant_kernels.py`" in text

    real = kernels.linear
    monkeypatch.setattr(bench_kernels.kernels, "linear",
                        lambda x, q, bias=None, isa=None, act=None: real(x, q, bias, isa, act) + 1e-2)
    with pytest.raises(benchtools.BenchmarkMismatch, match="q8_0@avx2: outputs differ"):
        bench_kernels.time_matrices(args, isas)


def test_decode_step_bench_counts_the_bytes_each_format_reads_and_reports(tiny_llama, tmp_path):
    """The floor's bytes follow the formats' block sizes (q4_1: 20 bytes per 32 weights, its LM head q8_0: 34,
    layers whose input is not a multiple of 32 stay float32), plus the stream's adapter and one embedding row."""
    import decode_step
    import report

    fmts = [f for f in decode_step.formats() if f in ("fp32", "q4_1")]
    fmts += ["q4_1 unfused"] if "q4_1" in fmts else []  # (q/k/v and gate/up apart: the same bytes)
    results = decode_step.run(tiny_llama, repeats=1, steps=2, mb=4, fmts=fmts)
    _, model = lorakit.tasks.lm.load_causal_lm(tiny_llama)
    linears = {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for fmt in fmts:
        def nbytes(name, shape, fmt=fmt):
            out, inp = shape
            if fmt == "fp32" or inp % 32:
                return 4 * out * inp
            return out * inp // 32 * (34 if name == "lm_head" else 20)
        counted = results["formats"][fmt]["weight_bytes"]
        assert counted["linear"] == sum(nbytes(n, s) for n, s in linears.items()), fmt
        assert counted["adapter"] == 4 * 4 * sum(s[0] + s[1] for n, s in linears.items() if n.endswith(("q_proj", "v_proj")))
        assert counted["embedding_row"] == 4 * model.config.hidden_size
        assert results["formats"][fmt]["floor_ms"] > 0 and results["formats"][fmt]["ms_per_token"] > 0
    benchtools.write_record("decode_step", {"hardware": {"cpu_flags": ["avx2"]}}, results, tmp_path)
    text = report.build(tmp_path)
    assert "## Single-stream decoding against the weight-bandwidth floor" in text and "| fp32 |" in text


def test_engine_design_bench_checks_both_engines_and_reports(tiny_llama, tmp_path, monkeypatch):
    import engine_design
    import report

    monkeypatch.setattr(engine_design, "ROWS", (1, 3))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1000, 2000, (n,), generator=g).tolist() for n in (5, 9, 7)]
    results = {"fp32": engine_design.compare(tiny_llama, "fp32", prompts, repeats=1, steps=2)}
    assert results["fp32"]["3"]["token_agreement"] == 1.0
    benchtools.write_record("engine_design", {"hardware": {"cpu_flags": ["avx2", "avx512f"]}}, results, tmp_path)
    text = report.build(tmp_path)
    assert "## Decoding engines (#33)" in text and "CPU flags: avx2, avx512f." in text and "| fp32 | 3 |" in text


def _e2e_adapter(model: str, folder: Path) -> Path:
    """A random r=4 q/v adapter on ``model`` with the task.json of an E2E run (plain prompts)."""
    from transformers import AutoModelForCausalLM

    from helpers import randomize

    lm = lorakit.add_lora(AutoModelForCausalLM.from_pretrained(model), lorakit.LoraConfig(
        r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize(lm, std=0.3)
    lorakit.save_adapter(lm, folder)
    info = {"task": "e2e", "prompt_format": "plain", "prompt_separator": "\n", "model": model, "method": "lora"}
    (folder / "task.json").write_text(json.dumps(info))
    return folder


def test_quant_quality_bench_records_agreement_per_adapter_and_format(tiny_llama, tmp_path, monkeypatch):
    import quant_quality
    import report

    data = tmp_path / "e2e"
    data.mkdir()
    mrs = ["name[Aromi], eatType[pub]", "name[Cotto], food[Indian]", "name[Zizzi], area[riverside]"]
    (data / "testset_w_refs.csv").write_text("mr,ref\n" + "".join(f'"{mr}","{ref} place."\n' for mr in mrs
                                                                  for ref in ("A", "A good")))
    adapter = _e2e_adapter(tiny_llama, tmp_path / "adapter")
    scores = iter([0.600, 0.597, 0.610])  # fp32, int8, int4: stands in for the beam search and the scorer
    monkeypatch.setattr(quant_quality, "bleu", lambda *args: {"BLEU": next(scores), "NIST": 1.0})
    results = quant_quality.run({"e2e-1500": str(adapter)}, data_dir=str(data), max_examples=3, max_new_tokens=5,
                                out_dir=str(tmp_path))
    record = json.loads((tmp_path / "quant_quality.json").read_text())
    assert record["results"] == results and record["environment"]["cpu_flags"]
    r = results["adapters"]["e2e-1500"]
    fp32 = r["agreement"]["fp32"]
    assert r["mrs"] == 3 and set(r["agreement"]) == {"fp32", "int8", "int4"}
    assert 3 * 5 >= fp32["tokens"] >= 3  # each completion: up to 5 tokens, then EOS if it stopped before
    assert fp32 == {"top1": 1.0, "matches": fp32["tokens"], "tokens": fp32["tokens"], "mrs_all_agree": 3}
    for fmt in ("int8", "int4"):
        a = r["agreement"][fmt]
        assert a["tokens"] == fp32["tokens"] and a["top1"] == a["matches"] / a["tokens"]
    assert r["bleu_diff_points"] == pytest.approx({"int8": -0.3, "int4": 1.0})
    assert r["bleu_abs_diff_points"] == pytest.approx({"int8": 0.3, "int4": 1.0})
    text = report.build(tmp_path)
    assert "## Quality of quantized decoding" in text and "| e2e-1500 | int4 |" in text
    assert "| int4 decoding, e2e-1500 adapter: E2E BLEU (beam 10, 100 MRs) - fp32's, absolute, points | <= 0.50 | 1.000 | **no** |" in text

    real = quant_quality.quantized

    def damaged(model, fmt):  # the LM head's codes negated: the quantized model's top-1 is fp32's bottom-1
        out = real(model, fmt)
        out.get_output_embeddings().q.neg_()
        return out

    monkeypatch.setattr(quant_quality, "quantized", damaged)
    broken = quant_quality.run({"tiny": str(adapter)}, data_dir=str(data), max_examples=3, max_new_tokens=5,
                               bleu_adapters=[], name="broken", out_dir=str(tmp_path))["adapters"]["tiny"]
    assert broken["agreement"]["fp32"]["top1"] == 1.0 and "bleu" not in broken
    assert broken["agreement"]["int8"]["top1"] < 0.5 and broken["agreement"]["int4"]["top1"] < 0.5


def test_cb_design_bench_compares_transformers_batching_with_the_scheduler_and_reports(tiny_llama, tmp_path):
    import cb_design
    import report

    results = cb_design.run(tiny_llama, repeats=1, new=3, rows=(1, 3))
    assert set(results) == {"1", "3"}
    for v in results.values():
        assert v["token_agreement"] == 1.0  # fp32, a tiny model: the same greedy tokens
        assert v["generated"] == [3] * min(4, len(v["generated"])) and v["cb_over_lorakit_time"] > 0
    benchtools.write_record("cb_design", {"threads": 1, "new_tokens": 3, "hardware": {"cpu_flags": ["avx2"]}}, results,
                            tmp_path)
    text = report.build(tmp_path)
    assert "transformers' own continuous batching" in text and "| 3 |" in text


def test_gguf_export_report_counts_same_texts_per_adapter_and_base(tmp_path):
    import report

    def case(same, margins):
        return {"adapter": {"same_text": same, "mrs": 20, "logit_margins": margins}, "base": {"same_text": 6, "mrs": 20}}

    from lorakit.benchtools import write_record

    write_record("gguf_export", {"max_examples": 20, "max_new_tokens": 64, "base_ggufs": {"q4_1": "a", "f32": "b"}},
                 {"e2e-1500": {"q4_1": case(15, [0.0223]), "f32": case(20, [])}}, tmp_path)
    text = report.build(tmp_path)
    assert "| e2e-1500 | q4_1 | 15 / 20 | 6 / 20 | 0.022 |" in text and "| e2e-1500 | f32 | 20 / 20 | 6 / 20 | — |" in text
    assert "exported e2e-1500 adapter: E2E MRs of 20 with lorakit's greedy text | >= 18.00 | 15.000 | **no** |" in text


E2E_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e"


@pytest.mark.skipif(not E2E_DATA.is_dir(), reason="../shared/data/e2e not present")
def test_packing_bench_times_the_same_rows_and_refuses_a_packing_that_changes_the_loss(tiny_llama, tmp_path,
                                                                                        monkeypatch):
    import packing as bench
    import report

    results = bench.run(tiny_llama, "tiny", rounds=1, precision="fp32", quick=True, name="packing", out_dir=str(tmp_path))
    for key in ("e2e", "mixed"):
        v = results[key]
        assert v["check"]["rows"] > 8 and v["sequences"] < v["rows"]
        assert v["batch_sizes"]["unpacked_matched"] * v["sequences"] == pytest.approx(v["batch_sizes"]["packed"] * v["rows"],
                                                                                     rel=0.2)
        assert all(r > 0 for r in v["ratios"].values())
        assert v["row_share_of_computed_tokens"]["packed"] > v["row_share_of_computed_tokens"]["unpacked"]
    assert "| e2e | 128 | 800 |" in report.build(tmp_path)

    real = bench.packer.pack

    def positions_run_on(split, max_length, seed):  # rows would see each other
        packed = real(split, max_length, seed)
        for f in packed.features:
            f["position_ids"] = list(range(len(f["input_ids"])))
        return packed

    monkeypatch.setattr(bench.packer, "pack", positions_run_on)
    with pytest.raises(benchtools.BenchmarkMismatch, match="packed vs unpacked loss"):
        bench.run(tiny_llama, "tiny", rounds=1, precision="fp32", quick=True, name="broken", out_dir=str(tmp_path))
    assert not (tmp_path / "broken.json").exists()
