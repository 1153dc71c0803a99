"""Training checkpoints: what a killed run needs to continue at the same step.

``checkpoint-<finished epochs>-<steps into the next epoch>.pt``, written atomically by
the main process into the run folder, which every process must see (one machine, or a
shared file system). After each write the newest ``keep`` are kept (``--save-total-limit``,
2 unless set), so a damaged newest file still leaves one to resume from. Each holds the trainable weights and the
optimizer state as whole tensors (also from an FSDP-sharded model), the scheduler, every
process's random states and loss sums, the position and the finished epochs' records. After writing, every
process reads the file back and checks its own slice of each trainable tensor (:mod:`lorakit.training.sharded_save`).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .distributed import World, reshard
from .io import atomic_write
from .model import frozen_parameter_names
from .training.schedule import LEGACY
from .training.sharded_save import verify_slices

__all__ = ["Progress", "checkpoints", "save", "resume", "current_names", "completed", "KEEP", "MAY_CHANGE", "ALIASES",
           "PREDATED"]

KEEP = 2  # checkpoints kept unless --save-total-limit says otherwise
_NAME = re.compile(r"checkpoint-(\d+)-(\d+)\.pt")
# Settings that may change between a run and its resumption (how often it saves, the bar):
# they do not change what it learns.
MAY_CHANGE = frozenset({"resume", "progress", "save_steps", "save_total_limit", "logging_steps", "seeds", "overwrite",
                        "report_to"})

# Other names of TrainConfig fields: lorakit's older ones (in runs, config files and checkpoints written
# before the PEFT/TRL names) and TRL's lora_target_modules.
ALIASES = {"r": "lora_r", "alpha": "lora_alpha", "targets": "target_modules", "lora_target_modules": "target_modules",
           "save_every": "save_steps"}

# What runs recorded before a field existed did, where that is not the field's default: they trained on
# lorakit's own schedule (lorakit.training.schedule).
PREDATED = {"lr_scheduler": LEGACY}


def completed(config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A recorded run configuration with today's names, and the fields it predates: their
    :data:`PREDATED` values (what the run did), else their ``defaults``."""
    config = current_names(config)
    return {**defaults, **{k: v for k, v in PREDATED.items() if k not in config}, **config}


def current_names(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with :data:`ALIASES` renamed to today's field names (both given: an error)."""
    out = dict(values)
    for old, new in ALIASES.items():
        if old in out:
            if new in out and out[new] != out[old]:
                raise ValueError(f"give {new} or its other name {old}, not both ({out[new]!r} vs {out[old]!r})")
            out[new] = out.pop(old)
    return out


@dataclass
class Progress:
    """Where a run stands (what a checkpoint restores): finished epochs and their records,
    time spent, and within the current epoch the optimizer steps done with this
    process's loss sum and examples so far."""

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    wall: float = 0.0
    step: int = 0
    loss_sum: float = 0.0
    seen: int = 0
    seconds: float = 0.0


def _position(path: Path) -> tuple[int, int]:
    match = _NAME.fullmatch(path.name)
    assert match, path
    return int(match[1]), int(match[2])


def checkpoints(run: Path) -> list[Path]:
    """Checkpoint files of ``run``, newest first (other files, e.g. ``checkpoint-1-0-old.pt``, are ignored)."""
    return sorted((p for p in run.glob("checkpoint-*.pt") if _NAME.fullmatch(p.name)), key=_position, reverse=True)


def _atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save(run: Path, record: dict[str, Any], progress: Progress, model: nn.Module, optimizer, scheduler,
         world: World, keep: int = KEEP) -> None:
    """Called by every process (each contributes its random state and loss sums). Afterwards the
    newest ``keep`` checkpoints are left (0: all)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    reshard(model)
    # whole tensors, also from an FSDP-sharded model; ignore_frozen_params keeps the aliases of tied
    # frozen weights (a tied lm_head: the whole embedding), so they are filtered by name here
    frozen = frozen_parameter_names(model)
    trainable = {k: v for k, v in get_model_state_dict(model, options=options).items() if k not in frozen}
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    ranks = world.gather({"torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                          "cuda_rng": torch.cuda.get_rng_state(world.device) if world.device.type == "cuda" else None,
                          "loss_sum": progress.loss_sum, "seen": progress.seen})
    path = run / f"checkpoint-{progress.epoch}-{progress.step}.pt"
    written = None
    if world.main:
        state = {"config": record, "world_size": world.size, "epoch": progress.epoch, "step": progress.step,
                 "history": progress.history, "wall_time": progress.wall, "seconds": progress.seconds, "ranks": ranks,
                 "trainable": trainable, "optimizer": optimizer_state, "scheduler": scheduler.state_dict()}
        try:
            _atomic_save(state, path)
        except OSError as e:  # said on every process by verify_slices
            written = " ".join(str(e).split())
    _read_back(path, model, world, written)
    if world.main:
        for old in [p for p in checkpoints(run) if _position(p) < _position(path)][keep - 1:] if keep else []:
            old.unlink(missing_ok=True)


def _read_back(path: Path, model: nn.Module, world: World, written: str | None) -> None:
    """Every process checks its own slice of each trainable tensor in the checkpoint just written (rank 0 also
    those it holds whole): a torn or partial checkpoint fails the save on every process, and is set aside as
    ``*.damaged`` so that no resume ever reads it."""
    live = {k: p for k, p in model.named_parameters() if p.requires_grad}
    try:
        verify_slices(path, live, world, lambda p: torch.load(p, weights_only=True, mmap=True)["trainable"], written)
    except OSError:
        if world.main and path.exists():
            path.rename(path.with_name(path.name + ".damaged"))
        raise


def _read(path: Path) -> dict[str, Any]:
    state = torch.load(path, weights_only=True)
    for key in ("config", "world_size", "epoch", "step", "history", "trainable", "optimizer", "ranks"):
        state[key]  # noqa: B018  (a complete checkpoint has them all)
    return state


def _newest_readable(run: Path) -> Path | None:
    """The newest checkpoint that reads back; damaged ones are renamed ``*.damaged``."""
    for path in checkpoints(run):
        try:
            _read(path)
            return path
        except Exception as e:  # truncated or damaged: fall back to the one before
            print(f"skipping damaged checkpoint {path}: {type(e).__name__}: {str(e)[:200]}")
            path.rename(path.with_name(path.name + ".damaged"))
    return None


def _check_same_run(chosen: str, written: dict[str, Any], record: dict[str, Any]) -> None:
    """Refuse a checkpoint whose run differs from ``record`` but in :data:`MAY_CHANGE`, naming the fields."""
    differ = [k for k, v in record.items() if k not in MAY_CHANGE and (k not in written or written[k] != v)]
    if not differ:
        return
    shown = "; ".join(f"{k} {repr(written[k]) if k in written else 'unset'} there, {record[k]!r} here" for k in differ)
    legacy = written.get("lr_scheduler") == LEGACY != record.get("lr_scheduler")
    what = (f"it began before lorakit took its schedules from transformers: add --lr-scheduler {LEGACY} to resume it on "
            "the schedule it recorded, or use another --out" if legacy else "use another --out or remove it")
    raise ValueError(f"{chosen} belongs to a run with another configuration ({shown}); {what}")


def resume(run: Path, record: dict[str, Any], model: nn.Module, optimizer, scheduler, world: World,
           defaults: dict[str, Any] | None = None) -> Progress:
    """Restore the newest readable checkpoint of the same run (a fresh start if none).
    The main process chooses it; every process then reads that file. ``defaults``: the
    configuration's default values, for fields the checkpoint predates."""
    chosen = world.gather(str(_newest_readable(run) or "") if world.main else None)[0]
    if not chosen:
        if world.main:
            print(f"no usable checkpoint in {run}; starting from scratch")
        return Progress()
    try:
        state, failed = _read(Path(chosen)), None
    except Exception as e:
        state, failed = None, e
    if world.any(failed is not None):
        raise ValueError(f"{chosen} cannot be read by every process ({failed or 'another process failed'}); "
                         "--out must be on a file system all processes share")
    # a field added to lorakit after the checkpoint was written keeps what the run did (its default, or PREDATED)
    _check_same_run(chosen, completed(state["config"], defaults or {}), record)
    if state["world_size"] != world.size:
        raise ValueError(f"{chosen} was written by {state['world_size']} processes; resume it with as many, "
                         f"not {world.size}")
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, state["trainable"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    scheduler.load_state_dict(state["scheduler"])
    mine = state["ranks"][world.rank]
    torch.set_rng_state(mine["torch_rng"])
    random.setstate(mine["python_rng"])
    if mine["cuda_rng"] is not None:
        torch.cuda.set_rng_state(mine["cuda_rng"], world.device)
    if world.main:
        print(f"resumed from {chosen}: {state['epoch']} epochs and {state['step']} steps done")
        # the log holds exactly the finished epochs (a kill may have come between log and checkpoint)
        (run / "log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in state["history"]))
    return Progress(state["epoch"], state["history"], state["wall_time"], state["step"], mine["loss_sum"],
                    mine["seen"], state["seconds"])
