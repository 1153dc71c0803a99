"""LoRA variants: DoRA (Liu et al. 2024, arXiv:2402.09353) and LoRA+'s parameter groups
(Hayou et al. 2024, arXiv:2402.12354).

**DoRA** (section 4) splits each adapted weight into a magnitude and a direction: with the
base weight as a matrix ``W0: (c, n)`` of ``c`` output channels (a Linear's rows; an
embedding's columns; a convolution's filters, flattened), ``D = scaling * B A`` and a trained
magnitude ``m: (c,)`` initialised to ``||W0 + D||`` (row norms),::

    W' = m / ||W0 + D|| * (W0 + D)          # the norm per output channel, detached (section 4.3)
    h  = W' x + b = W0 x + b + (f - 1) * (W0 x) + f * (D x),   f = m / ||W0 + D||

so a layer adds ``(f - 1) * (W0 x) + f * scaling * B A x`` to its base output (PEFT's
``DoraLinearLayer.forward``; with dropout active, ``x`` there is the dropped input and
``W0 x`` is recomputed on it, as PEFT does). The norm is the costly part: PEFT forms the
``(c, n)`` matrix ``W0 + D`` at every step (about 2x a LoRA step, peft #1474). Here it is
expanded instead (:func:`weight_norm`)::

    ||W0_i + D_i||^2 = ||W0_i||^2 + 2 s (B ⊙ (W0 A^T))_i·1 + s^2 (B (A A^T) ⊙ B)_i·1

``||W0_i||^2`` is computed once per base weight (it is frozen) and ``W0 A^T`` is one thin
``(c, n) x (n, r)`` product: no ``(c, n)`` temporary. :func:`weight_norm_reference` is
the direct formula it is tested against; ``delta_weight`` (merging) uses the direct one.

**LoRA+** trains ``B`` with a learning rate ``ratio`` times ``A``'s:
:func:`loraplus_param_groups` builds the optimizer's parameter groups as PEFT's
``create_loraplus_optimizer`` does.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .layers import LoraLayer

__all__ = ["weight_norm", "weight_norm_reference", "initial_magnitude", "dora_update", "dora_output", "dora_delta",
           "loraplus_param_groups"]


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _channel_rows(layer: LoraLayer) -> Tensor:
    """The base weight as ``(c, n)``: one row per output channel (read through ``base_weight``)."""
    return layer.weight_rows(layer.base_weight())


def _squared_row_norms(layer: LoraLayer, rows: Tensor) -> Tensor:
    """``||W0_i||^2`` in float32, kept until the base weight changes: written in place (its version
    counter moves), or another tensor (moved, loaded, re-quantized, given new ``.data``)."""
    w = layer.original_weight
    key = (id(w), w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
    cached = layer.__dict__.get("_dora_squared_norms")
    if cached is None or cached[0] != key:
        cached = (key, _f32(rows).square().sum(1))
        layer.__dict__["_dora_squared_norms"] = cached
    return cached[1]


@torch.no_grad()
def weight_norm(layer: LoraLayer, name: str) -> Tensor:
    """``||W0 + scaling B A||`` per output channel, ``(c,)``, without forming ``W0 + B A``: the
    expansion in the module docstring, in float32 (float64 for float64 factors). Detached."""
    rows = _channel_rows(layer)
    A, B = layer.dora_factors(name)  # (r, n), (c, r)
    s = layer.scaling(name)
    wa = rows.to(A.dtype) @ A.T  # (c, r): the one product with W0
    cross = (B * wa).sum(1)
    ba = ((B @ (A @ A.T)) * B).sum(1)  # ||(B A)_i||^2
    squared = _squared_row_norms(layer, rows).to(A.dtype) + 2 * s * cross + s * s * ba
    return squared.clamp_min(0).sqrt()


@torch.no_grad()
def weight_norm_reference(layer: LoraLayer, name: str) -> Tensor:
    """The direct formula ``torch.linalg.norm(W0 + scaling B A, dim=1)`` (PEFT's), in float32."""
    A, B = layer.dora_factors(name)
    return torch.linalg.norm(_f32(_channel_rows(layer)) + layer.scaling(name) * (_f32(B) @ _f32(A)), dim=1)


def initial_magnitude(layer: LoraLayer, name: str, shape: tuple[int, ...]) -> Tensor:
    """``m`` at creation: ``||W0 + scaling B A||`` (``||W0||`` when ``B = 0``), shaped as PEFT
    stores it (``(c,)``; convolutions ``(1, c, 1, ...)``), in the factors' dtype."""
    return weight_norm_reference(layer, name).to(layer.lora_A[name].dtype).reshape(shape)


def dora_update(layer: LoraLayer, x: Tensor, name: str, base: Tensor) -> Tensor:
    """What adapter ``name`` adds to the base output ``base`` (``W0 x + b``) of ``x``:
    ``(f - 1) * (W0 x) + f * scaling * B A x`` with ``f = m / ||W0 + scaling B A||`` (the
    norm detached). With dropout active, PEFT applies it to ``x`` once and recomputes
    ``W0 dropout(x)``: so does this."""
    magnitude = layer.lora_magnitude_vector[name]
    f = magnitude / weight_norm(layer, name).view(magnitude.shape)
    dropout = layer.lora_dropout[name]
    if layer.input_dropout and layer.training and not isinstance(dropout, nn.Identity):
        dropped = dropout(x.to(layer.lora_A[name].dtype))
        base = layer.base_forward(dropped.to(x.dtype), layer.weight)
        lora = layer.lora_branch(dropped, name)
    else:
        lora = layer.lora_forward(x, name)
    bias = layer._parameters.get("bias")
    if bias is not None:
        base = base - bias.view(magnitude.shape)
    return (f - 1) * base + f * lora


def dora_output(layer: LoraLayer, x: Tensor, name: str, base: Tensor) -> Tensor:
    """The layer's output with adapter ``name`` alone active: ``base + dora_update(...)``. Without
    active dropout this is ``f * (W0 x + scaling B A x) + b``: one product with ``f`` instead of
    two (the same function, the cheaper training step)."""
    dropout = layer.lora_dropout[name]
    if layer.input_dropout and layer.training and not isinstance(dropout, nn.Identity):
        return base + dora_update(layer, x, name, base).to(base.dtype)
    magnitude = layer.lora_magnitude_vector[name]
    f = magnitude / weight_norm(layer, name).view(magnitude.shape)
    bias = layer._parameters.get("bias")
    direction = layer.lora_forward(x, name) + base  # W0 x + b + scaling B A x
    if bias is None:
        return (f * direction).to(base.dtype)
    bias = bias.view(magnitude.shape)
    return (f * (direction - bias) + bias).to(base.dtype)


@torch.no_grad()
def dora_delta(layer: LoraLayer, name: str) -> Tensor:
    """``W' - W0`` in float32, in ``W0``'s layout: ``m / ||W0 + D|| * (W0 + D) - W0`` (the norm
    by the direct formula, as merging is rare and must be exact)."""
    rows = _f32(_channel_rows(layer))
    A, B = layer.dora_factors(name)
    adapted = rows + layer.scaling(name) * (_f32(B) @ _f32(A))
    f = _f32(layer.lora_magnitude_vector[name]).reshape(-1, 1) / torch.linalg.norm(adapted, dim=1, keepdim=True)
    return layer.rows_to_weight(f * adapted - rows)


# ---- LoRA+ ---------------------------------------------------------------------------------


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float, *, weight_decay: float = 0.0,
                          lr_embedding: float = 1e-6) -> list[dict[str, Any]]:
    """LoRA+'s parameter groups for ``torch.optim.AdamW(groups)`` (or any optimizer), as PEFT's
    ``create_loraplus_optimizer`` builds them from the trainable parameters, in its order:

    1. ``A`` factors and every other trainable matrix (a saved head's weight): ``lr``;
    2. the factors of LoRA embeddings: ``lr_embedding`` (PEFT's ``loraplus_lr_embedding``);
    3. ``B`` factors and trainable vectors (DoRA magnitudes, norms' weights): ``lr * ratio``;
    4. of those, biases and LayerNorm parameters: ``lr * ratio`` without weight decay.

    Groups 1-3 take ``weight_decay`` (PEFT's ``loraplus_weight_decay``, default 0). Parameters
    are told apart by the modules that own them, not by their names.
    """
    for arg, value in (("lr", lr), ("ratio", ratio), ("lr_embedding", lr_embedding)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or not math.isfinite(value):
            raise ValueError(f"loraplus_param_groups: {arg} must be a finite positive number, got {arg}={value!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, int | float) or not 0 <= weight_decay < math.inf:
        raise ValueError(f"loraplus_param_groups: weight_decay must be a finite number >= 0, got {weight_decay!r}")
    groups: dict[str, dict[int, nn.Parameter]] = {"A": {}, "embedding": {}, "B": {}, "B_no_decay": {}}
    for kind, param in _loraplus_kinds(model):
        if param.requires_grad:
            groups[kind].setdefault(id(param), param)
    return [
        {"params": list(groups["A"].values()), "weight_decay": weight_decay, "lr": lr},
        {"params": list(groups["embedding"].values()), "weight_decay": weight_decay, "lr": lr_embedding},
        {"params": list(groups["B"].values()), "weight_decay": weight_decay, "lr": lr * ratio},
        {"params": list(groups["B_no_decay"].values()), "weight_decay": 0.0, "lr": lr * ratio},
    ]


def _loraplus_kinds(model: nn.Module):
    """``(group, parameter)`` for every parameter of ``model``, by the module that owns it."""
    from .layers import LoraEmbedding, LoraLayer

    b_factors: set[int] = set()
    embedding: set[int] = set()  # PEFT's: the parameters held by a LoRA embedding and its factor dicts
    for module in model.modules():
        if isinstance(module, LoraLayer):
            b_factors.update(id(p) for p in module.lora_B.values())
        if isinstance(module, LoraEmbedding):
            embedding.update(id(p) for d in (module.lora_A, module.lora_B) for p in d.values())
            embedding.update(id(p) for p in module._parameters.values() if p is not None)
    for module in model.modules():
        for attr, param in module.named_parameters(recurse=False):
            if id(param) in embedding:
                yield "embedding", param
            elif id(param) in b_factors or param.dim() == 1:  # PEFT: "lora_B" in the name, or a vector
                no_decay = "bias" in attr or isinstance(module, nn.LayerNorm)
                yield ("B_no_decay" if no_decay else "B"), param
            else:
                yield "A", param
