"""Multi-process training on torch.distributed (DDP), launched by ``torchrun`` or
``accelerate launch``: both set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous variables that ``init_process_group("env://")`` reads.

Without those variables everything here is a no-op for one process, so the trainer
has one code path. CPU processes talk through gloo, GPU processes through NCCL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["World", "setup", "shard_rows"]


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Only the main process writes logs, checkpoints and weights, and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` from every process, in rank order (a one-item list for one process)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        """True on every process if ``flag`` is true on any."""
        if not self.distributed:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def setup() -> World:
    """The process group from the launcher's environment (once), else one process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(device=torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), device)


def shard_rows(batch: list[int], world: World) -> tuple[list[int], float]:
    """This process's rows of a global batch, and the factor for its mean loss.

    Rows are dealt round-robin. DDP averages gradients over processes, so each
    process's mean loss is scaled by ``world.size * len(rows) / len(batch)``: the
    average is then the global batch's mean loss even when the rows do not divide
    evenly. A process left without rows takes one with weight 0 (DDP needs every
    process in every step).
    """
    rows = batch[world.rank :: world.size]
    if not rows:
        return batch[:1], 0.0
    return rows, world.size * len(rows) / len(batch)
