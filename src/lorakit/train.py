"""Fine-tune an encoder on a GLUE task with LoRA or a baseline (paper section 5.2, Table 2).

Reads top to bottom: config, load, attach, data, loop, evaluate, save. One run per
seed writes into ``<out>/seed<N>/``: ``log.jsonl``, ``summary.json``, ``curve.png``,
the best epoch's adapter (``adapter/``, PEFT format) or trainable weights
(``trainable.safetensors``), and ``checkpoint-<epoch>-<step>.pt`` after every epoch and
every ``--save-every`` steps (written atomically) so that ``--resume`` continues a
killed run where it stopped. Under ``torchrun`` the same code trains with DDP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from . import baselines, data
from .config import LoraConfig
from .distributed import World, full_parameters, fully_shard_model, reshard, setup, shard_rows
from .fastops import use_fast_dropout
from .io import PREFIX, adapter_state_dict, atomic_write, copy_strict, read_weights, save_adapter
from .metrics import compute_metrics
from .model import add_lora, lora_layers, trainable_parameters
from .models import resolve_model

__all__ = ["TrainConfig", "PRESETS", "resolve_config", "train", "train_seeds", "evaluate", "load_classifier", "tokenize"]


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; field docs become ``lorakit train --help``."""

    task: str = _opt("mrpc", "GLUE task: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte")
    model: str = _opt("minilm", "model: minilm (embedded), mpnet-base, or any HF encoder name or folder")
    method: str = _opt("lora", "lora, full (full fine-tuning), bitfit (biases only) or adapter (Houlsby)")
    data_dir: str | None = _opt(None, "GLUE tsv folder, or 'hub' for nyu-mll/glue (default: ../shared/data/glue)")
    out: str = _opt("runs/{task}", "output folder; one seed<N>/ subfolder per seed")
    seeds: tuple[int, ...] = _opt((0,), "comma-separated seeds; the reported figure is the median over seeds")
    epochs: int = _opt(10, "training epochs (the best epoch is reported, as in the paper)")
    batch_size: int = _opt(16, "training batch size")
    lr: float = _opt(4e-4, "peak learning rate (AdamW, linear warm-up then linear decay)")
    max_length: int = _opt(128, "truncate examples to this many tokens (batches are padded dynamically)")
    warmup_ratio: float = _opt(0.06, "fraction of steps spent warming up the learning rate")
    weight_decay: float = _opt(0.1, "AdamW weight decay on matrices (not on biases or norms)")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this value (0: no clipping)")
    r: int = _opt(8, "LoRA rank")
    alpha: float = _opt(16.0, "LoRA alpha (scaling alpha/r)")
    lora_dropout: float = _opt(0.1, "dropout on the LoRA branch input")
    targets: str | None = _opt(None, "comma-separated LoRA target modules (default: the query/value projections)")
    adapter_dim: int = _opt(64, "bottleneck size of Houlsby adapters (method adapter)")
    init_adapter: str | None = _opt(None, "start the LoRA factors from this adapter (the paper's MNLI start)")
    resume: bool = _opt(False, "continue from the newest complete checkpoint in the run folder")
    save_every: int = _opt(0, "also checkpoint every N optimizer steps within an epoch (0: at epoch ends only)")
    fsdp: bool = _opt(False, "under torchrun: shard the model across processes with FSDP2 instead of DDP's copies")
    eval_batch_size: int = _opt(64, "evaluation batch size")
    max_train_examples: int | None = _opt(None, "use only the first N training examples (quick runs, tests)")
    max_eval_examples: int | None = _opt(None, "use only the first N dev examples")
    progress: bool = _opt(True, "show progress bars")
    fast_dropout: bool = _opt(True, "fast dropout (lorakit.fastops) in LoRA and the model; --no-fast-dropout: torch's")
    precision: str = _opt("fp32", "fp32, or bf16 (autocast: bfloat16 matmuls, fp32 weights and optimizer)")

    def __post_init__(self) -> None:
        data.get_task(self.task)
        if self.method not in baselines.METHODS:
            raise ValueError(f"method must be one of {baselines.METHODS}, got {self.method!r}")
        for name in ("epochs", "batch_size", "max_length", "eval_batch_size", "r", "adapter_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be 0 or positive, got {self.save_every}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")

    @property
    def run_dir(self) -> Path:
        return Path(self.out.format(task=data.get_task(self.task).name, model=self.model, method=self.method))


# Table 9 of the paper (RoBERTa-base, LoRA): batch size, epochs, learning rate per task;
# r = 8, alpha = 16 (the official scripts), max length 512, warm-up 0.06, AdamW.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {
        task: dict(batch_size=bs, epochs=ep, lr=lr, max_length=512, r=8, alpha=16.0, warmup_ratio=0.06,
                   weight_decay=0.1, grad_clip=1.0)
        for task, (bs, ep, lr) in {
            "mnli": (16, 30, 5e-4), "sst2": (16, 60, 5e-4), "mrpc": (16, 30, 4e-4), "cola": (32, 80, 4e-4),
            "qnli": (32, 25, 4e-4), "qqp": (16, 25, 5e-4), "rte": (32, 80, 5e-4), "stsb": (16, 40, 4e-4),
        }.items()
    },
    # A CPU-sized recipe for the embedded MiniLM: shorter, with a higher learning rate.
    "demo": {task: dict(batch_size=16, epochs=8, lr=1e-3, max_length=128) for task in data.TASKS},
}


# Presets hold LoRA's learning rates; the baselines take these instead (full fine-tuning
# in the range RoBERTa used, BitFit and adapters as in their papers' GLUE runs).
BASELINE_LR = {"full": 5e-5, "bitfit": 1e-3, "adapter": 5e-4}


def resolve_config(preset: str | None, **overrides: Any) -> TrainConfig:
    """Defaults, then the preset's values for the task (and method), then explicit ``overrides``."""
    task = data.get_task(overrides.get("task") or TrainConfig.task).name
    method = overrides.get("method") or TrainConfig.method
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
        values.update(PRESETS[preset][task])
        if method in BASELINE_LR:
            values["lr"] = BASELINE_LR[method]
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


# ---- model -----------------------------------------------------------------------------------


def load_classifier(model_name: str, task: data.Task):
    """Tokenizer and sequence-classification model for ``task`` (regression for STS-B)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    path = resolve_model(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=task.num_labels, problem_type="regression" if task.labels is None else None,
        ignore_mismatched_sizes=True,  # a folder with another task's head gets a fresh one
    )
    return tokenizer, model


def _head_name(model: nn.Module) -> str:
    for name in ("classifier", "score"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ValueError(f"cannot find the classification head of {type(model).__name__} (expected 'classifier' or 'score')")


def attach_method(model: nn.Module, cfg: TrainConfig) -> list[str]:
    """Make only the method's parameters trainable; returns the adapted module names."""
    head = _head_name(model)
    if cfg.method == "lora":
        targets = tuple(cfg.targets.split(",")) if cfg.targets else None
        lora = LoraConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.lora_dropout, target_modules=targets,
                          modules_to_save=(head,), base_model_name_or_path=cfg.model, task_type="SEQ_CLS")
        add_lora(model, lora)
        if cfg.init_adapter:
            _init_lora_from(model, cfg.init_adapter)
        return [name for name, _ in lora_layers(model)]
    adapted = baselines.add_houlsby_adapters(model, cfg.adapter_dim) if cfg.method == "adapter" else []
    baselines.freeze_for(model, cfg.method, head)
    return adapted


def _init_lora_from(model: nn.Module, path: str) -> None:
    """Copy the LoRA factors (not the task head) of the adapter in ``path``."""

    def factors(d: dict) -> dict:
        return {k: v for k, v in d.items() if ".lora_" in k}

    found = {k if k.startswith(PREFIX) else PREFIX + k: v for k, v in read_weights(path).items()}
    copy_strict(factors(adapter_state_dict(model, "default")), factors(found), path)


# ---- data ------------------------------------------------------------------------------------


@dataclass
class Split:
    features: list[dict[str, list[int]]]
    labels: list[float | int]

    @property
    def lengths(self) -> list[int]:
        return [len(f["input_ids"]) for f in self.features]


def tokenize(tokenizer, examples: list[data.Example], max_length: int) -> Split:
    """Tokenise examples (pairs as two segments), truncated to ``max_length``."""
    columns = list(zip(*(e.texts for e in examples)))
    enc = tokenizer(*columns, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    features = [{k: enc[k][i] for k in keys} for i in range(len(examples))]
    return Split(features, [e.label for e in examples])


# ---- evaluation ------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, task: data.Task, split: Split, batch_size: int, pad_id: int,
             world: World = World()) -> dict[str, float]:
    """The task's metrics on ``split``; with several processes each predicts a share of
    the batches and the predictions are gathered."""
    model.eval()
    predictions: list[float] = [0.0] * len(split.labels)
    batches = list(data.sequential_batches(len(split.labels), batch_size, split.lengths))
    share = batches[world.rank :: world.size]
    # Every process runs as many forward passes (FSDP gathers weights in each); extras are dropped.
    padding = [[]] * (-(-len(batches) // world.size) - len(share))
    mine: list[tuple[int, float]] = []
    for idx in share + padding:
        rows = idx or batches[0]
        batch = data.collate([split.features[i] for i in rows], [split.labels[i] for i in rows], pad_id, task.labels is None)
        batch.pop("labels")
        logits = model(**{k: v.to(world.device) for k, v in batch.items()}).logits.float()
        values = logits.squeeze(-1) if task.labels is None else logits.argmax(-1)
        mine += zip(idx, values.tolist())
    for part in world.gather(mine):
        for i, v in part:
            predictions[i] = v
    return compute_metrics(task.metrics, predictions, split.labels)


# ---- training --------------------------------------------------------------------------------


def _optimizer(model: nn.Module, cfg: TrainConfig, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    warmup = int(cfg.warmup_ratio * total_steps)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def precision_context(precision: str, device: torch.device = torch.device("cpu")):
    """bf16 autocast (on CPUs: AMX / AVX-512 bf16 matmuls) or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def _atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _save_weights(model: nn.Module, cfg: TrainConfig, run: Path) -> int:
    """Write the trained part (adapter folder, or trainable tensors); returns its bytes."""
    if cfg.method == "lora":
        tmp = run / ".adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(model, tmp)
        (tmp / "task.json").write_text(json.dumps({"task": cfg.task, "model": cfg.model}) + "\n")
        shutil.rmtree(run / "adapter", ignore_errors=True)
        os.replace(tmp, run / "adapter")
        return (run / "adapter" / "adapter_model.safetensors").stat().st_size
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    atomic_write(run / "trainable.safetensors", lambda tmp: save_file(tensors, tmp))
    return (run / "trainable.safetensors").stat().st_size


def _versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {"lorakit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "threads": str(torch.get_num_threads())}


@dataclass
class _Progress:
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


def _prepare(cfg: TrainConfig, task: data.Task, world: World = World()):
    """Tokenizer and model with the method attached (and fast dropout if asked)."""
    tokenizer, model = load_classifier(cfg.model, task)
    adapted = attach_method(model, cfg)
    if cfg.fast_dropout:
        use_fast_dropout(model)
    if world.main:
        if adapted:
            names = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in adapted}))
            print(f"{cfg.method}: adapted {len(adapted)} modules: {names}")
        print(trainable_parameters(model))
    return tokenizer, model


def _load_splits(cfg: TrainConfig, task: data.Task, tokenizer) -> tuple[Split, dict[str, Split]]:
    data_dir = cfg.data_dir if cfg.data_dir is not None else data.default_data_dir()
    train_examples = data.read_split(task, "train", data_dir)[: cfg.max_train_examples]
    dev = {s: tokenize(tokenizer, data.read_split(task, s, data_dir)[: cfg.max_eval_examples], cfg.max_length)
           for s in task.dev_splits}
    return tokenize(tokenizer, train_examples, cfg.max_length), dev


# ---- checkpoints ---------------------------------------------------------------------------
# checkpoint-<finished epochs>-<steps into the next epoch>.pt, written atomically by the
# main process into --out, which every process must see (one machine, or a shared file
# system). After each write the one before it is kept too, so a damaged newest file still
# leaves one to resume from.

_KEEP = 2


def _position(path: Path) -> tuple[int, ...]:
    return tuple(int(x) for x in path.stem.split("-")[1:])


def _checkpoints(run: Path) -> list[Path]:
    """Checkpoint files of ``run``, newest first."""
    return sorted(run.glob("checkpoint-*-*.pt"), key=_position, reverse=True)


def _save_checkpoint(run: Path, record: dict[str, Any], progress: _Progress, model: nn.Module, optimizer, scheduler,
                     world: World) -> None:
    """Called by every process (each contributes its random state and loss sums)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    reshard(model)
    trainable = get_model_state_dict(model, options=options)  # whole tensors, also from an FSDP-sharded model
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    ranks = world.gather({"torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                          "cuda_rng": torch.cuda.get_rng_state(world.device) if world.device.type == "cuda" else None,
                          "loss_sum": progress.loss_sum, "seen": progress.seen})
    if not world.main:
        return
    state = {"config": record, "world_size": world.size, "epoch": progress.epoch, "step": progress.step,
             "history": progress.history, "wall_time": progress.wall, "seconds": progress.seconds, "ranks": ranks,
             "trainable": trainable, "optimizer": optimizer_state, "scheduler": scheduler.state_dict()}
    path = run / f"checkpoint-{progress.epoch}-{progress.step}.pt"
    _atomic_save(state, path)
    for old in [p for p in _checkpoints(run) if _position(p) < _position(path)][_KEEP - 1:]:
        old.unlink(missing_ok=True)


def _read_checkpoint(path: Path) -> dict[str, Any]:
    state = torch.load(path, weights_only=True)
    for key in ("config", "world_size", "epoch", "step", "history", "trainable", "optimizer", "ranks"):
        state[key]  # noqa: B018  (a complete checkpoint has them all)
    return state


def _newest_readable(run: Path) -> Path | None:
    """The newest checkpoint that reads back; damaged ones are renamed ``*.damaged``."""
    for path in _checkpoints(run):
        try:
            _read_checkpoint(path)
            return path
        except Exception as e:  # truncated or damaged: fall back to the one before
            print(f"skipping damaged checkpoint {path}: {type(e).__name__}: {str(e)[:200]}")
            path.rename(path.with_name(path.name + ".damaged"))
    return None


def _resume(run: Path, record: dict[str, Any], model: nn.Module, optimizer, scheduler, world: World) -> _Progress:
    """Restore the newest readable checkpoint of the same run (a fresh start if none).
    The main process chooses it; every process then reads that file."""
    chosen = world.gather(str(_newest_readable(run) or "") if world.main else None)[0]
    if not chosen:
        if world.main:
            print(f"no usable checkpoint in {run}; starting from scratch")
        return _Progress()
    try:
        state, failed = _read_checkpoint(Path(chosen)), None
    except Exception as e:
        state, failed = None, e
    if world.any(failed is not None):
        raise ValueError(f"{chosen} cannot be read by every process ({failed or 'another process failed'}); "
                         "--out must be on a file system all processes share")
    # A run is its configuration and seed; how often it saves, and the progress bar, may change.
    same_run = {k: v for k, v in record.items() if k not in ("resume", "progress", "save_every", "seeds")}
    if {k: v for k, v in state["config"].items() if k in same_run} != same_run:
        raise ValueError(f"{chosen} belongs to a run with another configuration; use another --out or remove it")
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
    return _Progress(state["epoch"], state["history"], state["wall_time"], state["step"], mine["loss_sum"],
                     mine["seen"], state["seconds"])


# ---- the loop --------------------------------------------------------------------------------


def _train_epoch(model: nn.Module, cfg: TrainConfig, split: Split, order: list[list[int]], pad_id: int,
                 regression: bool, optimizer, scheduler, progress: _Progress, world: World, run: Path, checkpoint,
                 desc: str) -> None:
    """The steps of ``order`` from ``progress.step`` on, updating ``progress``; ``checkpoint()``
    every ``cfg.save_every`` steps. ``model`` may be DDP-wrapped."""
    from tqdm.auto import tqdm

    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    started = time.perf_counter() - progress.seconds
    bar = tqdm(total=len(order), initial=progress.step, disable=not (cfg.progress and world.main), desc=desc, leave=False)
    for step in range(progress.step, len(order)):
        rows, weight = shard_rows(order[step], world)
        batch = data.collate([split.features[i] for i in rows], [split.labels[i] for i in rows], pad_id, regression)
        with precision_context(cfg.precision, world.device):
            loss = model(**{k: v.to(world.device) for k, v in batch.items()}).loss
        value = loss.item()
        (loss * weight).backward()
        norm = _local(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)).item()
        if world.any(not (math.isfinite(value) and math.isfinite(norm))):  # one collective per step
            what = f"the training loss became {value}" if not math.isfinite(value) else "the gradient norm became non-finite"
            _stop(what, progress, step, run)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        n = len(rows) if weight else 0
        progress.step, progress.loss_sum, progress.seen = step + 1, progress.loss_sum + value * n, progress.seen + n
        progress.seconds = time.perf_counter() - started
        bar.update()
        bar.set_postfix(loss=f"{progress.loss_sum / max(1, progress.seen):.4f}",
                        ex_s=f"{progress.seen * world.size / progress.seconds:.1f}")
        if cfg.save_every and progress.step % cfg.save_every == 0 and progress.step < len(order):
            checkpoint()
    bar.close()


def _local(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor (FSDP's gradient norm is a DTensor)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _stop(what: str, progress: _Progress, step: int, run: Path) -> None:
    last = _checkpoints(run)
    raise FloatingPointError(
        f"{what} at epoch {progress.epoch + 1}, step {step + 1}; stopped before updating the weights. Last good "
        f"checkpoint: {last[0] if last else 'none'}. To change --lr or --precision (a lower rate, or fp32 instead "
        f"of bf16 often helps), start a new run with another --out")


def train(cfg: TrainConfig, seed: int) -> dict[str, Any]:
    """One training run; returns (and, in the main process, writes) its summary.

    Under ``torchrun``/``accelerate launch`` each process takes its share of every
    global batch (``batch_size`` rows per process) and DDP averages the gradients.
    """
    world = setup()
    task = data.get_task(cfg.task)
    run = cfg.run_dir / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    record = {**dataclasses.asdict(cfg), "seed": seed}
    torch.manual_seed(seed)
    random.seed(seed)
    tokenizer, model = _prepare(cfg, task, world)
    model.to(world.device)
    if cfg.fsdp:
        if not world.distributed:
            raise ValueError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node N")
        blocks = fully_shard_model(model)
        if world.main:
            print(f"FSDP2: sharded {', '.join(blocks)} and the rest over {world.size} processes")
    train_split, dev = _load_splits(cfg, task, tokenizer)
    global_batch = cfg.batch_size * world.size
    optimizer, scheduler = _optimizer(model, cfg, math.ceil(len(train_split.labels) / global_batch) * cfg.epochs)
    progress = _resume(run, record, model, optimizer, scheduler, world) if cfg.resume else _Progress()
    if world.main:
        for torn in run.glob(".checkpoint-*.tmp"):  # a write a kill interrupted
            torn.unlink()
        if progress.epoch == progress.step == 0:
            (run / "log.jsonl").unlink(missing_ok=True)
            for old in _checkpoints(run):
                old.unlink()
    ddp = model
    if world.distributed and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[world.device] if world.device.type == "cuda" else None)

    def checkpoint() -> None:
        _save_checkpoint(run, record, progress, model, optimizer, scheduler, world)

    pad_id, main = tokenizer.pad_token_id or 0, (task.dev_splits[0], task.main_metric)
    for epoch in range(progress.epoch, cfg.epochs):
        if progress.step == 0:  # else the checkpoint restored the random state mid-epoch
            # dropout masks depend on (seed, epoch, process) only: resumable
            torch.manual_seed(seed * 1_000 + epoch + 1_000_003 * world.rank)
        order = data.length_grouped_batches(train_split.lengths, global_batch, seed, epoch)
        _train_epoch(ddp, cfg, train_split, order, pad_id, task.labels is None, optimizer, scheduler, progress, world,
                     run, checkpoint, desc=f"epoch {epoch + 1}/{cfg.epochs}")
        train_time = progress.seconds
        started = time.perf_counter()
        with precision_context(cfg.precision, world.device):
            metrics = {s: evaluate(model, task, split, cfg.eval_batch_size, pad_id, world) for s, split in dev.items()}
        progress.wall += train_time + time.perf_counter() - started
        loss_sum, seen = map(sum, zip(*world.gather((progress.loss_sum, progress.seen))))
        best = max((h["dev"][main[0]][main[1]] for h in progress.history), default=-math.inf)
        progress.history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "dev": metrics,
                                 "train_seconds": train_time, "examples_per_second": seen / train_time,
                                 "lr": scheduler.get_last_lr()[0]})
        progress.epoch, progress.step, progress.loss_sum, progress.seen, progress.seconds = epoch + 1, 0, 0.0, 0, 0.0
        if metrics[main[0]][main[1]] > best:  # the same decision in every process (gathered metrics)
            with full_parameters(model):
                if world.main:
                    _save_weights(model, cfg, run)
        if world.main:
            with (run / "log.jsonl").open("a") as log:
                log.write(json.dumps(progress.history[-1]) + "\n")
            print(f"epoch {epoch + 1}: train loss {loss_sum / seen:.4f}, dev {_fmt(metrics)}, {train_time:.0f}s")
        checkpoint()
    return _summarize(cfg, task, run, record, model, progress, world)


def _summarize(cfg: TrainConfig, task: data.Task, run: Path, record: dict[str, Any], model: nn.Module,
               progress: _Progress, world: World = World()) -> dict[str, Any]:
    """The summary of a finished run; the main process writes it and the learning curve."""
    history, (split, metric) = progress.history, (task.dev_splits[0], task.main_metric)
    best = max(range(len(history)), key=lambda i: history[i]["dev"][split][metric])
    weights = run / "adapter" / "adapter_model.safetensors" if cfg.method == "lora" else run / "trainable.safetensors"
    params = trainable_parameters(model)
    summary = {
        "config": record, "task": task.name, "best_epoch": best + 1, "best": history[best]["dev"], "epochs": history,
        "trainable_params": params.trainable, "total_params": params.total,
        "weights_bytes": world.gather(weights.stat().st_size if world.main else None)[0],  # only the main process wrote it
        "wall_seconds": progress.wall, "versions": _versions(),
    }
    if world.main:
        (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_curve(history, task, run / "curve.png", title=f"{cfg.model} {cfg.method} {task.name} seed {record['seed']}")
    return summary


def _fmt(metrics: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{s + ' ' if len(metrics) > 1 else ''}{k} {100 * v:.2f}" for s, m in metrics.items() for k, v in m.items())


def plot_curve(history: list[dict[str, Any]], task: data.Task, path: Path, title: str) -> None:
    """Training loss and the dev metrics per epoch, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, loss_ax = plt.subplots(figsize=(6, 3.5))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", color="tab:gray", label="train loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("train loss")
    metric_ax = loss_ax.twinx()
    for split in task.dev_splits:
        for name in task.metrics:
            metric_ax.plot(epochs, [100 * h["dev"][split][name] for h in history], "o-", label=f"{split} {name}")
    metric_ax.set_ylabel("dev metric (%)")
    fig.legend(loc="lower center", ncol=3, fontsize=8)
    loss_ax.set_title(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_seeds(cfg: TrainConfig) -> dict[str, Any]:
    """Run every seed; report each run's best epoch and the median over seeds (paper protocol)."""
    task = data.get_task(cfg.task)
    runs = [train(cfg, seed) for seed in cfg.seeds]
    split = task.dev_splits[0]
    median = {
        f"{s}/{m}" if len(task.dev_splits) > 1 else m: statistics.median(r["best"][s][m] for r in runs)
        for s in task.dev_splits for m in task.metrics
    }
    report = {"task": task.name, "model": cfg.model, "method": cfg.method, "seeds": list(cfg.seeds),
              "median": median, "per_seed": {str(s): r["best"][split] for s, r in zip(cfg.seeds, runs)},
              "trainable_params": runs[0]["trainable_params"], "weights_bytes": runs[0]["weights_bytes"],
              "wall_seconds": sum(r["wall_seconds"] for r in runs)}
    if setup().main:
        (cfg.run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
