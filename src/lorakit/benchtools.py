"""Benchmark helpers: interleaved timing, ratios measured in one run, JSON records.

Absolute times drift on a shared machine, so every figure that matters is a ratio of
cases timed in alternation within one process: round ``i`` runs every case once (in a
rotated order), and a ratio is the median over rounds of the per-round ratio.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .precision import cpu_features, cpu_model, native_bf16

__all__ = ["BenchmarkMismatch", "environment", "interleave", "median_ratio", "summarize", "write_record", "check_close"]


class BenchmarkMismatch(RuntimeError):
    """The cases of a benchmark do not compute the same thing: no timing is reported."""


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment() -> dict[str, Any]:
    """Versions and hardware, for every record."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("lorakit", "torch", "transformers", "peft", "safetensors"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_sha": _git("rev-parse", "HEAD"), "git_dirty": None if dirty is None else bool(dirty),
            "versions": versions, "python": platform.python_version(), "cpu": cpu_model(), "cpu_flags": cpu_features(),
            "cpu_bf16": native_bf16(), "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}


def interleave(cases: dict[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each case, ``repeats`` rounds, the cases alternating."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            start = time.perf_counter()
            cases[name]()
            samples[name].append(time.perf_counter() - start)
    return samples


def median_ratio(samples: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of ``time(a) / time(b)``."""
    return statistics.median(x / y for x, y in zip(samples[a], samples[b]))


def summarize(samples: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    return {name: {"median_s": statistics.median(s), "samples_s": s} for name, s in samples.items()}


def check_close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = 1e-4, atol: float = 1e-4) -> None:
    """Refuse to time cases whose outputs differ."""
    if a.shape != b.shape or not torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol):
        diff = (a.float() - b.float()).abs().max().item() if a.shape == b.shape else float("nan")
        raise BenchmarkMismatch(f"{what}: outputs differ (max abs diff {diff:.3g}); refusing to report timings")


def write_record(name: str, config: dict[str, Any], results: dict[str, Any], out_dir: str | Path = "bench/results") -> Path:
    """``<out_dir>/<name>.json``: config, environment and results of one benchmark run."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    record = {"name": name, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": config,
              "environment": environment(), "results": results}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
