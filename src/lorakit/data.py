"""GLUE tasks: readers for the original tsv layout and for the HF ``datasets`` hub,
and length-grouped batching with dynamic padding (to a multiple of 8 tokens).

The tsv files are read line by line and split on tabs (CSV quoting would break
MRPC/STS-B rows); columns are found by header name, CoLA by position (no header).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["Task", "TASKS", "Example", "get_task", "read_split", "default_data_dir", "length_grouped_batches", "collate",
           "padded_width", "load_hub_dataset", "PAD_MULTIPLE"]


@dataclass(frozen=True)
class Task:
    """One GLUE task: where its text and label live and how it is scored (paper Table 2)."""

    name: str
    folder: str
    text_columns: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...] | None  # None: regression on a float score
    metrics: tuple[str, ...]
    dev_splits: tuple[str, ...] = ("dev",)
    hub_columns: tuple[str, ...] = ()
    headerless_columns: tuple[int, ...] = ()  # (label, text...) positions for CoLA

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def main_metric(self) -> str:
        return self.metrics[0]


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("cola", "CoLA", ("sentence",), "label", ("0", "1"), ("matthews",), hub_columns=("sentence",),
             headerless_columns=(1, 3)),
        Task("sst2", "SST-2", ("sentence",), "label", ("0", "1"), ("accuracy",), hub_columns=("sentence",)),
        Task("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), ("accuracy", "f1"),
             hub_columns=("sentence1", "sentence2")),
        Task("qqp", "QQP", ("question1", "question2"), "is_duplicate", ("0", "1"), ("accuracy", "f1"),
             hub_columns=("question1", "question2")),
        Task("stsb", "STS-B", ("sentence1", "sentence2"), "score", None, ("pearson", "spearman"),
             hub_columns=("sentence1", "sentence2")),
        Task("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"),
             ("accuracy",), dev_splits=("dev_matched", "dev_mismatched"), hub_columns=("premise", "hypothesis")),
        Task("qnli", "QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"), ("accuracy",),
             hub_columns=("question", "sentence")),
        Task("rte", "RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), ("accuracy",),
             hub_columns=("sentence1", "sentence2")),
    ]
}
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli"}


@dataclass(frozen=True)
class Example:
    texts: tuple[str, ...]
    label: float | int


def get_task(name: str) -> Task:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[key]


def default_data_dir() -> Path | None:
    """``$LORAKIT_GLUE_DIR``, else ``../shared/data/glue`` when it exists."""
    env = os.environ.get("LORAKIT_GLUE_DIR")
    if env:
        return Path(env)
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = base.parent / "shared" / "data" / "glue"
        if candidate.is_dir():
            return candidate
    return None


def read_split(task: Task, split: str, data_dir: str | Path | None) -> list[Example]:
    """Examples of ``split`` ("train", "dev", "dev_matched", ...) from a GLUE tsv folder,
    or from the HF hub (``nyu-mll/glue``) when ``data_dir`` is ``"hub"``."""
    if str(data_dir) == "hub":
        return _read_hub(task, split)
    if data_dir is None:
        raise ValueError("no GLUE data found: pass --data-dir DIR (the GLUE tsv layout) or --data-dir hub")
    path = Path(data_dir) / task.folder / f"{split}.tsv"
    if not path.is_file():
        raise ValueError(f"missing {split} split of {task.name}: expected the file {path}")
    return _read_tsv(task, path)


def _label(task: Task, raw: str, where: str) -> float | int:
    raw = raw.strip()
    if task.labels is None:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{where}: expected a numeric score, got {raw!r}") from None
    if raw not in task.labels:
        raise ValueError(f"{where}: unknown label {raw!r}; expected one of {list(task.labels)}")
    return task.labels.index(raw)


def _read_tsv(task: Task, path: Path) -> list[Example]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file (expected the GLUE tsv layout)") from None
    if not lines or (not task.headerless_columns and len(lines) < 2):
        raise ValueError(f"{path}: no rows" + ("" if not lines else " after the header line"))
    if task.headerless_columns:
        label_col, *text_cols = task.headerless_columns
        start = 0
    else:
        header = lines[0].split("\t")
        wanted = (task.label_column, *task.text_columns)
        missing = [c for c in wanted if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; expected {list(wanted)} in the header {header}")
        label_col, *text_cols = (header.index(c) for c in wanted)
        start = 1
    examples = []
    width = max(label_col, *text_cols) + 1
    for number, line in enumerate(lines[start:], start=start + 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < width:
            raise ValueError(f"{path}:{number}: expected at least {width} tab-separated fields, got {len(fields)}")
        label = _label(task, fields[label_col], f"{path}:{number}")
        examples.append(Example(tuple(fields[c] for c in text_cols), label))
    if not examples:
        raise ValueError(f"{path}: no rows")
    return examples


def load_hub_dataset(name: str, *args: Any, **kwargs: Any):
    """``datasets.load_dataset(name, ...)``; a one-line error where the optional ``datasets`` package is missing."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--data-dir hub reads {name} from the Hugging Face Hub with the `datasets` package, which "
                         "is not installed: pip install 'lorakit[hub]' (or datasets)") from None
    return datasets.load_dataset(name, *args, **kwargs)


def _read_hub(task: Task, split: str) -> list[Example]:
    hub_split = {"dev": "validation", "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}
    rows = load_hub_dataset("nyu-mll/glue", task.name, split=hub_split.get(split, split))
    return [Example(tuple(row[c] for c in task.hub_columns), row["label"]) for row in rows]


# ---- batching ------------------------------------------------------------------------------


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                           group: int = 50) -> list[list[int]]:
    """Shuffled batches of indices whose members have similar lengths.

    Indices are shuffled (seeded by ``seed`` and ``epoch``), cut into chunks of
    ``group`` batches, sorted by length inside each chunk, split into batches,
    and the batches shuffled again: padding stays small and the order random.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    chunk = batch_size * group
    batches = []
    for i in range(0, len(order), chunk):
        part = sorted(order[i : i + chunk], key=lambda j: -lengths[j])
        batches += [part[k : k + batch_size] for k in range(0, len(part), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


# Batches are padded to a multiple of this many tokens. With every batch its own width, each
# width allocates tensors of new sizes: glibc keeps the freed pieces (a fragmented heap) and
# oneDNN builds kernels per shape, so a long process grows. MiniLM on MRPC: resident memory
# 1.8 -> 2.4 GB over 6 epochs padded to the longest row, flat at 1.05 GB rounded up to 8, for
# 6% more tokens (bench/padding.py).
PAD_MULTIPLE = 8


def padded_width(lengths: Iterable[int], multiple: int = PAD_MULTIPLE) -> int:
    """The longest of ``lengths`` rounded up to a multiple of ``multiple``."""
    return -(-max(lengths) // multiple) * multiple


def collate(features: Sequence[dict[str, list[int]]], labels: Sequence[float | int], pad_id: int,
            regression: bool, multiple: int = PAD_MULTIPLE) -> dict[str, torch.Tensor]:
    """Pad a batch of tokenised examples to its longest member, rounded up to ``multiple``."""
    width = padded_width((len(f["input_ids"]) for f in features), multiple)
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        fill = pad_id if key == "input_ids" else 0
        batch[key] = torch.tensor([f[key] + [fill] * (width - len(f[key])) for f in features])
    batch["labels"] = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
    return batch


def sequential_batches(n: int, batch_size: int, lengths: Sequence[int]) -> Iterator[list[int]]:
    """Evaluation batches: sorted by length (little padding), every index once."""
    order = sorted(range(n), key=lambda i: -lengths[i])
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]
