"""Learning-rate schedules: transformers' ``get_scheduler`` (what a Trainer user names), and the
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
"""

from __future__ import annotations

import torch

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


def create_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup: int, total: int
                     ) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule ``name`` over ``total`` optimizer steps with ``warmup`` warm-up steps."""
    check_scheduler(name)
    if name == LEGACY:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, legacy_linear(warmup, total))
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
