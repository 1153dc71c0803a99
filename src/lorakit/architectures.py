"""What lorakit knows about transformers' model families: a model's input and output
embeddings, PEFT's default LoRA targets per ``config.model_type``, which weights of a
mixture-of-experts model no LoRA layer of lorakit can reach, and where q, k and v sit in
fused projections.

Only torch is imported: a model is read through its modules and ``config``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["model_type", "embedding_modules", "PEFT_DEFAULT_TARGETS", "MOE_PROJECTION_NAMES", "expert_weights",
           "fused_slices"]


# ---- the model's config and embeddings -------------------------------------------------------


def _text_config(model: nn.Module):
    """The config of the model's text part (of the language model in a multimodal one)."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_type(model: nn.Module) -> str | None:
    """``model.config.model_type`` (what PEFT's tables are keyed by), or None."""
    return getattr(getattr(model, "config", None), "model_type", None)


def embedding_modules(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The model's input and output embeddings (transformers' getters; None where it has none)."""
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)() if hasattr(model, getter) else None
        except (AttributeError, NotImplementedError):  # a model without that embedding
            module = None
        found.append(module if isinstance(getattr(module, "weight", None), torch.Tensor) else None)
    return found[0], found[1]


# ---- PEFT's default targets -------------------------------------------------------------------

# PEFT 0.21's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING: what PEFT adapts when a
# config gives no target_modules (tests/test_families.py checks it equals PEFT's).
PEFT_DEFAULT_TARGETS: dict[str, tuple[str, ...] | str] = {
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "bart": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "bloom": ("query_key_value",),
    "blip-2": ("q", "v", "q_proj", "v_proj"),
    "opt": ("q_proj", "v_proj"),
    "gptj": ("q_proj", "v_proj"),
    "gpt_neox": ("query_key_value",),
    "gpt_neo": ("q_proj", "v_proj"),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"),
    "deberta-v2": ("query_proj", "value_proj"),
    "deberta": ("in_proj",),
    "layoutlm": ("query", "value"),
    "llama": ("q_proj", "v_proj"),
    "llama4": ("q_proj", "v_proj"),
    "chatglm": ("query_key_value",),
    "gpt_bigcode": ("c_attn",),
    "mpt": ("Wqkv",),
    "RefinedWebModel": ("query_key_value",),
    "RefinedWeb": ("query_key_value",),
    "falcon": ("query_key_value",),
    "btlm": ("c_proj", "c_attn"),
    "codegen": ("qkv_proj",),
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "stablelm": ("q_proj", "v_proj"),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"),
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "rwkv": ("key", "value", "receptance", "output"),
    "rwkv7": ("r_proj", "k_proj", "v_proj", "o_proj", "key", "value"),
}


# ---- mixture of experts ----------------------------------------------------------------------

# The transformers-4 names of a mixture-of-experts block's router and expert projections
# (PEFT's _MOE_TARGET_MODULE_MAPPING keys): in transformers 5 the experts are fused 3-D
# parameters and the router a custom module, and PEFT turns these names into
# target_parameters, which lorakit does not support.
MOE_PROJECTION_NAMES = ("gate", "w1", "w2", "w3", "gate_proj", "up_proj", "down_proj")
# Config fields that give a model's number of routed experts.
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def expert_weights(model: nn.Module, adaptable: Callable[[nn.Module], bool]) -> list[str]:
    """Names of the router and expert weights of a mixture-of-experts model that no LoRA layer
    of lorakit can wrap: matrices (2-D or more) owned by modules that are not ``adaptable``
    (transformers 5's fused 3-D experts, its router modules). Empty for other models."""
    config = _text_config(model)
    if not any(getattr(config, field, None) for field in _EXPERT_COUNTS):
        return []
    found, inside = [], ()
    for prefix, module in model.named_modules():
        if prefix.startswith(inside):  # the factors of a LoRA layer
            continue
        if prefix and adaptable(module):
            inside = (*inside, prefix + ".")
            continue
        found += [f"{prefix}.{name}" if prefix else name
                  for name, p in module.named_parameters(recurse=False) if p.dim() >= 2]
    return found


# ---- fused projections ---------------------------------------------------------------------


def _contiguous(*sizes: int) -> tuple[Tensor, ...]:
    return torch.arange(sum(sizes)).split(list(sizes))


def _grid(shape: tuple[int, ...], picks: list) -> tuple[Tensor, ...]:
    """Rows laid out as ``shape`` (e.g. (heads, 3, head_dim)); slice ``i`` = ``rows[picks[i]]``."""
    rows = torch.arange(torch.Size(shape).numel()).view(shape)
    return tuple(rows[p].flatten() for p in picks)


def _heads(cfg) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size)."""
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_kv_heads", None) or heads
    size = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, kv, size


def _phi3(cfg, leaf: str) -> tuple[Tensor, ...] | None:
    if leaf == "gate_up_proj":  # gate | up
        return _contiguous(cfg.intermediate_size, cfg.intermediate_size)
    heads, kv, size = _heads(cfg)
    return _contiguous(heads * size, kv * size, kv * size) if leaf == "qkv_proj" else None


def _per_head(cfg, leaf: str) -> tuple[Tensor, ...] | None:
    """GPT-NeoX, BLOOM: ``(heads, 3, head_dim)``: q, k, v interleaved per head."""
    heads, _, size = _heads(cfg)
    return _grid((heads, 3, size), [(slice(None), i) for i in range(3)]) if leaf == "query_key_value" else None


def _falcon(cfg, leaf: str) -> tuple[Tensor, ...] | None:
    """Falcon's three layouts, as FalconAttention._split_heads reads them."""
    if leaf != "query_key_value":
        return None
    heads, size = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    if cfg.new_decoder_architecture:  # (kv groups, queries per group + k + v, head_dim)
        group = heads // cfg.num_kv_heads
        return _grid((cfg.num_kv_heads, group + 2, size),
                     [(slice(None), slice(0, group)), (slice(None), group), (slice(None), group + 1)])
    if cfg.multi_query:  # all query heads, then one k head and one v head
        return _contiguous(heads * size, size, size)
    return _grid((heads, 3, size), [(slice(None), i) for i in range(3)])


def _thirds(cfg, leaf: str) -> tuple[Tensor, ...] | None:
    """GPT-2's ``c_attn``: q | k | v, each ``hidden`` wide."""
    return _contiguous(*[cfg.hidden_size] * 3) if leaf == "c_attn" else None


_FUSED: dict[str, Callable] = {"gpt2": _thirds, "phi3": _phi3, "gpt_neox": _per_head, "bloom": _per_head,
                               "falcon": _falcon}


def fused_slices(model: nn.Module, name: str, out_features: int) -> tuple[Tensor, ...] | None:
    """The output rows of each slice of the fused projection ``name`` (q, k, v or gate, up),
    from the model's config; None for a model without ``config.model_type`` (a plain torch
    model: equal contiguous slices, loralib's MergedLinear). Raises where the layout is not
    known, rather than guess."""
    config = _text_config(model)
    kind = getattr(config, "model_type", None)
    if kind is None:
        return None
    leaf = name.rsplit(".", 1)[-1]
    layout = _FUSED.get(kind, lambda cfg, leaf: None)(config, leaf)
    if layout is None:
        known = ", ".join(sorted(_FUSED))
        raise ValueError(f"enable_lora on {name!r}: lorakit does not know how a {kind!r} model lays out the output "
                         f"slices of {leaf!r}, so it would adapt the wrong rows; it knows the fused projections of "
                         f"{known}. Adapt the whole projection (no enable_lora) or name separate q/k/v modules")
    if sum(len(s) for s in layout) != out_features:
        raise ValueError(f"enable_lora on {name!r}: the {kind!r} config gives {sum(len(s) for s in layout)} output "
                         f"rows, the module has {out_features}; the config does not describe this module")
    return layout
