"""A run's optimizer steps: how many (epochs or ``max_steps``), what each one holds (gradient
accumulation), and after which ones the run evaluates, saves a checkpoint and logs.

Gradient accumulation (transformers >= 4.46 semantics): an optimizer step takes ``N`` micro-batches
of ``batch_size`` rows per process. The loss of every micro-batch is normalised by the number of
loss terms ``U`` of the whole step, over every micro-batch and process (completion tokens for a
causal LM, rows for a classifier), so the step's gradient is that of

    L = (1 / U) sum_{micro-batch i, process r} u_ir * mean_ir,

the mean over the step's tokens: the gradient of one batch ``N`` times larger. Every process counts
``U`` from the rows of the global step it already holds (no collective). Under DDP the gradients
are synchronised in the last micro-step only (``no_sync`` before it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..distributed import World, gradient_sync, shard_rows
from ..precision import precision_context

__all__ = ["Plan", "accumulate", "micro_batches"]


@dataclass(frozen=True)
class Plan:
    """The optimizer steps of a run. Steps are counted over the whole run from 1 (``step`` below:
    the number of steps done), as transformers' ``global_step``."""

    rows_per_step: int  # global rows in one optimizer step: batch size x processes x accumulation steps
    micro_rows: int  # global rows in one forward/backward pass: batch size x processes
    steps_per_epoch: int
    total_steps: int
    eval_steps: int = 0  # 0: evaluate at the end of every epoch
    save_steps: int = 0  # 0: checkpoints at epoch ends only
    logging_steps: int | None = None

    @classmethod
    def of(cls, cfg: Any, train_rows: int, processes: int) -> Plan:
        """The plan of a :class:`lorakit.train.TrainConfig` over ``train_rows`` rows."""
        micro = cfg.batch_size * processes
        per_step = micro * cfg.gradient_accumulation_steps
        steps_per_epoch = math.ceil(train_rows / per_step)
        return cls(per_step, micro, steps_per_epoch, cfg.max_steps or steps_per_epoch * cfg.epochs, cfg.eval_steps,
                   cfg.save_steps, cfg.logging_steps)

    @property
    def epochs(self) -> int:
        """Epochs begun: ``max_steps`` may end the last one early."""
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def steps_in(self, epoch: int) -> int:
        """Optimizer steps of ``epoch`` (0-based)."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    def evaluates(self, step: int, epoch_end: bool) -> bool:
        """Whether the run evaluates after ``step``: at epoch ends, or every ``eval_steps`` and at the end."""
        if not self.eval_steps:
            return epoch_end
        return step % self.eval_steps == 0 or step == self.total_steps

    def saves(self, step: int, epoch_end: bool) -> bool:
        """Whether a checkpoint follows ``step`` within an epoch (every epoch end has one anyway)."""
        return bool(self.save_steps) and step % self.save_steps == 0 and not epoch_end

    def logs(self, step: int) -> bool:
        return self.logging_steps is not None and step % self.logging_steps == 0


def micro_batches(rows: list[int], size: int) -> list[list[int]]:
    """``rows`` (one optimizer step's) cut into micro-batches of ``size`` rows (the last may be shorter)."""
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def accumulate(loss_fn: nn.Module, task: Any, split: Any, rows: list[int], micro_rows: int, world: World,
               precision: str) -> list[tuple[float, float, int]]:
    """Forward and backward passes over one optimizer step's global ``rows``, gradients summed in
    the parameters (see the module doc); ``loss_fn`` may be DDP-wrapped. Returns, per micro-batch,
    this process's mean loss, the loss shown for it (the unsmoothed one of a causal LM) and its rows
    (0 for a process left without any)."""
    parts = micro_batches(rows, micro_rows)
    total = task.loss_units(split, rows)
    done = []
    for i, part in enumerate(parts):
        mine, share = shard_rows(part, world)
        units = task.loss_units(split, mine) if share else 0
        batch = task.collate(split, mine)
        with gradient_sync(loss_fn, i == len(parts) - 1):
            with precision_context(precision, world.device):
                loss = loss_fn(**{k: v.to(world.device) for k, v in batch.items()})
            # DDP averages over processes: world.size undoes that, units / total weighs by loss terms
            (loss * (world.size * units / total)).backward()
        value = loss.item()
        reported = getattr(getattr(loss_fn, "module", loss_fn), "reported", None)  # unsmoothed (causal LMs)
        done.append((value, value if reported is None else reported.item(), len(mine) if share else 0))
    return done
