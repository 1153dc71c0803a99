"""What lorakit knows about transformers' model families: a model's input and output
embeddings, PEFT's default LoRA targets per ``config.model_type``, which weights of a
mixture-of-experts model no LoRA layer of lorakit can reach, and where q, k and v sit in
fused projections.

Only torch is imported: a model is read through its modules and ``config``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["model_type", "embedding_modules"]


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
