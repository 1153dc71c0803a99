"""Saving from an FSDP2-sharded model, every process taking part (issue 34, item 2).

Rank 0 writes whole tensors (gathered from every process's shard); then every process reads the file back
and checks *its own* slice of each sharded tensor against its live shard (rank 0 also checks the tensors every
process holds whole). The verdicts are gathered, so a partial or torn save (a file that cannot be read, one
rank's slice missing or different, as when only rank 0's slice was written: accelerate PR #4206) makes every
process raise :class:`~lorakit.io.SaveVerificationError` together, naming the ranks and tensors, instead of a
resume that silently loads it. Every process reaches every collective even when one of them fails: no hang.

- :func:`save_adapter_sharded`: :func:`lorakit.save_adapter` for a sharded model, with its receipt
  (:mod:`lorakit.receipt`: the fingerprints gather one layer at a time, the probes are one forward of all
  processes); every process calls it.
- :func:`verify_slices`: the read-back, also used for training checkpoints (:func:`lorakit.checkpoint.save`).
- :func:`local_slice`: the part of a whole tensor that this process holds of a DTensor.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from ..distributed import World, full_parameters, reshard
from ..io import PREFIX, WEIGHTS_NAME, SaveVerificationError, adapter_state_dict, save_adapter
from ..layers import LoraLayer
from ..model import active_adapters, outside_saved_modules

__all__ = ["save_adapter_sharded", "verify_slices", "local_slice"]


def _is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_slice(whole: Tensor, like: Tensor) -> Tensor:
    """The part of ``whole`` that this process holds of ``like``: for a DTensor, its ``Shard(d)`` placements
    applied as DTensor and FSDP2 split (``torch.chunk`` along ``d`` over that mesh dimension, an empty slice
    for a rank past the last chunk); ``whole`` itself for a replicated or plain tensor."""
    from torch.distributed.tensor import Replicate, Shard

    if not _is_dtensor(like):
        return whole
    coordinate = like.device_mesh.get_coordinate()
    for mesh_dim, placement in enumerate(like.placements):
        if isinstance(placement, Replicate):
            continue
        assert type(placement) is Shard, placement  # FSDP2 alone shards rows (no tensor parallelism here)
        chunks = whole.chunk(like.device_mesh.size(mesh_dim), dim=placement.dim)
        index = coordinate[mesh_dim]
        whole = chunks[index] if index < len(chunks) else whole.narrow(placement.dim, 0, 0)
    return whole


def _differs(found: Tensor, live: Tensor) -> bool:
    mine = (live.to_local() if _is_dtensor(live) else live).detach().cpu()
    found = local_slice(found, live)
    return found.dtype != mine.dtype or found.shape != mine.shape or not torch.equal(found, mine)


def _problems(found: dict[str, Tensor], mine: dict[str, Tensor]) -> list[str]:
    """What this process finds wrong with ``found``: its slices of the tensors in ``mine``."""
    missing = sorted(k for k in mine if k not in found)
    differ = sorted(k for k in mine.keys() & found.keys() if _differs(found[k], mine[k]))
    return [f"{len(items)} {what}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
            for what, items in (("slices differ", differ), ("tensors missing", missing)) if items]


def verify_slices(path: Path, live: dict[str, Tensor], world: World, read: Callable[[Path], dict[str, Tensor]],
                  written: str | None = None) -> dict[str, Tensor]:
    """Every process: after rank 0 wrote ``path`` (``written``: its error if writing failed, else None),
    ``read(path)`` and compare this process's slice of each tensor of ``live`` (file key -> live tensor, a
    DTensor where sharded) with the file's. Raises :class:`SaveVerificationError` on every process, naming
    each failing rank and its tensors, if any process found a difference or could not read the file;
    returns the tensors read (none on a process that holds no shard: DDP's replicas are rank 0's to check)."""
    errors = [e for e in world.gather(written) if e]  # also makes every process wait for rank 0's write
    if errors:
        raise SaveVerificationError(f"rank 0 could not save {path}: {errors[0]}")
    # this process's slices of the sharded tensors; on rank 0 also the others, which every process holds whole
    mine = {k: t for k, t in live.items() if world.main or _is_dtensor(t)}
    found: dict[str, Tensor] = {}
    try:
        found = read(path) if mine or world.main else {}
    except Exception as e:  # any reason: this process must still take part in the gather below
        problems = [f"cannot read it back ({type(e).__name__}: {' '.join(str(e).split())[:200]})"]
    else:
        problems = _problems(found, mine)
    failed = [(rank, p) for rank, p in enumerate(world.gather(problems)) if p]
    if failed:
        shown = "; ".join(f"rank {rank}: {', '.join(p)}" for rank, p in failed)
        raise SaveVerificationError(f"{path} read back after saving does not hold what the processes hold (a torn or "
                                    f"partial save): {shown}; save again")
    return found


def _peft_form_keys(model: nn.Module, adapter: str) -> set[str]:
    """File keys of ``B`` in layers adapted on some output slices (``enable_lora``): written in PEFT's form
    (``full_B``, zero rows between the slices), of which no process holds a slice; rank 0's whole-file
    read-back (:func:`lorakit.save_adapter`) checks them against the gathered tensors."""
    return {f"{PREFIX}{name}.{m.file_keys[1]}" for name, m in outside_saved_modules(model)
            if isinstance(m, LoraLayer) and getattr(m, "enable", {}).get(adapter)}


def save_adapter_sharded(model: nn.Module, directory: str | Path, world: World, adapter: str | None = None, *,
                         receipt: bool = True) -> Path:
    """:func:`lorakit.save_adapter` for an FSDP2-sharded ``model``; every process calls it. Rank 0 writes the
    gathered adapter (and reads the whole file back), every process checks its own slices (:func:`verify_slices`),
    then with ``receipt`` all processes make the receipt together and rank 0 writes it."""
    from ..receipt import make_receipt, write_receipt

    if adapter is None:
        active = active_adapters(model)
        if len(active) != 1:
            raise ValueError(f"name the adapter to save: the model has active adapters {list(active)}")
        adapter = active[0]
    directory = Path(directory)
    reshard(model)  # the live tensors are this process's shards, not a gathered root
    skip = _peft_form_keys(model, adapter)
    live = {k: v for k, v in adapter_state_dict(model, adapter).items() if k not in skip}
    written = None
    with full_parameters(model):
        if world.main:
            try:
                save_adapter(model, directory, adapter, receipt=False)
            except OSError as e:  # (a SaveVerificationError too) said on every process by verify_slices
                written = " ".join(str(e).split())
    found = verify_slices(directory / WEIGHTS_NAME, live, world, load_file, written)
    if receipt:
        made = make_receipt(model, adapter, tensors=found)
        reshard(model)
        if world.main:
            write_receipt(directory, made)
    return directory
