"""Block-quantized linear layers for decoding: :class:`QuantLinear` (q8_0, q4_0, q4_1 weights, float
activations, :mod:`lorakit.quant.kernels`), :func:`quantize_linears`, which puts them in a model, and
:func:`quantize_model`, ``lorakit serve / generate --quantize int8 | int4`` (:data:`SCHEMES`).

LoRA layers keep their float weight (merging, ``delta_weight``) and compute their base product with a
quantized copy of it (``int8_base``, a name from when it held int8 only, read by ``LoraLinear.base_forward``
until the layer is merged); the adapters stay in full precision and are applied per row as before:
``h = dequant(W_q) x + b + (alpha / r) B A x``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from . import kernels
from .blocks import BLOCK, BlockWeight, Format, check_shape, dequantize, quantize

__all__ = ["QuantLinear", "quantize_linears", "fuse_siblings", "quantize_model", "SCHEMES"]

# --quantize: (linear layers, LM head). int4's head in q8_0 as GGUF files keep it (docs/KERNELS.md: on SmolLM2 a
# 4-bit head drops teacher-forced top-1 agreement with the float model from 100% to 83%; the head is 21% of its weights).
SCHEMES: dict[str, tuple[Format, Format]] = {"int8": ("q8_0", "q8_0"), "int4": ("q4_1", "q8_0")}
_BITS = {"q8_0": 8, "q4_0": 4, "q4_1": 4}
_linear = None  # torch.ops.lorakit_quant.linear.default once the kernels are loaded (an overload: no lookup per call)
# Sibling layers that read the same input (children of one module): one product each group (fuse_siblings)
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class QuantLinear(nn.Module):
    """``y = x W^T + b`` with ``W: (out, in)`` stored in blocks of 32 (:mod:`lorakit.quant.blocks`); ``x`` of
    any leading shape and float dtype, computed in float32 and returned in ``x``'s dtype.

    ``d`` and ``m`` are kept as the int16 bit patterns of their float16 values, so that ``model.to(dtype)``
    leaves them alone (it converts floating buffers); ``bias`` is float32 (the kernel reads any float dtype).
    Building one builds the kernels (:func:`lorakit.quant.kernels.load`); the code path (``isa``) and how it
    multiplies (``act``: int8 or fp32 activations, :mod:`lorakit.quant.kernels`) are fixed then.
    A forward is one call of the C++ operator: decoding calls ~200 of these per token, so what Python does
    around it shows (a reshape, a cast and a view cost about as much as the product of a small matrix; reading
    four buffers as module attributes and the operator through ``torch.ops`` doubled a small product's 4.5 us)."""

    # Set by fuse_siblings (in the instance's __dict__); read as a plain attribute (not ``self.__dict__.get``), which
    # dynamo guards like the module's other attributes.
    fused: _Fused | None = None

    def __init__(self, weight: BlockWeight, bias: Tensor | None = None, isa: str | None = None,
                 act: str | None = None) -> None:
        global _linear
        super().__init__()
        kernels.load()
        _linear = torch.ops.lorakit_quant.linear.default
        self.fmt, self.code, self.isa = weight.fmt, kernels.FORMAT_CODES[weight.fmt], kernels.resolve_isa(isa)
        self.act = kernels.resolve_act(act)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("q", weight.q)
        self.register_buffer("d", weight.d.view(torch.int16))
        self.register_buffer("m", None if weight.m is None else weight.m.view(torch.int16))
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None, fmt: Format = "q8_0",
                   act: str | None = None) -> QuantLinear:
        """``weight: (out, in)`` rounded to ``fmt``; ``in`` must be a multiple of 32 (ValueError otherwise)."""
        return cls(quantize(weight, fmt), bias, act=act)

    def block_weight(self) -> BlockWeight:
        return BlockWeight(self.fmt, self.q, self.d.view(torch.float16), None if self.m is None else self.m.view(torch.float16))

    def dequantize(self) -> Tensor:
        """The float32 ``(out, in)`` weight this layer computes with."""
        return dequantize(self.block_weight())

    def forward(self, x: Tensor) -> Tensor:
        fused = self.fused
        if fused is not None and fused.shared:
            return fused.part(x, self.span)
        b = self._buffers
        return _linear(x, b["q"], b["d"], b["m"], b["bias"], self.code, self.isa, self.act)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.fmt}"


def quantize_linears(model: nn.Module, fmt: Format, head_fmt: Format | None = None,
                     blocks: Mapping[str, BlockWeight] | None = None) -> int:
    """Replace ``model``'s plain linear layers (``nn.Linear``, GPT-2's ``Conv1D``) by :class:`QuantLinear` in
    ``fmt``, the LM head (``get_output_embeddings()``) in ``head_fmt`` (default ``fmt``; GGUF files keep it in
    q8_0 under 4-bit layers), and give the LoRA linear layers a quantized copy of their weight, in place;
    returns how many layers. ``blocks``: ready-made weights by module name (``named_modules()``), used as they
    are in place of quantizing that layer's weight (a GGUF's, :func:`quantize_model`). Layers whose
    ``in_features`` is not a multiple of 32 stay as they are. Sibling layers then share one weight
    (:func:`fuse_siblings`). Attach the adapters first: a layer replaced here cannot take an adapter later.
    Builds the kernels first (RuntimeError naming what to install when it cannot)."""
    from .. import quant
    from ..layers import LoraLayer, LoraLinear

    for f in (fmt, head_fmt or fmt):
        check_shape(torch.empty(0, BLOCK), f)
    head = _head(model)
    if any(quant.is_quantized(m) or getattr(m, "quantized", False) is True for m in model.modules()):
        raise ValueError(f"the model's base is already quantized (bitsandbytes): {fmt} needs float weights; "
                         "load the base in float to quantize it here")
    kernels.load()
    blocks = blocks or {}
    names = {id(m): name for name, m in model.named_modules()}

    def quantized(module: nn.Module) -> QuantLinear:
        weight, name = float_weight(module), names[id(module)]
        act = "fp32" if module is head else None  # the head's logits pick the tokens: float32 activations there
        if name not in blocks:
            return QuantLinear.from_float(weight, module.bias, (head_fmt or fmt) if module is head else fmt, act)
        if blocks[name].shape != tuple(weight.shape):
            raise ValueError(f"blocks[{name!r}] is {blocks[name].shape}, the layer's weight {tuple(weight.shape)}")
        return QuantLinear(blocks[name], module.bias, act=act)

    count = 0
    for module in list(model.modules()):
        if isinstance(module, LoraLinear):
            if module.__dict__.get("int8_base") is None and module.in_features % BLOCK == 0:
                module.__dict__["int8_base"] = quantized(module)  # not a submodule: no new state_dict keys
                count += 1
            continue
        for name, child in list(module.named_children()):
            weight = None if isinstance(child, LoraLayer) else float_weight(child)
            if weight is not None and weight.shape[1] % BLOCK == 0:
                setattr(module, name, quantized(child))
                count += 1
    fuse_siblings(model)
    return count


class _Fused:
    """Sibling layers' weights (q, k and v; gate and up) stored as one block weight, each layer's buffers row
    views of it (no extra memory), so that the first sibling called with an input computes every sibling's
    output in one product and the others slice it (:meth:`part`): one kernel call instead of three, with more
    output rows for the threads to share (SmolLM2 int4 decoding: 7 calls per layer become 4).

    Siblings are matched by identity of their input tensor: the product is kept until each sibling has read its
    part, then dropped. A module whose siblings do not share an input (a new input arrives before the others
    read the last one) turns the sharing off after two such misses, each layer then computing its own rows.
    ``torch.compile`` traces the same: a compiled step calls one product per group, and the cache is empty
    again when the graph returns."""

    def __init__(self, members: list[QuantLinear]) -> None:
        first = members[0]
        self.code, self.isa, self.act, self.count = first.code, first.isa, first.act, len(members)
        self.q = torch.cat([m.q for m in members])
        self.d = torch.cat([m.d for m in members])
        self.m = None if first.m is None else torch.cat([m.m for m in members])
        self.bias = None if first.bias is None else torch.cat([m.bias for m in members])
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.left, self.misses = 0, 0
        lo = 0
        for member in members:
            hi = lo + member.out_features
            member.q, member.d, member.span = self.q[lo:hi], self.d[lo:hi], (lo, hi)
            if self.m is not None:
                member.m = self.m[lo:hi]
            if self.bias is not None:
                member.bias = self.bias[lo:hi]
            member.__dict__["fused"] = self
            lo = hi

    @property
    def shared(self) -> bool:
        return self.misses < 2

    def part(self, x: Tensor, span: tuple[int, int]) -> Tensor:
        if x is not self.x:
            if self.left:  # the last input was not read by every sibling
                self.misses += 1
            self.x, self.left = x, self.count
            self.y = _linear(x, self.q, self.d, self.m, self.bias, self.code, self.isa, self.act)
        y = self.y[..., span[0] : span[1]]
        self.left -= 1
        if self.left == 0:
            self.x = self.y = None
        return y


def fuse_siblings(model: nn.Module) -> int:
    """Give each group of sibling quantized layers (:data:`SIBLINGS`: plain :class:`QuantLinear` children or
    LoRA layers' quantized bases, of one format, code path and activation type, all with a bias or none) one
    shared weight (:class:`_Fused`), in place; returns how many groups. Outputs are unchanged: the same kernel
    computes the same rows."""
    from ..layers import LoraLinear

    def quantized(child: nn.Module | None) -> QuantLinear | None:
        if isinstance(child, LoraLinear):
            child = child.__dict__.get("int8_base")
        return child if isinstance(child, QuantLinear) and "fused" not in child.__dict__ else None

    count = 0
    for module in model.modules():
        children = module._modules
        for names in SIBLINGS:
            members = [quantized(children.get(name)) for name in names]
            if any(m is None for m in members) or len({id(m) for m in members}) < len(members):
                continue
            kinds = {(m.fmt, m.isa, m.act, m.in_features, m.bias is None, m.bias.dtype if m.bias is not None else None)
                     for m in members}
            if len(kinds) == 1:
                _Fused(members)
                count += 1
    return count


def float_weight(module: nn.Module) -> Tensor | None:
    """The ``(out, in)`` float weight of a linear layer (``nn.Linear``, GPT-2's ``Conv1D``, a LoRA linear layer's
    base weight), or None for any other module."""
    from transformers.pytorch_utils import Conv1D

    from ..layers import LoraLayer, LoraLinear

    if isinstance(module, LoraLinear):
        return module.weight.T if module.fan_in_fan_out else module.weight
    if isinstance(module, Conv1D):
        return module.weight.T
    return module.weight if isinstance(module, nn.Linear) and not isinstance(module, LoraLayer) else None


def _head(model: nn.Module) -> nn.Module | None:
    get_head = getattr(model, "get_output_embeddings", None)
    return get_head() if callable(get_head) else None


def quantize_model(model: nn.Module, scheme: str, gguf_file: str | Path | None = None) -> str:
    """``--quantize scheme`` (:data:`SCHEMES`: int8 = q8_0 everywhere, int4 = q4_1 layers and a q8_0 LM head) on
    ``model``, in place, with its adapters attached; returns a one-line summary.

    With ``gguf_file`` (the GGUF the model's float weights were dequantized from), each layer that the file
    stores in a block format of at least the scheme's bits, and whose blocks dequantize exactly to the layer's
    float weight, takes those blocks as they are (:func:`lorakit.quant.gguf.read_blocks`): nothing is lost
    against the file. A layer whose weight differs (merged into, fine-tuned) is quantized from its weight."""
    from .. import quant

    quant.check_quantize(scheme)
    if scheme is None:
        raise ValueError(f"quantize must be one of {tuple(SCHEMES)}, got None")
    fmt, head_fmt = SCHEMES[scheme]
    given: dict[str, BlockWeight] = {}
    if gguf_file is not None:
        from .gguf import read_blocks

        modules, head = dict(model.named_modules()), _head(model)
        for name, block in read_blocks(gguf_file, model).items():
            enough = _BITS[block.fmt] >= _BITS[head_fmt if modules[name] is head else fmt]
            if enough and torch.equal(dequantize(block), float_weight(modules[name]).detach().float()):
                given[name] = block
    count = quantize_linears(model, fmt, head_fmt, given)
    summary = f"--quantize {scheme}: {count} linear layers in {fmt}" + (f", the LM head in {head_fmt}" if head_fmt != fmt else "")
    if gguf_file is not None:
        summary += f"; {len(given)} of them read as they are from {Path(gguf_file).name}"
    return summary
