"""What differs between model families (issue #32), item by item: Gemma's scaled embedding,
tied input/output embeddings, mixture-of-experts models, the layouts of fused q/k/v
projections, and PEFT's per-family defaults and embedding weights in adapter files. The
matrix over every family is tests/test_architectures.py; these pin the details."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as T
from safetensors import safe_open
from torch import nn

import lorakit
import zoo
from helpers import MODEL_TOL
from lorakit import LoraConfig
from lorakit.architectures import PEFT_DEFAULT_TARGETS
from zoo import ARCHS

peft = pytest.importorskip("peft")


def _randomize(model: nn.Module, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lorakit.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ---- 1. the embedding wrapper keeps what the wrapped class does ------------------------------


def test_gemma_lora_embedding_scales_its_update_and_follows_dtype_moves():
    arch = ARCHS["gemma3"]
    base, x = zoo.base(arch), zoo.inputs(arch)
    model = lorakit.add_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=["embed_tokens"]))
    layer = model.model.embed_tokens
    assert "embed_scale" in dict(layer.named_buffers()) and layer.embed_scale.item() == pytest.approx(32 ** 0.5)
    torch.testing.assert_close(zoo.logits(model, x), zoo.logits(base, x), rtol=0, atol=0)  # fresh: A = 0
    _randomize(model)
    delta = layer.delta_weight("default")[x["input_ids"]] * layer.embed_scale  # the update, scaled as the base
    torch.testing.assert_close(layer(x["input_ids"]), base.model.embed_tokens(x["input_ids"]) + delta, **MODEL_TOL)
    model.double()  # the wrapper owns the buffer: it moves with the model
    assert layer.embed_scale.dtype == torch.float64 and layer(x["input_ids"]).dtype == torch.float64


def test_lora_embedding_keeps_padding_index_and_max_norm():
    torch.manual_seed(0)
    base = nn.Embedding(10, 4, padding_idx=0, max_norm=1.0)
    ids = torch.tensor([[0, 3, 9, 3]])
    layer = lorakit.LoraEmbedding(copy.deepcopy(base))
    layer.add_adapter("default", LoraConfig(r=2))
    layer.active = ("default",)
    torch.testing.assert_close(layer(ids), base(ids), rtol=0, atol=0)
    assert layer(ids).norm(dim=-1).max() <= 1.0 + 1e-6


def test_an_embedding_whose_forward_lorakit_cannot_follow_is_refused_by_name():
    opt = ARCHS["opt"]
    with pytest.raises(ValueError, match=r"cannot put LoRA on OPTLearnedPositionalEmbedding: it overrides "
                                         r"nn.Embedding.forward"):
        lorakit.add_lora(zoo.base(opt), LoraConfig(target_modules=["embed_positions"]))


# ---- 2. tied input and output embeddings -----------------------------------------------------


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_merging_into_a_tied_embedding_unties_it_and_saves_an_untied_model(target, tmp_path):
    arch = ARCHS["qwen2"]  # tie_word_embeddings=True, as Qwen2.5-0.5B
    base, x = zoo.base(arch), zoo.inputs(arch)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    model = lorakit.add_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", target]))
    _randomize(model)
    unmerged = zoo.logits(model, x)
    with pytest.warns(lorakit.model.UntiedWeightsWarning, match=rf"merging gave .*{target} its own copy .*"
                                                               r"config.tie_word_embeddings set to False"):
        lorakit.merge(model)
    assert not model.config.tie_word_embeddings
    torch.testing.assert_close(zoo.logits(model, x), unmerged, **MODEL_TOL)
    lorakit.unmerge(model)  # ties them again
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.warns(lorakit.model.UntiedWeightsWarning):
        lorakit.merge_and_unload(model).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(f.keys())  # one more vocab x hidden matrix
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(zoo.logits(reloaded, x), unmerged, **MODEL_TOL)


def test_lorakit_merge_on_a_tied_model_says_so_and_writes_an_untied_model(tiny_llama, tmp_path, capsys):
    from lorakit import cli

    tokenizer = T.AutoTokenizer.from_pretrained(tiny_llama)
    folder = tmp_path / "tied"
    torch.manual_seed(0)
    config = T.Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    T.Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model = lorakit.add_lora(T.AutoModelForCausalLM.from_pretrained(folder),
                             LoraConfig(r=2, target_modules=["lm_head"], base_model_name_or_path=str(folder)))
    _randomize(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    assert cli.main(["merge", "--adapter", str(tmp_path / "adapter"), "--task", "jsonl",
                     "--out", str(tmp_path / "merged")]) == 0
    assert "lorakit: note: merging gave lm_head its own copy" in capsys.readouterr().err
    merged = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not merged.config.tie_word_embeddings
    x = torch.tensor([[101, 2023, 2003, 102]])
    torch.testing.assert_close(zoo.logits(merged, {"input_ids": x}), zoo.logits(model, {"input_ids": x}), **MODEL_TOL)


def test_peft_ensure_weight_tying_is_refused_by_name():
    d = json.loads(LoraConfig(target_modules=["embed_tokens"]).to_json()) | {"ensure_weight_tying": True}
    with pytest.raises(ValueError, match=r"sets ensure_weight_tying=True \(PEFT then also puts a LoRA tied to"):
        LoraConfig.from_peft_dict(d)


# ---- 3 and 4. mixture-of-experts models ------------------------------------------------------


def test_peft_writes_an_empty_target_parameters_list_which_is_the_default():
    d = json.loads(LoraConfig(target_modules=["q_proj"]).to_json())
    assert LoraConfig.from_peft_dict(d | {"target_parameters": []}).target_modules == ("q_proj",)
    with pytest.raises(ValueError, match=r"sets target_parameters=\['experts.down_proj'\] \(LoRA on parameters"):
        LoraConfig.from_peft_dict(d | {"target_parameters": ["experts.down_proj"]})


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_moe_targets_that_peft_maps_to_experts_are_refused_by_name(name):
    arch = ARCHS[name]
    with pytest.raises(ValueError, match=r"all-linear' on this mixture-of-experts model .*mlp.experts.down_proj, "
                                         r"mlp.experts.gate_up_proj, mlp.gate.weight: 6 tensors here\)"):
        lorakit.add_lora(zoo.base(arch), LoraConfig(target_modules="all-linear"))
    with pytest.raises(ValueError, match=r"matches 'model.layers.0.mlp.gate' \(\w+TopKRouter\), a layer lorakit cannot"):
        lorakit.add_lora(zoo.base(arch), LoraConfig(target_modules=["q_proj", "gate"]))
    v4 = "w2" if name == "mixtral" else "down_proj"
    with pytest.raises(ValueError, match=rf"target_modules entry '{v4}' \(a transformers-4 expert name\) on this mix"):
        lorakit.add_lora(zoo.base(arch), LoraConfig(target_modules=["q_proj", v4]))


def test_a_peft_all_linear_moe_adapter_is_refused_by_name(tmp_path):
    arch = ARCHS["mixtral"]
    peft.get_peft_model(zoo.base(arch), peft.LoraConfig(r=2, target_modules="all-linear")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"sets target_parameters=\[.*'down_proj'.*\] \(LoRA on parameters such as "
                                         r"a mixture-of-experts model's router and fused experts\)"):
        lorakit.load_adapter(zoo.base(arch), tmp_path)


# ---- 5. enable_lora on fused projections follows the real layout ----------------------------


def _falcon(**kw) -> nn.Module:
    return T.FalconForCausalLM(T.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                              bos_token_id=2, eos_token_id=2, **kw))


def _bloom() -> nn.Module:
    return T.BloomForCausalLM(T.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4))


def _rows_by_model(name: str, model: nn.Module, attn: nn.Module, out: int) -> tuple[torch.Tensor, ...]:
    """The q, k and v rows of the fused output, as the model's own code splits it."""
    rows = torch.arange(out, dtype=torch.float64).view(1, 1, out)
    if name.startswith("falcon"):  # (grouped: k and v broadcast to every query head of their group)
        return tuple(t.flatten().long().unique() for t in attn._split_heads(rows)[:3])
    if name == "bloom":
        return tuple(t.flatten().long() for t in attn._reshape(rows))
    if name == "gpt_neox":  # GPTNeoXAttention.forward: view(..., -1, 3 * head_size).chunk(3, dim=-1)
        return tuple(t.flatten().long() for t in rows.view(1, 1, -1, 3 * attn.head_size).chunk(3, dim=-1))
    q = model.config.num_attention_heads * attn.head_dim  # Phi3Attention.forward: query_pos
    kv = attn.num_key_value_heads * attn.head_dim
    return rows[..., :q].flatten().long(), rows[..., q:q + kv].flatten().long(), rows[..., q + kv:].flatten().long()


FUSED = {
    "phi3": (lambda: zoo.base(ARCHS["phi3"]), "qkv_proj", lambda m: m.model.layers[0].self_attn),  # q 32, k 8, v 8
    "gpt_neox": (lambda: zoo.base(ARCHS["gpt_neox"]), "query_key_value", lambda m: m.gpt_neox.layers[0].attention),
    "falcon": (_falcon, "query_key_value", lambda m: m.transformer.h[0].self_attention),  # multi-query
    "falcon-per-head": (lambda: _falcon(multi_query=False), "query_key_value",
                        lambda m: m.transformer.h[0].self_attention),
    "falcon-grouped": (lambda: _falcon(new_decoder_architecture=True, num_kv_heads=2), "query_key_value",
                       lambda m: m.transformer.h[0].self_attention),
    "bloom": (_bloom, "query_key_value", lambda m: m.transformer.h[0].self_attention),
}


@pytest.mark.parametrize("name", FUSED)
def test_enable_lora_adapts_the_query_and_value_rows_of_a_fused_projection(name, tmp_path):
    make, target, attention = FUSED[name]
    torch.manual_seed(0)
    model = lorakit.add_lora(make().eval(), LoraConfig(r=2, target_modules=[target],
                                                       enable_lora={target: (True, False, True)}))
    _randomize(model)
    layer = getattr(attention(model), target)
    changed = layer.delta_weight("default").abs().sum(1) > 0  # (out,): the rows the adapter updates
    q, k, v = _rows_by_model(name, model, attention(model), layer.out_features)
    assert changed[q].all() and changed[v].all() and not changed[k].any()
    assert changed.sum() == len(q) + len(v)
    lorakit.save_adapter(model, tmp_path)  # and the rows survive a round trip
    torch.manual_seed(0)
    again = lorakit.load_adapter(make().eval(), tmp_path)
    torch.testing.assert_close(getattr(attention(again), target).delta_weight("default"), layer.delta_weight("default"))


def test_enable_lora_on_a_projection_whose_layout_is_unknown_is_refused_by_name():
    with pytest.raises(ValueError, match=r"enable_lora on 'model.layers.0.self_attn.q_proj': lorakit does not know how "
                                         r"a 'qwen2' model lays out the output slices of 'q_proj'"):
        lorakit.add_lora(zoo.base(ARCHS["qwen2"]), LoraConfig(target_modules=["q_proj"],
                                                               enable_lora={"q_proj": (True, False)}))
    with pytest.raises(ValueError, match=r"enable_lora=\(True, False\) has 2 entries but this projection has 3"):
        lorakit.add_lora(zoo.base(ARCHS["phi3"]), LoraConfig(target_modules=["qkv_proj"],
                                                              enable_lora={"qkv_proj": (True, False)}))


# ---- 6. PEFT's defaults and the embedding weights in its files -------------------------------


def test_default_targets_are_peft_defaults():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFTS

    assert {k: v if isinstance(v, str) else list(v) for k, v in PEFT_DEFAULT_TARGETS.items()} == PEFTS
    for name in ("gpt_neox", "falcon"):
        assert lorakit.default_target_modules(zoo.base(ARCHS[name])) == ("query_key_value",)


@pytest.mark.parametrize("targets", [["q_proj", "embed_tokens"], ["q_proj"]])
def test_a_peft_adapter_with_a_resized_vocabulary_loads_after_resizing(targets, tmp_path):
    arch = ARCHS["mistral"]
    base, x = zoo.base(arch), zoo.inputs(arch)
    resized = copy.deepcopy(base)
    resized.resize_token_embeddings(zoo.VOCAB + 8)
    theirs = peft.get_peft_model(copy.deepcopy(resized), peft.LoraConfig(r=2, target_modules=targets,
                                                                         init_lora_weights=False))
    with torch.no_grad():  # trained rows for the new tokens
        theirs.get_input_embeddings().weight[zoo.VOCAB:].normal_()
    theirs.save_pretrained(tmp_path, save_embedding_layers=True)
    with pytest.raises(ValueError, match=r"holds model.embed_tokens with shape \(136, 32\), the model's is \(128, 32\)"
                                         r": its vocabulary was resized; call model.resize_token_embeddings\(136\)"):
        lorakit.load_adapter(copy.deepcopy(base), tmp_path)
    ours = lorakit.load_adapter(resized, tmp_path)
    x = {"input_ids": torch.cat([x["input_ids"], torch.full((4, 1), zoo.VOCAB + 3)], 1)}
    torch.testing.assert_close(zoo.logits(ours, x), zoo.logits(theirs.eval(), x), **MODEL_TOL)
