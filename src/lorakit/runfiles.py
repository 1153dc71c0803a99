"""What a training run writes into its folder besides checkpoints: the trained weights
(adapter folder or trainable tensors), ``log.jsonl``, ``summary.json`` and ``curve.png``."""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .distributed import World, full_parameters, is_sharded
from .io import atomic_write, save_adapter
from .tasks import PERCENT_METRICS
from .training.sharded_save import save_adapter_sharded

__all__ = ["save_weights", "weights_path", "append_log", "write_summary", "plot_curve", "versions", "Tracker",
           "REPORT_TO"]

REPORT_TO = ("none", "tensorboard")


def weights_path(run: Path, method: str) -> Path:
    return run / "adapter" / "adapter_model.safetensors" if method == "lora" else run / "trainable.safetensors"


def save_weights(model: nn.Module, method: str, run: Path, info: dict[str, Any], world: World | None = None) -> int:
    """Write the trained part: an adapter folder, or the trainable tensors next to a
    ``task.json``; ``task.json`` holds ``info``. Every process calls it (rank 0 writes); returns the
    weights' bytes on rank 0. The adapter folder is replaced atomically, with its receipt
    (:mod:`lorakit.receipt`), once read back; from an FSDP-sharded model every process checks its own
    slices (:mod:`lorakit.training.sharded_save`)."""
    world = world or World()
    if method == "lora":
        tmp = run / ".adapter.tmp"
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        if is_sharded(model):
            save_adapter_sharded(model, tmp, world)
        elif world.main:
            save_adapter(model, tmp)
        if world.main:
            (tmp / "task.json").write_text(json.dumps(info) + "\n")
            shutil.rmtree(run / "adapter", ignore_errors=True)
            os.replace(tmp, run / "adapter")
    else:
        with full_parameters(model):
            if world.main:
                tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
                atomic_write(run / "trainable.safetensors", lambda tmp: save_file(tensors, tmp))
                (run / "task.json").write_text(json.dumps(info) + "\n")
    return weights_path(run, method).stat().st_size if world.main else 0


def append_log(run: Path, record: dict[str, Any]) -> None:
    with (run / "log.jsonl").open("a") as log:
        log.write(json.dumps(record) + "\n")


def versions() -> dict[str, str]:
    """Versions and the machine, for a run's summary: the CPU's model and its speed-relevant flags
    (figures from different CPU kinds are not comparable)."""
    import transformers

    from . import __version__
    from .precision import cpu_features, cpu_model

    return {"lorakit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu": cpu_model(), "cpu_flags": " ".join(cpu_features()),
            "machine": platform.machine(), "threads": str(torch.get_num_threads())}


def write_summary(run: Path, summary: dict[str, Any], title: str) -> None:
    """``summary.json`` first (a failing plot never loses it), then ``curve.png``."""
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    try:
        plot_curve(summary["epochs"], run / "curve.png", title)
    except Exception as e:  # matplotlib missing or broken: the results are already written
        print(f"no learning curve written ({type(e).__name__}: {e})")


def plot_curve(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Training loss (and a dev loss, if evaluated) on the left axis, dev metrics that are
    fractions in percent on the right, per epoch; one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, loss_ax = plt.subplots(figsize=(6, 3.5))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", color="tab:gray", label="train loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    metric_ax = loss_ax.twinx()
    dev = history[0]["dev"]
    for split, metrics in dev.items():
        prefix = f"{split} " if len(dev) > 1 else "dev "
        for name in metrics:
            values = [h["dev"][split][name] for h in history]
            if name == "loss":
                loss_ax.plot(epochs, values, "s--", color="tab:brown", label=prefix + "loss")
            elif name in PERCENT_METRICS and None not in values:
                metric_ax.plot(epochs, [100 * v for v in values], "o-", label=prefix + name)
    metric_ax.set_ylabel("dev metric (%)")
    fig.legend(loc="lower center", ncol=4, fontsize=8)
    loss_ax.set_title(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_runs(runs: list[tuple[str, list[dict[str, Any]]]], path: Path) -> None:
    """Run folders' seeds (a label and their summaries each) per epoch: the dev main metric,
    each seed's best epoch marked, beside the training loss; one colour per folder, a line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (dev, loss) = plt.subplots(1, 2, figsize=(10, 4))
    for (label, summaries), color in zip(runs, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4):
        split, metric = summaries[0]["main_metric"]
        scale = 100 if metric in PERCENT_METRICS else 1
        for i, summary in enumerate(summaries):
            epochs = range(1, len(summary["epochs"]) + 1)
            values = [scale * h["dev"][split][metric] for h in summary["epochs"]]
            dev.plot(epochs, values, "-", color=color, alpha=0.7, label=label if i == 0 else None)
            dev.plot(summary["best_epoch"], values[summary["best_epoch"] - 1], "o", color=color)
            loss.plot(epochs, [h["train_loss"] for h in summary["epochs"]], "-", color=color, alpha=0.7)
    dev.set_ylabel(f"{split} {metric}" + (" (%)" if scale == 100 else ""))
    dev.set_title("dev per epoch: a line per seed, dot = best epoch", fontsize=9)
    dev.legend(fontsize=8)
    loss.set_yscale("log")
    loss.set_ylabel("training loss (epoch mean)")
    loss.set_title("training loss per epoch", fontsize=9)
    for ax in (dev, loss):
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class Tracker:
    """Experiment tracking (transformers' ``report_to``): per optimizer step the loss, learning
    rate, gradient norm and throughput, per epoch the dev metrics, as TensorBoard scalars in
    ``<run>/tensorboard``; a no-op for ``"none"``. Steps count from the run's start, so a
    resumed run continues the same curves."""

    def __init__(self, kind: str, run: Path) -> None:
        self.folder = run / "tensorboard" if kind == "tensorboard" else None
        self._writer = None
        if self.folder is not None:
            try:  # checked now, before any work; the writer opens at the first scalar
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:
                raise ValueError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") from None

    def _scalars(self, step: int, values: dict[str, float | None]) -> None:
        if self.folder is None:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.folder))
        for name, value in values.items():
            if value is not None:
                self._writer.add_scalar(name, value, step)

    def step(self, step: int, values: dict[str, float]) -> None:
        self._scalars(step, {f"train/{k}": v for k, v in values.items()})

    def epoch(self, step: int, metrics: dict[str, dict[str, float]]) -> None:
        self._scalars(step, {f"{split}/{k}": v for split, values in metrics.items() for k, v in values.items()})
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
