"""Fast dropout for CPU training, beside its reference (``torch.nn.functional.dropout``).

torch draws one float per element through ``bernoulli_``, which on a CPU costs several
elementwise multiplies and takes a large share of a LoRA training step (the matrix
multiplies of frozen weights are cheap next to it). Here random bits are drawn 64 at a
time (``Tensor.random_`` on int64 over the full range) and split into four 16-bit lanes;
an element is dropped when its lane is below ``t = round(p * 2**16)``, so

    P(drop) = t / 2**16            (p rounded to a multiple of 2**-16, |error| <= 7.7e-6)
    y = x * keep / (1 - t / 2**16)  (the expectation of y is exactly x)

The bits come from torch's generator: masks are reproducible from ``torch.manual_seed``
and independent across elements and calls. Only the boolean mask is kept for backward.
On CUDA torch's own fused dropout is used.

The same dropout serves the base model: :func:`use_fast_dropout` swaps its
``nn.Dropout`` modules and its attention-probability dropout (a registered attention
function that falls back to SDPA whenever no dropout is applied).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["keep_mask", "dropout", "FastDropout", "use_fast_dropout", "drop_probability", "math_attention", "ATTENTION_NAME"]

_LANES = 2**16
ATTENTION_NAME = "lorakit_sdpa"


def drop_probability(p: float) -> float:
    """The probability actually applied for ``p``: rounded to a multiple of 2**-16."""
    return round(p * _LANES) / _LANES


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str | None = None,
              generator: torch.Generator | None = None) -> Tensor:
    """Boolean mask of ``shape``, each element False with probability ``drop_probability(p)``."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=generator)  # all 64 bits random (the default omits the sign bit)
    lanes = words.view(torch.int16)[:n]  # uniform on [-2**15, 2**15)
    return (lanes >= round(p * _LANES) - 2**15).view(shape)


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return torch.where(mask, x, 0.0).mul_(scale)  # where() beats mul() by a bool mask (no cast pass)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        return torch.where(mask, grad, 0.0).mul_(ctx.scale), None, None


def dropout(x: Tensor, p: float, training: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """Drop-in for ``F.dropout(x, p, training)`` (not in place)."""
    if not training or p == 0.0:
        return x
    if x.is_cuda or not 0.0 < drop_probability(p) < 1.0:
        return F.dropout(x, p, training)
    mask = keep_mask(x.shape, p, x.device, generator)
    return _MaskedScale.apply(x, mask, 1.0 / (1.0 - drop_probability(p)))


class FastDropout(nn.Dropout):
    """``nn.Dropout`` computed by :func:`dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


_dropout = dropout  # for functions whose `dropout` argument shadows the name


def math_attention(query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, p: float,
                   scaling: float | None = None, is_causal: bool = False) -> Tensor:
    """``dropout_p(softmax(q k^T * scaling + mask)) v`` with fast dropout.

    ``query: (B, H, T, D)``, ``key, value: (B, H, S, D)``; ``attention_mask`` boolean
    (True = attend) or additive, broadcastable to ``(B, H, T, S)``. Returns ``(B, H, T, D)``.
    """
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    # Scale the (smaller) query, and mask in place: matmul keeps its inputs, not its output.
    scores = torch.matmul(query * scaling, key.transpose(-1, -2))  # (B, H, T, S)
    lowest = torch.finfo(scores.dtype).min
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        scores = scores.masked_fill_(~mask, lowest) if mask.dtype == torch.bool else scores + mask  # promotes
    elif is_causal:
        t, s = scores.shape[-2:]
        scores = scores.masked_fill_(~torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(s - t), lowest)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(_dropout(probs, p), value)


def _fast_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                    dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention function: :func:`math_attention` when dropout applies on a
    CPU, SDPA otherwise. Returns ``((B, T, H, D), None)`` like transformers' SDPA path."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if dropout == 0.0 or not module.training or query.is_cuda:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    out = math_attention(query, key, value, attention_mask, dropout, scaling, causal)
    return out.transpose(1, 2).contiguous(), None


def use_fast_dropout(model: nn.Module, enabled: bool = True) -> int:
    """Swap ``model``'s ``nn.Dropout`` modules for :class:`FastDropout` (or back) and, for
    transformers models using SDPA, route attention through the fast-dropout attention.
    Returns the number of dropout modules swapped."""
    old, new = (nn.Dropout, FastDropout) if enabled else (FastDropout, nn.Dropout)
    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is old:
                replacement = new(child.p)
                replacement.train(child.training)
                setattr(module, name, replacement)
                swapped += 1
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) in ("sdpa", ATTENTION_NAME):
        if enabled:
            from transformers import AttentionInterface
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

            AttentionInterface.register(ATTENTION_NAME, _fast_attention)
            # Without a mask function of its own name, transformers builds no attention mask at all.
            AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
        config._attn_implementation = ATTENTION_NAME if enabled else "sdpa"
    return swapped
