"""Block-quantized weights in GGUF's layouts, in plain torch: the reference the C++ kernels
(:mod:`lorakit.quant.kernels`) are tested against.

A weight ``W: (out, in)`` is cut into blocks of 32 consecutive inputs of one output row; block ``b`` of
row ``o`` stores codes ``q`` and float16 factors ``d`` (and ``m``)::

    W[o, 32 b + j] = d[o, b] * q[o, 32 b + j] + m[o, b]

- ``q8_0`` (GGUF Q8_0): ``q`` int8 in [-127, 127], ``d = max|w| / 127``, ``m = 0``; 34 bytes per 32 weights.
- ``q4_1`` (GGUF Q4_1): ``q`` in [0, 15], ``m = min w``, ``d = (max w - m) / 15``; 20 bytes per 32 weights.
- ``q4_0`` (GGUF Q4_0): ``q`` in [0, 15], ``d = e / -8`` for the block's weight ``e`` of largest magnitude,
  ``m = -8 d`` (exact in float16), so one kernel computes both 4-bit formats; 18 bytes in GGUF, 20 here
  (``m`` is stored).

4-bit codes are packed two per byte as GGUF does: byte ``j`` of a block's 16 holds element ``j`` in its low
nibble and element ``j + 16`` in its high one, so GGUF blocks load as they are. Rounding a weight to its
block's grid moves it by at most ``|d| / 2`` (``|d|`` for ``q4_0``, whose grid reaches ``-8 d`` but only ``7 d``),
plus the float16 rounding of ``d`` and ``m``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BLOCK", "FORMATS", "Format", "BlockWeight", "quantize", "dequantize", "round_activations", "reference_linear",
           "pack_nibbles", "unpack_nibbles"]

BLOCK = 32
Format = Literal["q8_0", "q4_0", "q4_1"]
FORMATS: tuple[str, ...] = ("q8_0", "q4_0", "q4_1")


class BlockWeight(NamedTuple):
    """One quantized ``(out, in)`` weight: ``q`` int8 ``(out, in)`` (q8_0) or uint8 ``(out, in / 2)`` (4-bit,
    packed), ``d`` and ``m`` float16 ``(out, in / 32)`` (``m`` None for q8_0)."""

    fmt: str
    q: Tensor
    d: Tensor
    m: Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.d.shape[1] * BLOCK

    def nbytes(self) -> int:
        """Bytes a product reads: codes and factors."""
        return sum(t.numel() * t.element_size() for t in (self.q, self.d, self.m) if t is not None)


def check_shape(weight: Tensor, fmt: str) -> None:
    """``weight`` is a 2-D ``(out, in)`` matrix with ``in`` a multiple of 32 and ``fmt`` one of :data:`FORMATS`."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if weight.dim() != 2 or weight.shape[1] % BLOCK:
        raise ValueError(f"block quantization needs a 2-D weight whose in_features is a multiple of {BLOCK}, got shape "
                         f"{tuple(weight.shape)}; keep this layer in full precision")


@torch.no_grad()
def quantize(weight: Tensor, fmt: Format) -> BlockWeight:
    """``weight: (out, in)`` rounded to ``fmt``'s blocks (the nearest code given the float16 factors)."""
    check_shape(weight, fmt)
    out, inp = weight.shape
    w = weight.detach().float().reshape(out, inp // BLOCK, BLOCK)
    if fmt == "q8_0":
        d = (w.abs().amax(-1) / 127).half()
        q = _codes(w, d.float(), torch.zeros_like(d, dtype=torch.float32), -127, 127).to(torch.int8)
        return BlockWeight(fmt, q.reshape(out, inp), d, None)
    if fmt == "q4_1":
        m = w.amin(-1).half()
        d = ((w.amax(-1) - m.float()) / 15).half()
    else:  # q4_0
        extreme = w.gather(-1, w.abs().argmax(-1, keepdim=True)).squeeze(-1)
        d = (extreme / -8).half()
        m = d * -8
    q = _codes(w, d.float(), m.float(), 0, 15).to(torch.uint8)
    return BlockWeight(fmt, pack_nibbles(q.reshape(out, inp)), d, m)


def _codes(w: Tensor, d: Tensor, m: Tensor, low: int, high: int) -> Tensor:
    """Nearest codes ``(w - m) / d`` of ``w: (out, blocks, 32)``, 0 where a block is all one value (d = 0)."""
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    return torch.round((w - m[..., None]) * inv[..., None]).clamp(low, high)


def pack_nibbles(q: Tensor) -> Tensor:
    """4-bit codes ``(out, in)`` -> ``(out, in / 2)`` bytes in GGUF's order (element j low, j + 16 high)."""
    out, inp = q.shape
    blocks = q.reshape(out, inp // BLOCK, BLOCK).to(torch.uint8)
    return (blocks[..., :16] | (blocks[..., 16:] << 4)).reshape(out, inp // 2)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_nibbles`: ``(out, in / 2)`` bytes -> ``(out, in)`` codes in [0, 15]."""
    out, half = packed.shape
    blocks = packed.reshape(out, half // 16, 16)
    return torch.cat([blocks & 15, blocks >> 4], dim=-1).reshape(out, half * 2)


def dequantize(weight: BlockWeight) -> Tensor:
    """The float32 ``(out, in)`` weight that ``weight`` stands for: ``d q + m`` per block."""
    out, inp = weight.shape
    codes = weight.q.float() if weight.fmt == "q8_0" else unpack_nibbles(weight.q).float()
    blocks = codes.reshape(out, inp // BLOCK, BLOCK) * weight.d.float()[..., None]
    if weight.m is not None:
        blocks = blocks + weight.m.float()[..., None]
    return blocks.reshape(out, inp)


def round_activations(x: Tensor) -> Tensor:
    """``x: (..., in)`` as the kernels' int8 activations see it (float32): each block of 32 rounded to
    ``xs * q`` with ``xs = max|x| / 127`` and ``q = round(x * 127 / max|x|)`` (ties to even), an integer in
    [-127, 127]; GGUF's Q8_1, which llama.cpp multiplies its weight blocks by."""
    blocks = x.float().reshape(*x.shape[:-1], -1, BLOCK)
    top = blocks.abs().amax(-1, keepdim=True)
    inv = torch.full_like(top, 127.0) / top  # (not 127 / top: torch computes that as 127 * (1 / top), an ulp off)
    codes = torch.round(blocks * torch.where(top > 0, inv, torch.zeros_like(top)))
    return (codes * (top / 127)).reshape(x.shape)


def reference_linear(x: Tensor, weight: BlockWeight, bias: Tensor | None = None, act: str = "fp32") -> Tensor:
    """``x W^T + b`` in float32 with ``W = dequantize(weight)`` and, with ``act="int8"``, ``x`` rounded as
    :func:`round_activations` does: what the kernels compute, up to summation order."""
    x = round_activations(x) if act == "int8" else x.float()
    return F.linear(x, dequantize(weight), None if bias is None else bias.float())
