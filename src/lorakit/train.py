"""Fine-tune an encoder on a GLUE task with LoRA or a baseline (paper section 5.2, Table 2).

Reads top to bottom: config, load, attach, data, loop, evaluate, save. One run per
seed writes into ``<out>/seed<N>/``: ``log.jsonl``, ``summary.json``, ``curve.png``,
the best epoch's adapter (``adapter/``, PEFT format) or trainable weights
(``trainable.safetensors``), and ``checkpoint.pt`` after every epoch (written
atomically) so that ``--resume`` continues a killed run where it stopped.
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

from . import baselines, data
from .config import LoraConfig
from .fastops import use_fast_dropout
from .io import PREFIX, adapter_state_dict, copy_strict, read_weights, save_adapter
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
    resume: bool = _opt(False, "continue from the last complete epoch checkpoint in the run folder")
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


def _batches(split: Split, order: list[list[int]], pad_id: int, regression: bool):
    for idx in order:
        yield data.collate([split.features[i] for i in idx], [split.labels[i] for i in idx], pad_id, regression)


# ---- evaluation ------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, task: data.Task, split: Split, batch_size: int, pad_id: int) -> dict[str, float]:
    """The task's metrics on ``split``."""
    model.eval()
    predictions: list[float] = [0.0] * len(split.labels)
    for idx in data.sequential_batches(len(split.labels), batch_size, split.lengths):
        batch = data.collate([split.features[i] for i in idx], [split.labels[i] for i in idx], pad_id, task.labels is None)
        batch.pop("labels")
        logits = model(**batch).logits.float()
        values = logits.squeeze(-1) if task.labels is None else logits.argmax(-1)
        for i, v in zip(idx, values.tolist()):
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


def precision_context(precision: str):
    """bf16 autocast on the CPU (AMX/AVX-512 bf16 matmuls) or nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
    tmp = run / ".trainable.safetensors.tmp"
    save_file(tensors, tmp)
    os.replace(tmp, run / "trainable.safetensors")
    return (run / "trainable.safetensors").stat().st_size


def _versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {"lorakit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "threads": str(torch.get_num_threads())}


@dataclass
class _Progress:
    """What a checkpoint restores: finished epochs, their records, time spent."""

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    wall: float = 0.0


def _prepare(cfg: TrainConfig, task: data.Task):
    """Tokenizer and model with the method attached (and fast dropout if asked)."""
    tokenizer, model = load_classifier(cfg.model, task)
    adapted = attach_method(model, cfg)
    if cfg.fast_dropout:
        use_fast_dropout(model)
    if adapted:
        print(f"{cfg.method}: adapted {len(adapted)} modules: {', '.join(sorted({n.rsplit('.', 1)[-1] for n in adapted}))}")
    print(trainable_parameters(model))
    return tokenizer, model


def _load_splits(cfg: TrainConfig, task: data.Task, tokenizer) -> tuple[Split, dict[str, Split]]:
    data_dir = cfg.data_dir if cfg.data_dir is not None else data.default_data_dir()
    train_examples = data.read_split(task, "train", data_dir)[: cfg.max_train_examples]
    dev = {s: tokenize(tokenizer, data.read_split(task, s, data_dir)[: cfg.max_eval_examples], cfg.max_length)
           for s in task.dev_splits}
    return tokenize(tokenizer, train_examples, cfg.max_length), dev


def _resume(path: Path, record: dict[str, Any], model: nn.Module, optimizer, scheduler) -> _Progress:
    """Restore trainable weights, optimizer and schedule from a checkpoint of the same run."""
    state = torch.load(path, weights_only=True)
    same_run = {k: v for k, v in record.items() if k not in ("resume", "progress")}
    if {k: v for k, v in state["config"].items() if k in same_run} != same_run:
        raise ValueError(f"{path} belongs to a run with another configuration; use another --out or remove it")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state["trainable"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    print(f"resumed from {path} after epoch {state['epoch']}")
    return _Progress(state["epoch"], state["history"], state["wall_time"])


def _train_epoch(model: nn.Module, cfg: TrainConfig, split: Split, order: list[list[int]], pad_id: int,
                 regression: bool, optimizer, scheduler, desc: str) -> tuple[float, int]:
    """One pass over ``order``; returns (mean loss, examples seen)."""
    from tqdm.auto import tqdm

    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    started, total_loss, seen = time.perf_counter(), 0.0, 0
    bar = tqdm(_batches(split, order, pad_id, regression), total=len(order), disable=not cfg.progress, desc=desc, leave=False)
    for batch in bar:
        with precision_context(cfg.precision):
            loss = model(**batch).loss
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        n = len(batch["labels"])
        total_loss, seen = total_loss + loss.item() * n, seen + n
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", ex_s=f"{seen / (time.perf_counter() - started):.1f}")
    return total_loss / seen, seen


def train(cfg: TrainConfig, seed: int) -> dict[str, Any]:
    """One training run; returns (and writes) its summary."""
    task = data.get_task(cfg.task)
    run = cfg.run_dir / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    record = {**dataclasses.asdict(cfg), "seed": seed}
    torch.manual_seed(seed)
    random.seed(seed)
    tokenizer, model = _prepare(cfg, task)
    train_split, dev = _load_splits(cfg, task, tokenizer)
    optimizer, scheduler = _optimizer(model, cfg, math.ceil(len(train_split.labels) / cfg.batch_size) * cfg.epochs)
    checkpoint = run / "checkpoint.pt"
    progress = _Progress()
    if cfg.resume and checkpoint.is_file():
        progress = _resume(checkpoint, record, model, optimizer, scheduler)
    elif not cfg.resume:
        (run / "log.jsonl").unlink(missing_ok=True)

    pad_id, main = tokenizer.pad_token_id or 0, (task.dev_splits[0], task.main_metric)
    for epoch in range(progress.epoch, cfg.epochs):
        torch.manual_seed(seed * 1_000 + epoch)  # dropout masks depend on (seed, epoch) only: resumable
        order = data.length_grouped_batches(train_split.lengths, cfg.batch_size, seed, epoch)
        started = time.perf_counter()
        loss, seen = _train_epoch(model, cfg, train_split, order, pad_id, task.labels is None, optimizer, scheduler,
                                  desc=f"epoch {epoch + 1}/{cfg.epochs}")
        train_time = time.perf_counter() - started
        with precision_context(cfg.precision):
            metrics = {s: evaluate(model, task, split, cfg.eval_batch_size, pad_id) for s, split in dev.items()}
        progress.wall += time.perf_counter() - started
        best = max((h["dev"][main[0]][main[1]] for h in progress.history), default=-math.inf)
        progress.history.append({"epoch": epoch + 1, "train_loss": loss, "dev": metrics, "train_seconds": train_time,
                                 "examples_per_second": seen / train_time, "lr": scheduler.get_last_lr()[0]})
        with (run / "log.jsonl").open("a") as log:
            log.write(json.dumps(progress.history[-1]) + "\n")
        if metrics[main[0]][main[1]] > best:
            _save_weights(model, cfg, run)
        print(f"epoch {epoch + 1}: train loss {loss:.4f}, dev {_fmt(metrics)}, {train_time:.0f}s")
        _atomic_save({"config": record, "epoch": epoch + 1, "history": progress.history, "wall_time": progress.wall,
                      "trainable": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                      "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, checkpoint)
    return _summarize(cfg, task, run, record, model, progress)


def _summarize(cfg: TrainConfig, task: data.Task, run: Path, record: dict[str, Any], model: nn.Module,
               progress: _Progress) -> dict[str, Any]:
    """Write summary.json and the learning curve of a finished run."""
    history, (split, metric) = progress.history, (task.dev_splits[0], task.main_metric)
    best = max(range(len(history)), key=lambda i: history[i]["dev"][split][metric])
    weights = run / "adapter" / "adapter_model.safetensors" if cfg.method == "lora" else run / "trainable.safetensors"
    params = trainable_parameters(model)
    summary = {
        "config": record, "task": task.name, "best_epoch": best + 1, "best": history[best]["dev"], "epochs": history,
        "trainable_params": params.trainable, "total_params": params.total, "weights_bytes": weights.stat().st_size,
        "wall_seconds": progress.wall, "versions": _versions(),
    }
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
    (cfg.run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
