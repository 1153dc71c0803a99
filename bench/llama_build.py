"""Which llama.cpp build runs on this CPU: the build key of ``bench/build_llama_server.sh`` and ``bench/serve_gen.py``.

ggml is built with ``GGML_NATIVE=OFF`` and each x86 extension switched on only where this CPU has every flag it
compiles with (``OPTIONS``: ggml's ``-m`` flags in ``ggml/src/ggml-cpu/CMakeLists.txt``), so an AVX-512 build is
never run on an AVX2 machine (it dies there with SIGILL). The key names the build folder::

    build-<tier>-<first 8 hex digits of sha256(" ".join(sorted(flags in KEY_FLAGS that the CPU has)))>

``tier`` is ``avx512`` / ``avx2`` / ``base`` (the widest vectors built), for a reader; the hash decides. AMX is
left out of the build (llama-server crashed in ``ggml_backend_amx_mul_mat`` on the first batch on the project's
AMX Xeon) but its flags are in the key, so an AMX CPU never shares a build with one without.
Standard library only: the build script runs it with the system ``python3``.

    python3 bench/llama_build.py key      # e.g. build-avx512-1a2b3c4d
    python3 bench/llama_build.py cmake    # the -DGGML_...=ON/OFF options
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

__all__ = ["OPTIONS", "KEY_FLAGS", "cpu_flags", "cmake_options", "build_key", "binary_key", "default_binary"]

# ggml's CMake option -> the /proc/cpuinfo flags of the instructions it compiles in (all needed).
OPTIONS: dict[str, tuple[str, ...]] = {
    "GGML_SSE42": ("sse4_2",), "GGML_AVX": ("avx",), "GGML_AVX2": ("avx2",), "GGML_BMI2": ("bmi2",),
    "GGML_FMA": ("fma",), "GGML_F16C": ("f16c",), "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512vbmi"),
    "GGML_AVX512_VNNI": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512_vnni"),
    "GGML_AVX512_BF16": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512_bf16"),
}
OFF = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")  # see the module docstring
KEY_FLAGS = frozenset(f for need in OPTIONS.values() for f in need) | {"amx_tile", "amx_int8", "amx_bf16"}


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The flags of the first ``flags`` line of ``cpuinfo`` (empty where it cannot be read)."""
    try:
        lines = Path(cpuinfo).read_text().splitlines()
    except OSError:
        return frozenset()
    return frozenset(next((ln for ln in lines if ln.startswith("flags")), "").partition(":")[2].split())


def cmake_options(flags: frozenset[str] | set[str]) -> list[str]:
    """``-DGGML_X=ON`` for each extension whose flags this CPU has all of, ``OFF`` for the rest."""
    on = [f"-D{name}={'ON' if set(need) <= flags else 'OFF'}" for name, need in OPTIONS.items()]
    return [*on, *(f"-D{name}=OFF" for name in OFF)]


def build_key(flags: frozenset[str] | set[str]) -> str:
    """The build folder's name for a CPU with ``flags`` (only ``KEY_FLAGS`` count)."""
    kept = sorted(KEY_FLAGS & set(flags))
    tier = "avx512" if set(OPTIONS["GGML_AVX512"]) <= flags else "avx2" if "avx2" in flags else "base"
    return f"build-{tier}-{hashlib.sha256(' '.join(kept).encode()).hexdigest()[:8]}"


def binary_key(binary: str | Path) -> str | None:
    """The key of a binary built by the script (``.../<key>/bin/llama-server``), else None."""
    folder = Path(binary).resolve().parent.parent.name
    return folder if folder.startswith("build-") else None


def default_binary(root: Path, key: str) -> Path | None:
    """The llama-server the script built for ``key`` under ``root/runs/llamacpp-src``, if any (the last version in name order)."""
    found = sorted(root.glob(f"runs/llamacpp-src/*/vendor/llama.cpp/{key}/bin/llama-server"))
    return found[-1] if found else None


def main(argv: list[str]) -> int:
    if argv not in (["key"], ["cmake"]):
        print("usage: python3 bench/llama_build.py key|cmake", file=sys.stderr)
        return 2
    flags = cpu_flags()
    print(build_key(flags) if argv == ["key"] else " ".join(cmake_options(flags)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
