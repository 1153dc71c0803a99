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
    memory.run("tiny", steps=1, batch=2, seq=8, out_dir=str(tmp_path))
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

    monkeypatch.setattr(serve_gen, "find_llama_server", lambda given: None)  # no llama.cpp in CI
    results = serve_gen.run(model=tiny_llama, adapters=3, concurrency=(2,), seconds=1, rounds=1, max_tokens=4,
                            precision="fp32", out_dir=str(tmp_path))
    cases = results["clients_2"]["cases"]
    assert set(cases) == {"spread", "one", "nobatch"}
    assert all(c["failed"] == 0 and c["tokens_per_s"] > 0 for c in cases.values())
    assert results["offline"]["identical_completions"] == 3  # fp32, tiny model: the same greedy tokens as PEFT
    assert "| 2 | spread |" in report.build(tmp_path)


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


def test_kernels_bench_checks_every_candidate_and_reports(tmp_path, monkeypatch):
    import argparse

    import kernels as bench_kernels
    import report
    from lorakit.quant import kernels

    monkeypatch.setattr(bench_kernels, "SHAPES", {"tiny 48x64": (48, 64)})
    monkeypatch.setattr(bench_kernels, "LAYER", [(48, 64), (64, 64)])
    monkeypatch.setattr(bench_kernels, "VOCAB", 96)
    monkeypatch.setattr(bench_kernels, "HIDDEN", 64)
    args = argparse.Namespace(quick=True, rows=[1, 3], threads=[1], step_threads=[1], repeats=1)
    isas = ["avx2"]
    matrices = bench_kernels.time_matrices(args, isas)
    cases = {m["case"] for m in matrices}
    assert {"fp32", "int8pack (bf16 x)", "int4pack", "fbgemm dynamic int8", "q8_0@avx2", "q4_1@avx2", "q4_0@avx2"} <= cases
    assert all(m["ms"] > 0 and m["rel_err"] < 0.2 for m in matrices)
    step = bench_kernels.time_decode_step(args, isas)
    assert step["matrices"] == 2 * 2 + 1 and step["cases"]["q4_1@avx2 t=1"]["weight_bytes"] == (2 * (48 + 64) + 96) * 64 * 20 // 32
    benchtools.write_record("kernels", {}, {"matrices": matrices, "decode_step": step}, tmp_path)
    text = report.build(tmp_path)
    assert "## Weight-only quantized linear kernels" in text and "| tiny 48x64 | 3 | 1 |" in text

    real = kernels.linear
    monkeypatch.setattr(bench_kernels.kernels, "linear", lambda x, q, bias=None, isa=None: real(x, q, bias, isa) + 1e-2)
    with pytest.raises(benchtools.BenchmarkMismatch, match="q8_0@avx2: outputs differ"):
        bench_kernels.time_matrices(args, isas)


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
