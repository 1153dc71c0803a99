"""bitsandbytes bases: LoRA on ``Linear4bit`` (nf4 / fp4, double quantization, any compute dtype) and
``Linear8bitLt`` (LLM.int8), as PEFT's ``tuners/lora/bnb.py`` adapts them.

lorakit adopts each such layer (:func:`adopt`: its class becomes the subclass below, in place; parameters,
state-dict keys and ``isinstance`` checks stay bitsandbytes'), so that on a CPU it computes::

    y = x W^T + b,   W = dequant(W_q) in the compute dtype (the autocast dtype under autocast)

from the true weights, in training and inference alike: the function the adapter was trained against.
bitsandbytes 0.50 itself, on CPUs with AVX-512 BF16 (Zen 4, AMX Xeons), repacks a 4-bit weight in place at
the first forward in eval mode without autograd and computes in bf16 from then on, whatever its compute
dtype; the repacked block scales are rounded to bf16 and ``dequantize_4bit`` of the repacked weight is
garbage. Adopted layers never repack, and :meth:`dequantize` (what merging reads) gives the true weights.
Off the CPU (CUDA) the forward is bitsandbytes' own, fused kernels included.

Between the forward and the backward only the quantized weight is kept: the backward dequantizes again
(as bitsandbytes does), so training holds 4 (or 8) bits per frozen weight plus one layer's
dequantized matrix at a time. On CPU that matrix is decoded into one scratch buffer per thread and
dtype, reused by every layer: a fresh 67 MB tensor per product (what bitsandbytes allocates) costs
its page faults at every call (measured: dequantizing 8192 x 2048 weights 47 ms into the buffer, 124 ms
into a new tensor) and leaves the heap fragmented (peak RSS of a 1.7B-shape step 3.5 GB against
1.9 GB live).
"""

from __future__ import annotations

import ctypes
import threading
import warnings

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Linear4bit", "Linear8bitLt", "adopt", "adopt_all", "is_bnb_linear", "dequantize_4bit",
           "dequantize_4bit_reference", "dequantize_model", "quantize_type", "RepackedWeightWarning"]


class RepackedWeightWarning(UserWarning):
    """A 4-bit layer had been repacked by bitsandbytes for its CPU bf16 kernel before lorakit adopted it:
    its block scales were rounded to bf16 then, so the weights lorakit computes with are those rounded ones."""


def is_bnb_linear(module: nn.Module) -> bool:
    return isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)


def quantize_type(module: nn.Module) -> str:
    """``nf4``, ``fp4`` or ``bnb-int8``: how ``module`` stores its weight (its ``--quantize-base`` value)."""
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "bnb-int8"
    return module.weight.quant_state.quant_type


# ---- dequantization ------------------------------------------------------------------------------


def _absmax(state) -> Tensor:
    """Each 4-bit block's scale in float32; with double quantization they are themselves 8-bit codes
    of blocks of 256, plus an offset (QLoRA section 3). The op bitsandbytes' own forward calls, not
    ``functional.dequantize_blockwise``, which takes ~20 ms per 16M weights on CPU for the same values."""
    if not state.nested:
        return state.absmax.float()
    s2 = state.state2
    absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(state.absmax, s2.absmax, s2.code, s2.blocksize,
                                                                  torch.float32)
    return absmax + state.offset


def dequantize_4bit(weight: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``W = code[q] * absmax[block]``, ``(out, in)``, in ``dtype`` (bitsandbytes' kernel: each value
    formed in float32 and rounded to ``dtype`` once)."""
    state = weight.quant_state
    rows, cols = state.shape
    if weight.device.type == "cpu" and cols % state.blocksize:
        # bitsandbytes 0.50's CPU kernel counts blocks per row: wrong where a block spans two rows.
        return dequantize_4bit_reference(weight, dtype)
    return torch.ops.bitsandbytes.dequantize_4bit.default(weight.data, _absmax(state), state.blocksize,
                                                          state.quant_type, [rows, cols], dtype)


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_scratch = threading.local()


def _scratch_buffer(shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """This thread's reusable buffer for a dequantized weight (grown to the largest layer seen)."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    numel = shape[0] * shape[1]
    if dtype not in buffers or buffers[dtype].numel() < numel:
        buffers[dtype] = None  # the old one freed before the larger one is made
        buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buffers[dtype][:numel].view(shape)


def _cpu_kernel(state, dtype: torch.dtype):
    """bitsandbytes' CPU decode function writing into a given buffer, where it applies (else None): the
    kernel behind ``torch.ops.bitsandbytes.dequantize_4bit`` on CPU, which allocates its output."""
    from bitsandbytes.cextension import lib

    name = f"cdequantize_blockwise_cpu_{state.quant_type}_{_DTYPE_NAMES.get(dtype)}"
    if state.shape[1] % state.blocksize or state.blocksize >= 2048:  # where bitsandbytes itself avoids it
        return None
    return getattr(lib, name, None)


def _dequantize_4bit_scratch(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """:func:`dequantize_4bit` into this thread's scratch buffer (CPU): valid until the next call."""
    state = weight.quant_state
    kernel = _cpu_kernel(state, dtype) if weight.device.type == "cpu" else None
    if kernel is None:
        return dequantize_4bit(weight, dtype)
    rows, cols = state.shape
    out = _scratch_buffer((rows, cols), dtype)
    packed = weight.data.contiguous().view(torch.uint8)
    absmax = _absmax(state).contiguous()
    kernel(ctypes.c_void_p(packed.data_ptr()), ctypes.c_void_p(absmax.data_ptr()), ctypes.c_void_p(out.data_ptr()),
           ctypes.c_longlong(state.blocksize), ctypes.c_longlong(rows), ctypes.c_longlong(cols))
    return out


def dequantize_4bit_reference(weight: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The same decode written out in torch: two 4-bit codes per byte (high nibble first, row-major
    ``(out, in)``), looked up in the 16-value nf4 / fp4 table, times their block's absmax."""
    state = weight.quant_state
    rows, cols = state.shape
    packed = weight.data.contiguous().view(torch.uint8).reshape(-1)
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[: rows * cols].long()
    values = state.code.to(packed.device)[codes]
    pad = -values.numel() % state.blocksize
    values = F.pad(values, (0, pad)).view(-1, state.blocksize) * _absmax(state)[:, None]
    return values.reshape(-1)[: rows * cols].view(rows, cols).to(dtype)


def _dequantize_8bit(module: Linear8bitLt, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """``W = CB * SCB / 127``: int8 rows times each row's absmax, as bitsandbytes' CPU training path
    (``MatMul8bitFp``) forms it; into ``out`` if given."""
    scb = module.SCB
    weight = module.weight.data.to(dtype) if out is None else out.copy_(module.weight.data)
    return weight.mul_(scb.unsqueeze(1).mul(1.0 / 127.0))


# ---- the forward ----------------------------------------------------------------------------------


def _compute_dtype(module: nn.Module, x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):  # --precision bf16: the product in bf16, as for a float base
        return torch.get_autocast_dtype(x.device.type)
    return getattr(module, "compute_dtype", None) or x.dtype


class _DequantizedLinear(torch.autograd.Function):
    """``y = x W^T + b`` with ``W = module.dequantize(dtype)`` formed in the forward and again in the
    backward (into the scratch buffer, which no tensor outlives); ``y`` in ``x``'s dtype (as
    bitsandbytes returns it). Only the module is kept in between."""

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, module: nn.Module, dtype: torch.dtype) -> Tensor:
        ctx.module, ctx.dtype, ctx.x_dtype = module, dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        with torch.autocast(x.device.type, enabled=False):
            out = F.linear(x.to(dtype), module._scratch_weight(dtype), None if bias is None else bias.to(dtype))
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad.to(ctx.dtype) @ ctx.module._scratch_weight(ctx.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None, None


class Linear4bit(bnb.nn.Linear4bit):
    """bitsandbytes' 4-bit linear layer computing from its true weights in its compute dtype on CPU."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            return super().forward(x)  # bitsandbytes' own CUDA kernels (never repacks off the CPU)
        return _DequantizedLinear.apply(x, self.bias, self, _compute_dtype(self, x))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight, ``(out, in)``, in ``dtype``."""
        return dequantize_4bit(self.weight, dtype)

    def _scratch_weight(self, dtype: torch.dtype) -> Tensor:
        return _dequantize_4bit_scratch(self.weight, dtype)


class Linear8bitLt(bnb.nn.Linear8bitLt):
    """bitsandbytes' LLM.int8 layer computing ``x (CB * SCB / 127)^T + b`` on CPU in training and in
    inference alike (bitsandbytes' CPU inference path, an int8 product with outlier columns, differs
    from what training saw)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        return _DequantizedLinear.apply(x, self.bias, self, _compute_dtype(self, x))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight, ``(out, in)``, in ``dtype``."""
        return _dequantize_8bit(self, dtype)

    def _scratch_weight(self, dtype: torch.dtype) -> Tensor:
        out = _scratch_buffer((self.out_features, self.in_features), dtype) if self.weight.device.type == "cpu" else None
        return _dequantize_8bit(self, dtype, out)

    # bitsandbytes' state dict holds "<prefix>SCB" and "<prefix>weight_format" beside the weight: named here
    # too, so that tools mapping state-dict keys to attributes (torch.distributed.checkpoint's
    # get_model_state_dict, which lorakit train's checkpoints use) find them.
    @property
    def SCB(self) -> Tensor | None:
        return self.weight.SCB if getattr(self.weight, "SCB", None) is not None else self.state.SCB

    @property
    def weight_format(self) -> Tensor:
        return torch.tensor(0, dtype=torch.uint8)  # row-major, as bitsandbytes writes it


# ---- adopting --------------------------------------------------------------------------------------


def adopt(module: nn.Module) -> nn.Module:
    """Give a bitsandbytes linear layer lorakit's forward (in place: its class becomes the subclass above);
    other modules are returned unchanged."""
    if isinstance(module, Linear4bit | Linear8bitLt) or not is_bnb_linear(module):
        return module
    if isinstance(module, bnb.nn.Linear8bitLt):
        if module.state.has_fp16_weights or module.weight.dtype != torch.int8:
            raise ValueError("lorakit adapts Linear8bitLt layers holding int8 weights (has_fp16_weights=False, as "
                             "transformers' load_in_8bit loads them), not 16-bit ones")
        module.__class__ = Linear8bitLt
        return module
    if getattr(module.weight, "quant_state", None) is None:
        raise ValueError("lorakit adapts 4-bit layers once quantized (loaded with BitsAndBytesConfig, or moved with "
                         ".to(device)); this Linear4bit has no quant_state yet")
    if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
        _unpack(module)
    module.support_avx512bf16_for_cpu = False  # bitsandbytes' own forward (super().forward) never repacks it now
    module.__class__ = Linear4bit
    return module


def adopt_all(model: nn.Module) -> int:
    count = 0
    for module in model.modules():
        if is_bnb_linear(module) and not isinstance(module, Linear4bit | Linear8bitLt):
            adopt(module)
            count += 1
    return count


def _unpack(module: bnb.nn.Linear4bit) -> None:
    """Undo bitsandbytes' CPU repacking of a 4-bit weight: the codes come back exactly; the block scales
    stay the bf16-rounded ones (the float32 originals are gone), in float32, single-level."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    state = module.weight.quant_state
    rows, cols = state.shape
    absmax = state.absmax.T.reshape(-1).float()  # stored (cols / blocksize, rows) in bf16 by the repacking
    state.original_nested = False  # keep the scales as they are rather than quantizing them once more
    module.weight.data, state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
    state.absmax, state.nested = absmax, False
    warnings.warn(f"a {rows}x{cols} 4-bit layer had been repacked by bitsandbytes for its CPU bf16 kernel (a forward in "
                  "eval mode without autograd) before lorakit adopted it, which rounded its block scales to bf16: "
                  "lorakit computes with those rounded weights. Adopt or adapt the model before any such forward "
                  "(lorakit.add_lora, lorakit.quant.adopt_all) to keep the loaded ones", RepackedWeightWarning,
                  stacklevel=4)


# ---- whole models ----------------------------------------------------------------------------------


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every bitsandbytes linear layer of ``model`` by an ``nn.Linear`` holding its true weights
    in ``dtype`` and drop the model's quantization config (a plain model again); returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if not is_bnb_linear(module):
            continue
        adopt(module)
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        plain.weight = nn.Parameter(module.dequantize(torch.float32).to(dtype), requires_grad=False)
        if module.bias is not None:
            plain.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=module.bias.requires_grad)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, plain.train(module.training))
        count += 1
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return count
