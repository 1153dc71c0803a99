"""Learning-rate schedules: those of transformers' ``get_scheduler`` (what a Trainer user names), and the
schedule lorakit used before it, kept so that runs started then resume bit-identically.

A schedule multiplies each parameter group's own learning rate (LoRA+'s two rates alike) by a
factor ``f(s)`` at optimizer step ``s`` (0-based), over ``T`` steps with ``w`` warm-up steps:

- ``linear`` (transformers): ``f = s / w`` while ``s < w``, then ``(T - s) / (T - w)``;
- ``cosine``, ``cosine_with_restarts`` (one cycle, as transformers' default), ``polynomial``
  (power 1, down to 1e-7), ``constant`` (no warm-up), ``constant_with_warmup``: as
  ``transformers.get_scheduler`` defines them;
- ``legacy_linear``: lorakit's own schedule before ``--lr-scheduler`` existed: ``f = (s + 1) / (w + 1)``
  while ``s < w`` (never 0), then ``(T - s) / (T - w)`` as ``linear``. Runs whose configuration
  predates the field recorded it (:data:`lorakit.checkpoint.PREDATED`).

The transformers schedules are written out here, factor for factor as ``transformers.optimization``
computes them (LambdaLR over a ``functools.partial``: the same scheduler state in checkpoints), rather
than imported: ``from transformers import get_scheduler`` imports ``transformers.trainer_utils``, which
imports PEFT where it is installed, and PEFT bitsandbytes and torch's inductor, about 4 s of CPU in every
process of a run. tests/test_schedule.py holds each one to ``get_scheduler`` at every step of a real run.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["SCHEDULERS", "LEGACY", "check_scheduler", "create_scheduler", "legacy_linear"]

LEGACY = "legacy_linear"
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", LEGACY)


def check_scheduler(name: str) -> None:
    if name not in SCHEDULERS:
        raise ValueError(f"lr_scheduler must be one of {', '.join(SCHEDULERS)}; got {name!r}")


def legacy_linear(warmup: int, total: int):
    """lorakit's schedule before transformers' (see the module doc): the factor at step ``s``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _constant(_=None):
    return 1


def _warmup(step: int, warmup: int) -> float:
    return float(step) / float(max(1, warmup))


def _constant_with_warmup(step: int, *, num_warmup_steps: int) -> float:
    if step < num_warmup_steps:
        return float(step) / float(max(1.0, num_warmup_steps))
    return 1.0


def _linear(step: int, *, num_warmup_steps: int, num_training_steps: int) -> float:
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    return max(0.0, float(num_training_steps - step) / float(max(1, num_training_steps - num_warmup_steps)))


def _progress(step: int, warmup: int, total: int) -> float:
    return float(step - warmup) / float(max(1, total - warmup))


def _cosine(step: int, *, num_warmup_steps: int, num_training_steps: int, num_cycles: float) -> float:
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    progress = _progress(step, num_warmup_steps, num_training_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))


def _cosine_with_restarts(step: int, *, num_warmup_steps: int, num_training_steps: int, num_cycles: int) -> float:
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    progress = _progress(step, num_warmup_steps, num_training_steps)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))


def _polynomial(step: int, *, num_warmup_steps: int, num_training_steps: int, lr_end: float, power: float, lr_init: float):
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    if step > num_training_steps:
        return lr_end / lr_init  # as LambdaLR multiplies by lr_init
    pct_remaining = 1 - (step - num_warmup_steps) / (num_training_steps - num_warmup_steps)
    return ((lr_init - lr_end) * pct_remaining**power + lr_end) / lr_init


def _factor(name: str, optimizer: torch.optim.Optimizer, warmup: int, total: int):
    """transformers' factor for ``name`` with get_scheduler's defaults (one cosine half-wave, one restart cycle,
    polynomial power 1 down to 1e-7 of the optimizer's default rate)."""
    steps = dict(num_warmup_steps=warmup, num_training_steps=total)
    if name == "constant":
        return _constant
    if name == "constant_with_warmup":
        return partial(_constant_with_warmup, num_warmup_steps=warmup)
    if name == "linear":
        return partial(_linear, **steps)
    if name == "cosine":
        return partial(_cosine, **steps, num_cycles=0.5)
    if name == "cosine_with_restarts":
        return partial(_cosine_with_restarts, **steps, num_cycles=1)
    lr_init, lr_end = optimizer.defaults["lr"], 1e-7
    if not (lr_init > lr_end):
        raise ValueError(f"lr_end ({lr_end}) must be smaller than initial lr ({lr_init})")
    return partial(_polynomial, **steps, lr_end=lr_end, power=1.0, lr_init=lr_init)


def create_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup: int, total: int
                     ) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule ``name`` over ``total`` optimizer steps with ``warmup`` warm-up steps."""
    check_scheduler(name)
    if name == LEGACY:
        return LambdaLR(optimizer, legacy_linear(warmup, total))
    return LambdaLR(optimizer, _factor(name, optimizer, warmup, total))
