"""Multi-process training on torch.distributed (DDP), launched by ``torchrun`` or
``accelerate launch``: both set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous variables that ``init_process_group("env://")`` reads.

Without those variables everything here is a no-op for one process, so the trainer
has one code path. CPU processes talk through gloo, GPU processes through NCCL.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["World", "setup", "shard_rows", "gradient_sync", "fully_shard_model", "full_parameters", "swapped_parameters",
           "reshard", "is_sharded", "as_forward"]


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
        atexit.register(_close)
    return World(dist.get_rank(), dist.get_world_size(), device)


def _close() -> None:
    """At exit, let gloo's worker threads finish before the interpreter does.

    A gloo worker releases a finished collective's tensors after waking the caller, and
    needs the GIL for it; if the interpreter is already finalizing, that thread exits
    inside C++ code and the process aborts ("terminate called without an active
    exception") after all its work is done. Sleeping releases the GIL to them.
    """
    if dist.is_initialized():
        time.sleep(0.05)
        dist.destroy_process_group()


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


@contextlib.contextmanager
def gradient_sync(module: nn.Module, sync: bool) -> Iterator[None]:
    """Forward and backward passes within the block synchronise gradients across processes only
    if ``sync``: a DDP module's ``no_sync()`` otherwise (gradient accumulation: DDP all-reduces
    the summed gradients in the last micro-step). A no-op for other modules; FSDP2 reduces each
    micro-step's gradients into the shards, which sum them."""
    if sync or not hasattr(module, "no_sync"):
        yield
        return
    with module.no_sync():
        yield


def fully_shard_model(model: nn.Module) -> list[str]:
    """FSDP2: shard every transformer block (the model's ``_no_split_modules`` classes), each
    weight matrix inside a block as a unit of its own, and the rest of the model across the
    processes; returns the sharded block classes.

    FSDP2 shards parameter by parameter, so a unit may hold frozen base weights and trainable
    LoRA factors side by side (FSDP1's flat parameters required one ``requires_grad`` per
    wrapped module). A unit's gather holds its whole weights, plus the gather's own buffers, for
    the time of its forward and backward: one matrix per unit keeps that to one matrix, not a
    block's seven. The frozen weights outside the blocks (embeddings, final norm, a tied output
    layer) are replicated, not sharded: they belong to the root unit, which FSDP keeps gathered
    from its forward to the end of its backward, so sharding them would save nothing at a step's
    peak and add a gather of the largest matrix (measured in bench/fsdp_memory.py).
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    blocks = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in blocks]
    if not found:
        raise ValueError(f"--fsdp: {type(model).__name__} names no transformer blocks (_no_split_modules) to shard")
    names = sorted({type(m).__name__ for m in found})  # fully_shard renames the classes (FSDP...)
    for block in found:
        for layer in [m for m in block.modules() if m is not block and _holds_matrix(m)]:
            fully_shard(layer)
        fully_shard(block)
    inside = {id(p) for block in found for p in block.parameters()}
    frozen = {p for p in model.parameters() if not p.requires_grad and id(p) not in inside}
    fully_shard(model, ignored_params=frozen or None)
    model.lorakit_forward = _call
    register_fsdp_forward_method(model, "lorakit_forward")
    return names


def _holds_matrix(module: nn.Module) -> bool:
    """A layer with its own 2-D ``weight`` (a linear layer, GPT-2's Conv1D, a LoRA layer wrapping one)."""
    weight = module._parameters.get("weight")
    return weight is not None and weight.dim() == 2


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def as_forward(model: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, run as a forward pass of ``model``: code that calls a model's
    parts (its decoder stack, its output layer) rather than ``model(...)`` needs this under
    FSDP, which gathers the root's own weights (embeddings, final norm, output layer) only
    around a forward pass. A plain call for other models."""
    method = getattr(model, "lorakit_forward", None)
    return method(fn, *args, **kwargs) if method is not None else fn(*args, **kwargs)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or a module in it) is FSDP-sharded: then every process must run
    the same forward passes, since each one gathers the block's weights from all of them."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """Within the block, the trainable parameters of an FSDP-sharded model are whole,
    ordinary tensors (gathered: every process must enter); a no-op for other models.

    Sharded parameters are DTensors; between passes FSDP may also leave a module
    unsharded, with parameters that are views into its gather buffer, which e.g.
    safetensors cannot read: those are copied.
    """
    from torch.distributed.tensor import DTensor

    def whole(param: nn.Parameter) -> nn.Parameter | None:
        if not param.requires_grad:
            return None
        return nn.Parameter(param.full_tensor() if isinstance(param, DTensor) else param.clone(), requires_grad=True)

    with swapped_parameters(model, whole) if is_sharded(model) else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def swapped_parameters(model: nn.Module, replace: Callable[[nn.Parameter], nn.Parameter | None]) -> Iterator[None]:
    """Within the block, each parameter of ``model`` and its submodules for which ``replace`` (called without
    autograd) returns a parameter is that one; the originals are put back after."""
    swapped = []
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                new = replace(param) if param is not None else None
                if new is not None:
                    module._parameters[name] = new
                    swapped.append((module, name, param))
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def reshard(model: nn.Module) -> None:
    """Put an FSDP model's parameters back to their shards (FSDP keeps the root module
    gathered after a forward pass): the optimizer holds the shards, and state-dict
    functions match them by identity. A no-op for other models."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
