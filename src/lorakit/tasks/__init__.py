"""Task families behind one small protocol, so the training loop never asks which it runs.

A :class:`Task` reads and encodes its data, collates batches, computes the training
loss, evaluates, and names the metric that picks the best epoch (and its direction).
Families: GLUE classification / regression (:mod:`.glue`), classification / regression on the
user's own CSV or JSONL files (:mod:`.classify`, GLUE's training code with the file's classes) and
causal-LM prompt -> completion tasks (:mod:`.lm`: the E2E NLG Challenge and the user's own JSONL files).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..distributed import World

__all__ = ["Task", "Split", "create", "canonical_name", "presets", "default_preset", "format_metrics",
           "PERCENT_METRICS", "report", "first_rows", "refuse_unread_flags", "refuse_packing"]


@dataclass
class Split:
    """Encoded examples: ``features[i]`` holds token-id lists (``input_ids``, ...);
    ``targets[i]`` what the task's collate and evaluation need (a label, a reference)."""

    features: list[dict[str, list[int]]]
    targets: list[Any] = field(default_factory=list)

    @property
    def lengths(self) -> list[int]:
        return [len(f["input_ids"]) for f in self.features]

    def __len__(self) -> int:
        return len(self.features)


class Task(Protocol):
    name: str
    task_type: str  # PEFT's task type: SEQ_CLS, CAUSAL_LM
    main: tuple[str, str]  # (dev split, metric) that picks the best epoch
    higher_is_better: bool

    def load_model(self, model_name: str) -> tuple[Any, nn.Module]:
        """Tokenizer and model (with the task's head)."""

    def head(self, model: nn.Module) -> str | None:
        """The module every method trains whole (a classifier head), or None."""

    def read(self, tokenizer) -> tuple[Split, dict[str, Split]]:
        """The encoded training split and the dev split(s) by name."""

    def collate(self, split: Split, rows: list[int]) -> dict[str, torch.Tensor]:
        """A padded training batch of ``split``'s ``rows``."""

    def loss_module(self, model: nn.Module) -> nn.Module:
        """What the loop calls (and DDP wraps): ``module(**batch)`` returns the mean loss."""

    def loss_units(self, split: Split, rows: list[int]) -> int:
        """How many terms the mean loss of ``split``'s ``rows`` averages: completion tokens (causal
        LMs), rows (classifiers). Gradient accumulation and processes weigh their means by it."""

    def evaluate(self, model: nn.Module, dev: dict[str, Split], world: World, out: Path | None = None
                 ) -> dict[str, dict[str, float]]:
        """``{split: {metric: value}}``; may write generated outputs into ``out``."""

    def info(self) -> dict[str, Any]:
        """What an adapter folder's ``task.json`` records about the task."""


def report(message: str) -> None:
    """Print ``message`` once: in the main process under ``torchrun`` (``RANK`` 0)."""
    if os.environ.get("RANK", "0") == "0":
        print(message)


def first_rows(rows: list[Any], limit: int | None, what: str, flag: str) -> list[Any]:
    """The first ``limit`` of ``rows`` (None: all), said when that cuts any."""
    if limit is not None and limit < len(rows):
        report(f"using the first {limit:,} of {len(rows):,} {what} ({flag} {limit})")
    return rows[:limit]


# Fields only some task families read, by group: (who reads them, the TrainConfig fields).
_ONLY = {
    "classify": ("--task classify (your own labelled files)", ("text_field", "text_pair_field", "label_field",
                                                               "problem_type")),
    "jsonl": ("--task jsonl (your own prompt/completion data)", ("prompt_field", "completion_field", "messages_field",
                                                                 "dataset_config", "train_split", "dev_split")),
    "files": ("--task jsonl and --task classify (your own files)", ("train_file", "dev_file", "dev_ratio")),
}


def refuse_unread_flags(cfg, reads: tuple[str, ...] = ()) -> None:
    """Refuse the fields of the groups of :data:`_ONLY` that ``cfg.task`` does not read (``reads``
    names those it does) when they are set away from their defaults: else they would be ignored."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    parts = []
    for group, (reader, names) in _ONLY.items():
        given = [f"--{n.replace('_', '-')}" for n in names if group not in reads and getattr(cfg, n) != defaults[n]]
        if given:
            verb = "" if parts else " apply" if len(given) > 1 else " applies"
            parts.append(f"{', '.join(given)}{verb} to {reader}")
    if parts:
        raise ValueError(f"{'; '.join(parts)}, not to --task {cfg.task}")


def refuse_packing(cfg) -> None:
    """Refuse ``--packing`` for a classifier: it classifies each row on its own."""
    if getattr(cfg, "packing", False):
        raise ValueError(f"--packing concatenates causal-LM rows (--task e2e, jsonl); --task {cfg.task} classifies "
                         "each row on its own: drop --packing")


# Metrics shown as percentages (stored as fractions, as the official scorers print them).
PERCENT_METRICS = frozenset({"accuracy", "f1", "macro_f1", "matthews", "pearson", "spearman", "BLEU", "METEOR", "ROUGE_L",
                             "token_accuracy"})


def format_metrics(metrics: dict[str, dict[str, float]]) -> str:
    """``dev accuracy 82.11, f1 87.52`` style: percentages for fractions, raw values otherwise
    (``dev/accuracy`` names, as in reports over several dev splits, count by their last part)."""
    parts = []
    for split, values in metrics.items():
        for name, v in values.items():
            percent = name.rsplit("/", 1)[-1] in PERCENT_METRICS
            shown = "n/a" if v is None else f"{100 * v:.2f}" if percent else f"{v:.4f}"
            parts.append(f"{split + ' ' if len(metrics) > 1 else ''}{name} {shown}")
    return ", ".join(parts)


def _family(name: str):
    from . import classify, glue, lm

    if name.lower() in lm.TASKS:
        return lm
    if name.lower() == classify.NAME:
        return classify
    try:
        glue.data.get_task(name)
    except ValueError:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(known())}") from None
    return glue


def canonical_name(name: str) -> str:
    """The task's name as run folders spell it (``sts-b`` -> ``stsb``)."""
    family = _family(name)
    return family.canonical_name(name)


def presets(name: str) -> dict[str, dict[str, Any]]:
    """``{preset: {field: value}}`` for the task (``paper``, ``demo``)."""
    return _family(name).presets(name)


def default_preset(name: str) -> str:
    """The preset ``lorakit train`` uses when none is named: ``demo`` for GLUE and E2E (their
    CPU-sized demos), ``none`` for the user's own data, JSONL or classify (the TrainConfig
    defaults: no label smoothing, no warm-up override, no truncation)."""
    return _family(name).default_preset(name)


def create(cfg) -> Task:
    """The task of a :class:`lorakit.train.TrainConfig`."""
    return _family(cfg.task).create(cfg)


def known() -> list[str]:
    from . import classify, glue, lm

    return [*glue.data.TASKS, *lm.TASKS, classify.NAME]
