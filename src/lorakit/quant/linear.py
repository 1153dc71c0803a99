"""Block-quantized linear layers for decoding: :class:`QuantLinear` (q8_0, q4_0, q4_1 weights, float
activations, :mod:`lorakit.quant.kernels`) and :func:`quantize_linears`, which puts them in a model.

LoRA layers keep their float weight (merging, ``delta_weight``) and compute their base product with a
quantized copy of it, through the same seam as ``lorakit.quantize.quantize_int8`` (``int8_base``, read by
``LoraLinear.base_forward`` until the layer is merged); the adapters stay in full precision and are
applied per row as before: ``h = dequant(W_q) x + b + (alpha / r) B A x``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import kernels
from .blocks import BLOCK, BlockWeight, Format, check_shape, dequantize, quantize

__all__ = ["QuantLinear", "quantize_linears"]


class QuantLinear(nn.Module):
    """``y = x W^T + b`` with ``W: (out, in)`` stored in blocks of 32 (:mod:`lorakit.quant.blocks`); ``x`` of
    any leading shape and float dtype, computed in float32 and returned in ``x``'s dtype.

    ``d`` and ``m`` are kept as the int16 bit patterns of their float16 values, so that ``model.to(dtype)``
    leaves them alone (it converts floating buffers); ``bias`` is float32 (the kernel reads any float dtype).
    Building one builds the kernels (:func:`lorakit.quant.kernels.load`); the code path (``isa``) is fixed then.
    A forward is one call of the C++ operator: decoding calls ~200 of these per token, so what Python does
    around it shows (a reshape, a cast and a view cost about as much as the product of a small matrix)."""

    def __init__(self, weight: BlockWeight, bias: Tensor | None = None, isa: str | None = None) -> None:
        super().__init__()
        kernels.load()
        self.fmt, self.code, self.isa = weight.fmt, kernels.FORMAT_CODES[weight.fmt], kernels.resolve_isa(isa)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("q", weight.q)
        self.register_buffer("d", weight.d.view(torch.int16))
        self.register_buffer("m", None if weight.m is None else weight.m.view(torch.int16))
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None, fmt: Format = "q8_0") -> QuantLinear:
        """``weight: (out, in)`` rounded to ``fmt``; ``in`` must be a multiple of 32 (ValueError otherwise)."""
        return cls(quantize(weight, fmt), bias)

    def block_weight(self) -> BlockWeight:
        return BlockWeight(self.fmt, self.q, self.d.view(torch.float16), None if self.m is None else self.m.view(torch.float16))

    def dequantize(self) -> Tensor:
        """The float32 ``(out, in)`` weight this layer computes with."""
        return dequantize(self.block_weight())

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.lorakit_quant.linear(x, self.q, self.d, self.m, self.bias, self.code, self.isa)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.fmt}"


def quantize_linears(model: nn.Module, fmt: Format, head_fmt: Format | None = None) -> int:
    """Replace ``model``'s plain linear layers (``nn.Linear``, GPT-2's ``Conv1D``) by :class:`QuantLinear` in
    ``fmt``, the LM head (``get_output_embeddings()``) in ``head_fmt`` (default ``fmt``; GGUF files keep it in
    q8_0 under 4-bit layers), and give the LoRA linear layers a quantized copy of their weight, in place;
    returns how many layers. Layers whose ``in_features`` is not a multiple of 32 stay as they are. Attach the
    adapters first: a layer replaced here cannot take an adapter later. Builds the kernels first (RuntimeError
    naming what to install when it cannot)."""
    from transformers.pytorch_utils import Conv1D

    from .. import quant
    from ..layers import LoraLayer, LoraLinear

    for f in (fmt, head_fmt or fmt):
        check_shape(torch.empty(0, BLOCK), f)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if any(quant.is_quantized(m) or getattr(m, "quantized", False) is True for m in model.modules()):
        raise ValueError(f"the model's base is already quantized (bitsandbytes): {fmt} needs float weights; "
                         "load the base in float to quantize it here")
    kernels.load()
    count = 0
    for module in list(model.modules()):
        if isinstance(module, LoraLinear):
            if module.__dict__.get("int8_base") is None and module.in_features % BLOCK == 0:
                weight = module.weight.T if module.fan_in_fan_out else module.weight
                module.__dict__["int8_base"] = QuantLinear.from_float(weight, module.bias, fmt)  # not a submodule: no new keys
                count += 1
            continue
        for name, child in list(module.named_children()):
            if isinstance(child, LoraLayer) or not isinstance(child, nn.Linear | Conv1D):
                continue
            weight = child.weight.T if isinstance(child, Conv1D) else child.weight
            if weight.shape[1] % BLOCK == 0:
                setattr(module, name, QuantLinear.from_float(weight, child.bias, (head_fmt or fmt) if child is head else fmt))
                count += 1
    return count
