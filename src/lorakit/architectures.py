"""What lorakit knows about transformers' model families: a model's input and output
embeddings, PEFT's default LoRA targets per ``config.model_type``, which weights of a
mixture-of-experts model no LoRA layer of lorakit can reach, and where q, k and v sit in
fused projections.

Only torch is imported: a model is read through its modules and ``config``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["model_type", "embedding_modules", "MOE_PROJECTION_NAMES", "expert_weights"]


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
