"""lorakit export gguf: llama.cpp's LoRA adapter GGUF, read back with gguf's own reader."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from helpers import randomize
from lorakit import cli, export
from lorakit.layers import LoraLinear

gguf = pytest.importorskip("gguf")


def _llama(lora: lorakit.LoraConfig, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config).eval()
    lorakit.add_lora(model, lora)
    randomize(model, 1, std=0.3)  # B != 0: a non-trivial adapter
    return model


def _gguf_order_undone(w: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' rows from llama.cpp's: within each head ``(i, half)`` -> ``(half, i)`` (what
    transformers' GGUF loader does to attn_q / attn_k)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def _read(path):
    reader = gguf.GGUFReader(path)
    fields = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    # GGUF lists dimensions innermost first; numpy's data is (outer, ..., inner), PEFT's (r, in) / (out, r)
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    return fields, tensors


@pytest.mark.parametrize("lora", [
    lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]),
    lorakit.LoraConfig(r=4, alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj"],
                       rank_pattern={"k_proj": 2}, alpha_pattern={"k_proj": 3.0}),
], ids=["plain", "rslora-patterns"])
def test_gguf_export_reads_back_as_llama_cpp_computes_the_adapter(lora, tmp_path):
    model = _llama(lora)
    lorakit.save_adapter(model, tmp_path / "adapter")
    out = export.export_gguf(tmp_path / "adapter", tmp_path / "a.gguf", model.config)
    fields, tensors = _read(out)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == pytest.approx(lora.alpha)
    heads = {"q_proj": 4, "k_proj": 2}
    short = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "down_proj": "ffn_down"}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert len(tensors) == 2 * len(layers)
    for name, layer in layers.items():
        block, leaf = name.split(".")[2], name.split(".")[-1]
        a, b = (tensors[f"blk.{block}.{short[leaf]}.weight.lora_{x}"] for x in "ab")
        assert a.dtype == torch.float32 and a.shape == layer.lora_A["default"].shape
        assert b.shape == layer.lora_B["default"].shape
        torch.testing.assert_close(a, layer.lora_A["default"])  # A as it is
        delta = fields["adapter.lora.alpha"] / a.shape[0] * (b @ a)  # llama.cpp's alpha / r_t, r_t from the tensor
        if leaf in heads:
            assert not torch.allclose(delta, layer.delta_weight("default"))  # the rows really are moved
            delta = _gguf_order_undone(delta, heads[leaf])
        torch.testing.assert_close(delta, layer.delta_weight("default"))


def test_qwen2_rows_are_not_permuted(tmp_path):
    model = _llama(lorakit.LoraConfig(r=2, alpha=2, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "adapter")
    model.config.model_type = "qwen2"  # same module names; llama.cpp's qwen2 GGUF keeps transformers' rows
    got = export.gguf_adapter_tensors(load_file(tmp_path / "adapter" / "adapter_model.safetensors"),
                                              lorakit.LoraConfig.load(tmp_path / "adapter"), model.config)
    layer = model.model.layers[1].self_attn.q_proj
    torch.testing.assert_close(torch.from_numpy(got["blk.1.attn_q.weight.lora_b"]), layer.lora_B["default"])


def _refused(tmp_path, lora, message, edit=None, tie=True):
    model = _llama(lora, tie=tie)
    lorakit.save_adapter(model, tmp_path / "adapter")
    if edit:
        edit(tmp_path / "adapter")
    with pytest.raises(ValueError, match=message):
        export.export_gguf(tmp_path / "adapter", tmp_path / "a.gguf", model.config)
    assert not (tmp_path / "a.gguf").exists()


def test_what_llama_cpp_cannot_take_is_refused_by_name(tmp_path):
    qv = lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    _refused(tmp_path / "1", lorakit.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]),
             r"'base_model\.model\.model\.embed_tokens\.lora_embedding_A'")
    _refused(tmp_path / "2", lorakit.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]),
             r"LoRA on 'lm_head': the base ties its LM head")
    _refused(tmp_path / "3", lorakit.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "use_dora=True")

    def add_saved_copy(folder):  # a PEFT modules_to_save entry: a whole trained copy of a layer
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["norm"]}))

    _refused(tmp_path / "4", qv, r"modules_to_save=\('norm',\)", add_saved_copy)

    def add_stray_key(folder):
        tensors = load_file(folder / "adapter_model.safetensors")
        save_file({**tensors, "base_model.model.model.norm.weight": torch.ones(64)}, folder / "adapter_model.safetensors")

    _refused(tmp_path / "5", qv, r"the adapter has 'base_model\.model\.model\.norm\.weight'", add_stray_key)


def test_an_untied_lm_head_is_exported_as_output(tmp_path):
    model = _llama(lorakit.LoraConfig(r=2, target_modules=["lm_head"]), tie=False)
    lorakit.save_adapter(model, tmp_path / "adapter")
    _, tensors = _read(export.export_gguf(tmp_path / "adapter", tmp_path / "a.gguf", model.config))
    assert sorted(tensors) == ["output.weight.lora_a", "output.weight.lora_b"]


def test_cli_export_reads_the_base_from_the_adapter(tiny_llama, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    randomize(model, 1)
    lorakit.save_adapter(model, tmp_path / "adapter")
    (tmp_path / "adapter" / "task.json").write_text(json.dumps({"task": "e2e", "model": str(tiny_llama)}))
    assert cli.main(["export", "gguf", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "a.gguf")]) == 0
    assert "--lora" in capsys.readouterr().out
    _, tensors = _read(tmp_path / "a.gguf")
    assert len(tensors) == 2 * model.config.num_hidden_layers
    (tmp_path / "adapter" / "task.json").unlink()  # and the base_model_name_or_path of a PEFT config, or --model
    assert cli.main(["export", "gguf", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "b.gguf"),
                     "--model", str(tiny_llama)]) == 0
    assert (tmp_path / "b.gguf").read_bytes() == (tmp_path / "a.gguf").read_bytes()


def _greedy_by_hand(model, prompt: list[int], steps: int, banned: list[int]) -> tuple[list[int], list[float]]:
    """Greedy tokens and top-1 - top-2 logit margins, each step a full forward of the whole sequence (no cache)."""
    ids, margins = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            logits[banned] = float("-inf")
            top = logits.topk(2)
            ids.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
    return ids[len(prompt):], margins


def test_gguf_export_records_the_probes_expected_greedy_tokens(tmp_path):
    from lorakit.receipt import read_receipt

    model = _llama(lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    model.config.bos_token_id, model.config.eos_token_id = 1, 2
    lorakit.save_adapter(model, tmp_path / "adapter")
    reference = read_receipt(tmp_path / "adapter")
    record = export.probe_record(model, reference)
    out = export.export_gguf(tmp_path / "adapter", tmp_path / "a.gguf", model.config, record)
    fields, tensors = _read(out)
    assert len(tensors) == 4 * 2  # the adapter as before
    assert fields["lorakit.adapter_sha256"] == reference.metadata["adapter_sha256"]
    assert (fields["lorakit.probe.count"], fields["lorakit.probe.prompt_length"], fields["lorakit.probe.new_tokens"]) \
        == (16, export.PROMPT_LENGTH, export.NEW_TOKENS)
    prompts = torch.tensor(fields["lorakit.probe.prompt_ids"]).reshape(16, 8)
    assert torch.equal(prompts, reference.tensors["probe.ids"].reshape(16, 8))  # each 4 x 32 row: 4 windows of 8
    assert fields["lorakit.probe.banned_ids"] == [1, 2]
    greedy = torch.tensor(fields["lorakit.probe.greedy_ids"]).reshape(16, 16)
    margins = torch.tensor(fields["lorakit.probe.margins"]).reshape(16, 16)
    for i in (0, 5, 15):  # the adapter's greedy run, recomputed without the KV cache
        tokens, by_hand = _greedy_by_hand(model, prompts[i].tolist(), 16, [1, 2])
        assert greedy[i].tolist() == tokens
        torch.testing.assert_close(margins[i], torch.tensor(by_hand), rtol=1e-4, atol=1e-4)
    with lorakit.disable_adapters(model):
        assert _greedy_by_hand(model, prompts[0].tolist(), 16, [1, 2])[0] != greedy[0].tolist()  # the adapter matters
    read = export.read_probe_record(out)
    assert torch.equal(read.prompt_ids, prompts) and torch.equal(read.greedy_ids, greedy)
    assert torch.equal(read.margins, margins) and read.banned_ids == [1, 2]
    assert read.adapter_sha256 == reference.metadata["adapter_sha256"]


def test_a_probe_record_of_another_adapter_is_refused(tmp_path):
    from lorakit.receipt import read_receipt

    model = _llama(lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "a")
    record = export.probe_record(model, read_receipt(tmp_path / "a"))
    randomize(model, 3, std=0.3)
    lorakit.save_adapter(model, tmp_path / "b")
    with pytest.raises(ValueError, match=r"probes: the record is of adapter sha256 .* has another checksum"):
        export.export_gguf(tmp_path / "b", tmp_path / "b.gguf", model.config, record)
    assert export.read_probe_record(export.export_gguf(tmp_path / "b", tmp_path / "b.gguf", model.config)) is None


def test_the_pass_rule_forgives_near_ties_only():
    greedy = torch.arange(4 * 16).reshape(4, 16)
    margins = torch.full((4, 16), 3.0)
    margins[1, 5] = margins[2, 9] = 0.1  # lorakit's two best tokens within 0.1 logits: rounding may flip them
    record = export.ProbeRecord(torch.zeros(4, 8, dtype=torch.long), greedy, margins, [], "0" * 64)
    report = export.agreement(record, greedy.tolist())
    assert report["passed"] and (report["same"], report["equal"], report["equal_confident"]) == (4, 1.0, 1.0)
    near_ties = greedy.clone()
    near_ties[1, 5] = near_ties[2, 9] = 999
    report = export.agreement(record, near_ties)
    assert report["passed"] and report["same"] == 2 and report["equal_confident"] == 1.0
    assert report["probes"][1] == {"first_difference": 5, "margin": pytest.approx(0.1)}
    assert report["confident_positions"] == 62 and report["equal"] == 62 / 64
    confident = near_ties.clone()
    confident[3, 2] = 999  # 1 of 62 where lorakit was sure: 98.4% still passes
    assert export.agreement(record, confident)["passed"]
    confident[0, 0] = 999  # 2 of 62: 96.8% < 98%, another function
    report = export.agreement(record, confident)
    assert not report["passed"] and report["equal_confident"] == pytest.approx(60 / 62)
    assert report["probes"][0] == {"first_difference": 0, "margin": 3.0} and report["largest_margin_differing"] == 3.0


def test_cli_export_says_whether_the_gguf_carries_expected_tokens(tiny_llama, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize(model, 1)
    lorakit.save_adapter(model, tmp_path / "adapter")
    (tmp_path / "adapter" / "task.json").write_text(json.dumps({"task": "e2e", "model": str(tiny_llama)}))
    args = ["export", "gguf", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "a.gguf")]
    assert cli.main(args) == 0
    assert "with the expected greedy tokens of 16 probes" in capsys.readouterr().out
    record = export.read_probe_record(tmp_path / "a.gguf")
    assert record.greedy_ids.shape == (16, 16) and {0, 100, 101, 102} <= set(record.banned_ids)  # the tokenizer's too
    (tmp_path / "adapter" / "receipt.safetensors").unlink()
    assert cli.main(args) == 0
    assert "no expected greedy tokens in the GGUF: " in capsys.readouterr().out
    assert export.read_probe_record(tmp_path / "a.gguf") is None


FAKE_SERVER = '''#!{python}
"""A stand-in for llama-server: /health, and /completion answering the expected next token (another one
when the adapter's scale is not 1), after checking the request asks for what lorakit.export sends."""
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

args = sys.argv[1:]
with open({answers!r}) as f:
    record = json.load(f)
expected = {{tuple(k): v for k, v in record["next"]}}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send(200 if self.path == "/health" else 404, {{"status": "ok"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/completion" and body["n_predict"] == 1 and body["temperature"] == 0, body
        assert sorted(i for i, bias in body["logit_bias"] if bias is False) == record["banned"], body
        token = expected[tuple(body["prompt"])] + (0 if body["lora"] == [{{"id": 0, "scale": 1.0}}] else 1)
        self.send(200, {{"tokens": [token], "tokens_evaluated": len(body["prompt"])}})

    def send(self, code, answer):
        data = json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


assert args[args.index("--lora") + 1] == {lora!r}
HTTPServer(("127.0.0.1", int(args[args.index("--port") + 1])), Handler).serve_forever()
'''


def _fake_llama_server(tmp_path, gguf_file) -> str:
    import sys

    record = export.read_probe_record(gguf_file)
    paths, length = torch.cat([record.prompt_ids, record.greedy_ids], 1).tolist(), record.prompt_ids.shape[1]
    answers = {"banned": record.banned_ids,
               "next": [[p[: length + j], p[length + j]] for p in paths for j in range(record.greedy_ids.shape[1])]}
    (tmp_path / "answers.json").write_text(json.dumps(answers))
    server = tmp_path / "llama-server"
    server.write_text(FAKE_SERVER.format(python=sys.executable, answers=str(tmp_path / "answers.json"),
                                         lora=str(gguf_file)))
    server.chmod(0o755)
    return str(server)


def test_lorakit_verify_gguf_asks_llama_server_for_each_next_token(tiny_llama, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.lm_head.weight *= 30  # a random tiny model's logits are flat: make most of its choices clear
    model.save_pretrained(tmp_path / "base")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(tmp_path / "base")
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize(model, 1)
    lorakit.save_adapter(model, tmp_path / "adapter")
    (tmp_path / "adapter" / "task.json").write_text(json.dumps({"task": "e2e", "model": str(tmp_path / "base")}))
    gguf_file = tmp_path / "a.gguf"
    assert cli.main(["export", "gguf", "--adapter", str(tmp_path / "adapter"), "--out", str(gguf_file)]) == 0
    server, base = _fake_llama_server(tmp_path, gguf_file), tmp_path / "base.gguf"
    base.write_bytes(b"")  # the stand-in never reads it
    capsys.readouterr()
    args = ["verify", "--gguf", str(gguf_file), "--base-gguf", str(base), "--llama-server", server]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "next token equal to lorakit's greedy token: 100.0% of 256 positions" in out and "reproduces" in out
    dropped = export.check_gguf(gguf_file, base, server, scale=0.0)  # the adapter off: every next token differs
    assert not dropped["passed"] and dropped["equal"] == 0.0 and dropped["same"] == 0
    assert cli.main([*args, "--json"]) == 0 and json.loads(capsys.readouterr().out)["verified"] is True
    assert cli.main(["verify", "--gguf", str(gguf_file), "--llama-server", server]) == 2
    assert "--gguf needs --base-gguf FILE" in capsys.readouterr().err
    assert cli.main([*args[:-1], str(tmp_path / "nothing")]) == 2
    assert "llama-server binary" in capsys.readouterr().err
    assert cli.main(["verify"]) == 2 and "lorakit verify needs --adapter DIR" in capsys.readouterr().err


def _real_llama_server() -> str | None:
    """$LLAMA_SERVER, else the llama-server bench/build_llama_server.sh built here for this CPU; None if neither."""
    import importlib.util
    import os
    from pathlib import Path

    if os.environ.get("LLAMA_SERVER"):
        return os.environ["LLAMA_SERVER"]
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("llama_build", root / "bench" / "llama_build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    found = build.default_binary(root, build.build_key(build.cpu_flags()))
    return str(found) if found else None


@pytest.mark.slow
def test_a_smollm2_export_passes_in_llama_server_and_fails_without_its_adapter(tmp_path):
    from pathlib import Path

    from lorakit.models import resolve_model
    from lorakit.tasks import lm

    server = _real_llama_server()
    try:
        folder = Path(resolve_model("smollm2"))
    except ValueError:
        pytest.skip("SmolLM2 is not installed (lorakit models install smollm2)")
    if server is None or not (folder / "gguf.json").is_file():
        pytest.skip("no llama-server (bench/build_llama_server.sh, or $LLAMA_SERVER) or no SmolLM2 GGUF")
    base = folder / json.loads((folder / "gguf.json").read_text())["file"]  # Q4_1: lorakit's weights, dequantized
    model = lm.load_causal_lm("smollm2")[1]
    lorakit.add_lora(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    randomize(model, 2, std=0.06)  # strong enough to change most greedy tokens (bench/gguf_probes.py: random-0.06)
    lorakit.save_adapter(model, tmp_path / "adapter")
    (tmp_path / "adapter" / "task.json").write_text(json.dumps({"task": "e2e", "model": "smollm2"}))
    del model
    gguf_file = tmp_path / "a.gguf"
    assert cli.main(["export", "gguf", "--adapter", str(tmp_path / "adapter"), "--out", str(gguf_file)]) == 0
    honest = export.check_gguf(gguf_file, base, server, threads=1)
    assert honest["passed"] and honest["equal_confident"] == 1.0 and honest["equal"] > 0.85, honest
    dropped = export.check_gguf(gguf_file, base, server, scale=0.0, threads=1)
    assert not dropped["passed"] and dropped["equal_confident"] < 0.9, dropped
