"""Numeric precision of training and inference: fp32, or bf16 autocast where the
hardware has native bf16 (CUDA GPUs with it; CPUs with AVX-512 BF16 or AMX). On a CPU
without them (e.g. AVX2-only) bf16 matmuls are emulated and run 20-100x slower than fp32."""

from __future__ import annotations

import contextlib
import functools
import platform
import warnings
from pathlib import Path

import torch

__all__ = ["precision_context", "native_bf16", "resolve_precision", "cpu_flags", "cpu_model", "cpu_features", "PRECISIONS"]

PRECISIONS = ("fp32", "bf16", "auto")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


@functools.cache
def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The flags that decide which kernels run fast (and so which figures a run can be compared with).
_SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                "amx_int8", "avx_vnni")


def cpu_features() -> list[str]:
    """Of the flags that decide which kernels run fast, those this CPU has."""
    flags = cpu_flags()
    return [f for f in _SPEED_FLAGS if f in flags]


def native_bf16(device: torch.device = torch.device("cpu")) -> bool:
    """True where bf16 matmuls run in hardware on ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_precision(precision: str, device: torch.device = torch.device("cpu"), quantized: bool = False) -> str:
    """``auto`` -> bf16 where native, else fp32; a forced bf16 without hardware support warns.

    ``quantized``: the base's linear layers are block-quantized (``--quantize``), whose kernels compute in
    fp32 from any activations: ``auto`` is fp32 then, as bf16 activations only add conversions around every
    product (``lorakit serve --quantize int4``, 32 clients, Zen 4: 154 tokens/s in bf16, 197 in fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) and not quantized else "fp32"
    if precision == "bf16" and not native_bf16(device):
        warnings.warn(f"bf16 on a {device.type} without native bf16 is emulated and much slower than fp32 "
                      "(20-100x on AVX2-only CPUs); use --precision fp32 or auto", stacklevel=2)
    return precision


def precision_context(precision: str, device: torch.device = torch.device("cpu")):
    """bf16 autocast (on CPUs: AMX / AVX-512 bf16 matmuls) or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
