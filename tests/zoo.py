"""Tiny random models, one per architecture family users fine-tune (transformers 5), with
the module names a PEFT user targets in each: the zoo of tests/test_architectures.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers as T
from torch import nn

VOCAB = 128
LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj")
MOE_REFUSAL = r"'all-linear' on this mixture-of-experts model .*PEFT also adapts the router and the fused expert"


def _decoder(config: type, model: type, **kw) -> Callable[[], nn.Module]:
    sizes = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    return lambda: model(config(**{**sizes, **kw}))


def _qwen2_5_vl() -> nn.Module:
    rope = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_parameters=rope, bos_token_id=2, eos_token_id=2)
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32, fullatt_block_indexes=[0])
    return T.Qwen2_5_VLForConditionalGeneration(T.Qwen2_5_VLConfig(text_config=text, vision_config=vision))


@dataclass(frozen=True)
class Arch:
    make: Callable[[], nn.Module]
    attention: tuple[str, ...]
    embed: str | None = "embed_tokens"  # the input embedding's module name
    head: str | None = "lm_head"  # the output embedding's (None: a classifier)
    kind: str = "lm"  # lm, seq2seq, cls (SEQ_CLS task), image
    refuse: dict[str, str] = field(default_factory=dict)  # case -> lorakit's refusal


ARCHS = {
    "llama": Arch(_decoder(T.LlamaConfig, T.LlamaForCausalLM, tie_word_embeddings=True), LLAMA_LIKE),  # Llama 3.2
    "qwen2": Arch(_decoder(T.Qwen2Config, T.Qwen2ForCausalLM, tie_word_embeddings=True), LLAMA_LIKE),  # Qwen2.5 0.5B
    "qwen3": Arch(_decoder(T.Qwen3Config, T.Qwen3ForCausalLM, head_dim=8), LLAMA_LIKE),
    "mistral": Arch(_decoder(T.MistralConfig, T.MistralForCausalLM), LLAMA_LIKE),
    "gemma": Arch(_decoder(T.GemmaConfig, T.GemmaForCausalLM, head_dim=8), LLAMA_LIKE),
    "gemma2": Arch(_decoder(T.Gemma2Config, T.Gemma2ForCausalLM, head_dim=8), LLAMA_LIKE),
    "gemma3": Arch(_decoder(T.Gemma3TextConfig, T.Gemma3ForCausalLM, head_dim=8), LLAMA_LIKE),
    "phi3": Arch(_decoder(T.Phi3Config, T.Phi3ForCausalLM, num_key_value_heads=1), ("qkv_proj", "o_proj"),
                 refuse={"default": r"could not find query/value projections"}),  # PEFT has no default either
    "gpt2": Arch(lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                        bos_token_id=2, eos_token_id=2)), ("c_attn", "c_proj"), "wte"),
    "gpt_neox": Arch(lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64)), ("query_key_value", "dense"), "embed_in", "embed_out"),
    "opt": Arch(lambda: T.OPTForCausalLM(T.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1)), ("q_proj", "k_proj", "v_proj", "out_proj")),
    "falcon": Arch(lambda: T.FalconForCausalLM(T.FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, bos_token_id=2, eos_token_id=2)),
        ("query_key_value", "dense"), "word_embeddings"),
    "qwen3_moe": Arch(_decoder(T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, head_dim=8, moe_intermediate_size=16,
                               num_experts=4, num_experts_per_tok=2), LLAMA_LIKE, refuse={"all-linear": MOE_REFUSAL}),
    "mixtral": Arch(_decoder(T.MixtralConfig, T.MixtralForCausalLM, num_local_experts=4, num_experts_per_tok=2),
                    LLAMA_LIKE, refuse={"all-linear": MOE_REFUSAL}),
    "t5": Arch(lambda: T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)), ("q", "k", "v", "o"), kind="seq2seq"),
    "bert": Arch(lambda: T.BertForSequenceClassification(T.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64)), ("query", "key", "value"), "word_embeddings", None, "cls"),
    "roberta": Arch(lambda: T.RobertaForSequenceClassification(T.RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=66)), ("query", "key", "value"), "word_embeddings", None, "cls"),
    "vit": Arch(lambda: T.ViTForImageClassification(T.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=8, patch_size=4,
        num_labels=3)), LLAMA_LIKE, "projection", None, "image"),  # the patch embedding is a Conv2d
    "qwen2_5_vl": Arch(_qwen2_5_vl, LLAMA_LIKE),  # the text model of a vision-language model
}


def base(arch: Arch, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return arch.make().eval()


def inputs(arch: Arch, rows: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if arch.kind == "image":
        return {"pixel_values": torch.randn(rows, 3, 8, 8, generator=g)}
    ids = torch.randint(3, VOCAB, (rows, 6), generator=g)
    return {"input_ids": ids, "decoder_input_ids": ids.flip(1)} if arch.kind == "seq2seq" else {"input_ids": ids}


def logits(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits
