"""C++ kernels for block-quantized linear layers (:mod:`lorakit.quant.blocks`' formats): float32 activations in
and out, AVX2 + FMA, AVX-512F or AVX-512 VNNI chosen at run time, threads over output rows.

``y = x W^T + b`` with ``W`` read block by block and never written out in float, so a product reads 8.5 (q8_0) or
5 (4-bit) bits per weight instead of fp32's 32: decoding a token reads every weight once, and on a CPU its speed
follows the bytes read. Two ways to multiply (``act``, default ``$LORAKIT_QUANT_ACT`` or int8):

- ``int8``: each row of ``x`` is first rounded to int8 blocks of 32 with a float scale each (GGUF's Q8_1, what
  llama.cpp multiplies its blocks by), and each block's product is an integer dot product of 32 codes (AVX2's
  ``maddubs``, VNNI's ``dpbusd``) scaled once: fewer instructions per weight than decoding it to float, and x's
  rows take a quarter of the cache;
- ``fp32``: each block decoded in registers (``d q + m``, one fused multiply-add per vector) and multiplied by
  float32 ``x``: exact products of the block weights (the reference the int8 path is checked against).

The extension is compiled at first use (:func:`load`) with ``torch.utils.cpp_extension`` from the sources
shipped in ``csrc/``, into a cache folder keyed by the sources, the torch version and the CPU's flags (a
build is never reused on another CPU kind). Without a C++ compiler and ninja, :func:`load` raises one line
saying what to install; there is no silent fallback: the pure-torch path (:func:`lorakit.quant.blocks.
reference_linear`) decodes the whole weight to float32 at each product and is slower than an unquantized
layer, so a caller that cannot build the kernels should keep its float weights instead.

``ninja`` comes from the system (``apt install ninja-build``) or from pip (``ninja``, in ``requirements.txt``
and the ``serve`` / ``quant`` extras), whose binary lands beside the environment's python.
``LORAKIT_QUANT_ISA=avx2`` (or ``avx512``, ``avx512vnni``) forces one code path (tests run each one the CPU has);
``LORAKIT_KERNEL_CACHE`` moves the cache (default ``~/.cache/lorakit/kernels``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import torch
from torch import Tensor

from ..precision import cpu_flags
from .blocks import BlockWeight

__all__ = ["ISAS", "ACTS", "FORMAT_CODES", "load", "cpu_isa", "resolve_isa", "resolve_act", "linear", "cache_dir"]

ISAS = {"avx2": 1, "avx512": 2, "avx512vnni": 3}
ACTS = {"int8": 8, "fp32": 32}
FORMAT_CODES = {"q8_0": 0, "q4_0": 1, "q4_1": 1}  # the kernel's Q8 / Q4 (q4_0 is q4_1 with m = -8 d)
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("quant_ops.cpp", "kernels_avx2.cpp", "kernels_avx512.cpp", "kernels_avx512vnni.cpp")
HEADERS = ("kernels.h", "kernel_impl.h", "simd_avx512.h")
CFLAGS = ("-O3", "-fopenmp")
INSTALL = "install a C++ compiler and ninja (Debian/Ubuntu: apt install g++ ninja-build; or pip install ninja)"


def cache_dir() -> Path:
    """This build's folder: sources, torch version, compiler flags and the CPU's flags in its name."""
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update((CSRC / name).read_bytes())
    digest.update(" ".join((torch.__version__, *CFLAGS, *sorted(cpu_flags()))).encode())
    root = os.environ.get("LORAKIT_KERNEL_CACHE") or Path.home() / ".cache" / "lorakit" / "kernels"
    return Path(root) / f"quant-{digest.hexdigest()[:16]}"


def check_toolchain() -> None:
    """Raise one line naming what to install when the extension cannot be compiled here."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    _find_pip_ninja()
    if shutil.which(compiler) is None:
        raise RuntimeError(f"lorakit's quantized kernels are compiled at first use but no C++ compiler ({compiler}) was "
                           f"found: {INSTALL}, or keep the model's float weights")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError(f"lorakit's quantized kernels are compiled at first use but ninja was not found: {INSTALL}, "
                           "or keep the model's float weights")


def _find_pip_ninja() -> None:
    """Put this environment's scripts folder on PATH when pip's ``ninja`` is there and PATH has none: torch
    runs ``ninja`` from PATH only, and a venv's python run by its path (``.venv/bin/python``, ``make test``)
    does not put ``.venv/bin`` on PATH."""
    scripts = sysconfig.get_path("scripts")
    if shutil.which("ninja") is None and os.access(Path(scripts) / "ninja", os.X_OK):
        os.environ["PATH"] = os.pathsep.join([scripts, *filter(None, [os.environ.get("PATH")])])


@functools.cache
def load() -> None:
    """Compile (first use on this CPU kind) and load the operators ``torch.ops.lorakit_quant.*``."""
    from torch.utils import cpp_extension

    check_toolchain()
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(name=f"lorakit_quant_{folder.name[6:]}", sources=[str(CSRC / s) for s in SOURCES],
                           extra_cflags=list(CFLAGS), extra_ldflags=["-fopenmp"], build_directory=str(folder),
                           is_python_module=False, verbose=False)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(f"building lorakit's quantized kernels in {folder} failed (the compiler's output is above: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); it needs torch's C++ headers "
                           f"and {INSTALL}; or keep the model's float weights") from exc
    if torch.ops.lorakit_quant.cpu_isa() == 0:
        raise RuntimeError("lorakit's quantized kernels need an x86-64 CPU with AVX2, FMA and F16C; "
                           "keep the model's float weights on this CPU")

    @torch.library.register_fake("lorakit_quant::linear")
    def _(x, q, d, m, bias, format, isa, act):  # shapes for torch.compile
        return x.new_empty(*x.shape[:-1], q.shape[0])


def cpu_isa() -> str:
    """The fastest code path this CPU runs: ``avx512vnni``, ``avx512`` or ``avx2``."""
    load()
    return {v: k for k, v in ISAS.items()}[torch.ops.lorakit_quant.cpu_isa()]


@functools.cache
def resolve_isa(isa: str | None = None) -> int:
    """The code path's number: ``isa``, else ``$LORAKIT_QUANT_ISA``, else the CPU's best."""
    isa = isa or os.environ.get("LORAKIT_QUANT_ISA") or "auto"
    if isa == "auto":
        return ISAS[cpu_isa()]
    if isa not in ISAS:
        raise ValueError(f"isa must be 'auto' or one of {tuple(ISAS)}, got {isa!r}")
    if ISAS[isa] > ISAS[cpu_isa()]:
        raise ValueError(f"isa {isa!r} is not supported by this CPU (it runs {cpu_isa()!r})")
    return ISAS[isa]


def resolve_act(act: str | None = None) -> int:
    """How the kernels multiply (:data:`ACTS`): ``act``, else ``$LORAKIT_QUANT_ACT``, else ``int8``."""
    act = act or os.environ.get("LORAKIT_QUANT_ACT") or "int8"
    if act not in ACTS:
        raise ValueError(f"act must be one of {tuple(ACTS)} (--quantize's activations, $LORAKIT_QUANT_ACT), got {act!r}")
    return ACTS[act]


def linear(x: Tensor, weight: BlockWeight, bias: Tensor | None = None, isa: str | None = None,
           act: str | None = None) -> Tensor:
    """``x W^T + b`` for ``x: (..., in)`` of any float dtype, computed in float32; returns ``(..., out)`` in
    ``x``'s dtype. ``weight.d`` / ``weight.m`` may be float16 or the int16 bits of float16 values."""
    load()
    return torch.ops.lorakit_quant.linear(x, weight.q, weight.d, weight.m, bias, FORMAT_CODES[weight.fmt],
                                          resolve_isa(isa), resolve_act(act))
