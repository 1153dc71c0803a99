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
