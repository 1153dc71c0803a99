"""Sequence classification and regression on the user's own files (``--task classify``).

Rows come from a CSV file (a header naming the columns) or a JSONL file (one object per
line): ``--text-field`` (and ``--text-pair-field`` for pairs, as MRPC) and ``--label-field``
name the fields. The labels are discovered from the training file:

- strings and integers are classes: strings in sorted (code point) order, integers in
  numeric order (``2`` before ``10``); a label that reads as a number counts as one, in a
  CSV as in JSON, so ``"1"``, ``1`` and ``1.0`` are the same class ``"1"``; JSON
  ``true``/``false`` are the classes ``"false"`` and ``"true"``;
- other numbers (``3.8``: not integral) mean regression on one score, as STS-B;
- ``--problem-type single_label_classification|regression`` overrides the guess.

The classes, in order, are the model's outputs ``0..n-1``; they are written with the
adapter (``task.json``: ``labels``, ``problem_type``, ``text_fields``, ``label_field``) so
that ``lorakit eval``, ``serve`` and ``merge`` (the HF config's ``id2label``) name them.
Without ``--dev-file`` a seeded share of the training rows (``--dev-ratio``) is held out as
the dev split, the same rows for every seed. Classification is scored with accuracy (the
best epoch's metric) and macro-F1, regression with Pearson and Spearman correlation.
Training, batching and evaluation are GLUE's (:class:`lorakit.tasks.glue.GlueTask`).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import data
from . import Split, first_rows, refuse_packing, refuse_unread_flags, report
from .glue import GlueTask, tokenize

__all__ = ["ClassifyTask", "Row", "read_rows", "discover_labels", "examples", "read_examples", "task_of", "create",
           "presets", "default_preset", "canonical_name", "PROBLEM_TYPES", "SPLIT_SEED", "held_out"]

NAME = "classify"
PROBLEM_TYPES = ("single_label_classification", "regression")
SPLIT_SEED = 0  # the held-out dev rows do not depend on the training seed: seeds are compared on the same rows
_METRICS = {"single_label_classification": ("accuracy", "macro_f1"), "regression": ("pearson", "spearman")}


def presets(name: str) -> dict[str, dict[str, Any]]:
    """``demo``: GLUE's CPU-sized recipe for MiniLM. No ``paper`` recipe: the paper has none for your data."""
    return {"demo": dict(batch_size=16, epochs=8, lr=1e-3, max_length=128)}


def default_preset(name: str) -> str:
    """``none``: your own data trains with the TrainConfig defaults unless a preset is named."""
    return "none"


def canonical_name(name: str) -> str:
    return NAME


# ---- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One row: its texts, its label as read (a class name, or a number), and ``path:line``."""

    texts: tuple[str, ...]
    label: str | int | float
    where: str


def _csv_records(path: Path, fields: tuple[str, ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(path:line, {column: value})`` per CSV row; the header must hold every field."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [name for name in fields if name not in header]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing} in the header {header}; name the columns with "
                             "--text-field, --text-pair-field and --label-field")
        for record in reader:
            yield f"{path}:{reader.line_num}", record


def _jsonl_records(path: Path, fields: tuple[str, ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(path:line, object)`` per non-blank JSONL line."""
    from ..training.datasets import json_object, text_lines  # UTF-8 and JSON errors name the line

    for line, where in text_lines(path):
        yield where, json_object(line, where)


# A format is one entry: the file's suffix and a reader of (where, record) pairs.
_READERS = {".csv": _csv_records, ".jsonl": _jsonl_records}


def read_rows(path: str | Path, text_fields: tuple[str, ...], label_field: str) -> list[Row]:
    """The rows of a CSV or JSONL file: texts from ``text_fields``, the label from ``label_field``.
    A row whose text or label is missing or empty is refused, naming the file and line."""
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"{path}: --task classify reads {' and '.join(_READERS)} files, not {path.suffix or 'no suffix'!r}")
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    try:
        rows = [_row(record, where, text_fields, label_field) for where, record in reader(path, text_fields + (label_field,))]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None
    except csv.Error as e:
        raise ValueError(f"{path}: not a readable CSV file ({e})") from None
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _row(record: dict[str, Any], where: str, text_fields: tuple[str, ...], label_field: str) -> Row:
    texts = []
    for name in text_fields:
        value = record.get(name)
        if value is None:
            raise ValueError(f"{where}: the text field {name!r} is missing")
        if not isinstance(value, str):
            raise ValueError(f"{where}: the text field {name!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise ValueError(f"{where}: the text field {name!r} is empty")
        texts.append(value)
    return Row(tuple(texts), _label(record.get(label_field), where, label_field), where)


def _label(value: Any, where: str, field: str) -> str | int | float:
    """A class name (str) or a number: strings that read as numbers become numbers."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValueError(f"{where}: the label field {field!r} is empty")
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return text
    if value is None:
        raise ValueError(f"{where}: the label field {field!r} is missing")
    if not isinstance(value, (int, float)):
        raise ValueError(f"{where}: the label field {field!r} must be a string or a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{where}: the label {value} is not a finite number")
    return value


def _name(label: str | int | float) -> str:
    """A label's class name: integral numbers as integers (``1.0`` -> ``"1"``)."""
    if isinstance(label, str):
        return label
    return str(int(label)) if float(label).is_integer() else repr(float(label))


def discover_labels(rows: list[Row], problem_type: str | None = None) -> tuple[tuple[str, ...] | None, str]:
    """``(class names in order, problem type)``; the names are None for regression (see the module doc)."""
    words = [r for r in rows if isinstance(r.label, str)]
    if problem_type is None:
        fractional = any(not float(r.label).is_integer() for r in rows if not isinstance(r.label, str))
        problem_type = "regression" if fractional and not words else "single_label_classification"
    elif problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type must be one of {PROBLEM_TYPES}, got {problem_type!r}")
    if problem_type == "regression":
        if words:
            raise ValueError(f"{words[0].where}: the label {words[0].label!r} is not a number; regression "
                             "(--problem-type regression) needs a numeric score in every row")
        return None, problem_type
    names = sorted({_name(r.label) for r in rows}, key=None if words else float)  # with words, numbers are names too
    if len(names) < 2:
        raise ValueError(f"{rows[0].where.rsplit(':', 1)[0]}: every row has the label {names[0]!r}; a classifier needs "
                         "at least two classes (or --problem-type regression for a score)")
    return tuple(names), problem_type


def examples(rows: list[Row], task: data.Task, source: str) -> list[data.Example]:
    """``rows`` as examples of ``task``: class indices (a label the task lacks is refused by
    name, with its first line), or float scores for regression."""
    if task.labels is None:
        words = [r for r in rows if isinstance(r.label, str)]
        if words:
            raise ValueError(f"{words[0].where}: the label {words[0].label!r} is not a number; this task is a "
                             "regression on a score")
        return [data.Example(r.texts, float(r.label)) for r in rows]
    index = {name: i for i, name in enumerate(task.labels)}
    unseen: dict[str, str] = {}
    for r in rows:
        if _name(r.label) not in index:
            unseen.setdefault(_name(r.label), r.where)
    if unseen:
        listed = ", ".join(f"{name!r} ({where})" for name, where in list(unseen.items())[:10])
        raise ValueError(f"label(s) {listed} are not among the classes {list(task.labels)} of {source}; a model "
                         "cannot predict a class it was not trained on")
    return [data.Example(r.texts, index[_name(r.label)]) for r in rows]


def read_examples(task: data.Task, path: str | Path, source: str = "the training file") -> list[data.Example]:
    """The examples of a CSV/JSONL file with ``task``'s fields and classes (``lorakit eval``)."""
    return examples(read_rows(path, task.text_columns, task.label_column), task, source)


def _task(text_fields: tuple[str, ...], label_field: str, labels: tuple[str, ...] | None, problem_type: str) -> data.Task:
    return data.Task(NAME, "", text_fields, label_field, labels, _METRICS[problem_type])


# ---- an adapter's task -------------------------------------------------------------------------


def task_of(info: dict[str, Any]) -> data.Task:
    """The :class:`lorakit.data.Task` an adapter's ``task.json`` describes: a GLUE task by
    name, or ``classify`` with the classes, text fields and label field it records."""
    name = info.get("task")
    if not isinstance(name, str) or name.lower() != NAME:
        return data.get_task(str(name))
    problem_type, labels = info.get("problem_type"), info.get("labels")
    fields, label_field = info.get("text_fields"), info.get("label_field")
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"--task classify needs the task.json that lorakit train --task classify writes beside the "
                         f"adapter (its classes and fields); its problem_type is {problem_type!r}, expected one of "
                         f"{PROBLEM_TYPES}")
    if problem_type == "regression":
        labels = None
    elif not (isinstance(labels, list) and len(labels) >= 2 and all(isinstance(x, str) for x in labels)
              and len(set(labels)) == len(labels)):
        raise ValueError(f"task.json: 'labels' must be a list of at least two distinct class names, got {labels!r}")
    if not (isinstance(fields, list) and len(fields) in (1, 2) and all(isinstance(x, str) and x for x in fields)):
        raise ValueError(f"task.json: 'text_fields' must be a list of one or two field names, got {fields!r}")
    if not (isinstance(label_field, str) and label_field):
        raise ValueError(f"task.json: 'label_field' must be a field name, got {label_field!r}")
    return _task(tuple(fields), label_field, None if labels is None else tuple(labels), problem_type)


# ---- the task ----------------------------------------------------------------------------------


def held_out(rows: list[Row], ratio: float, path: str) -> tuple[list[Row], list[Row]]:
    """``(training rows, dev rows)``: a seeded ``ratio`` of ``rows`` held out (at least one row),
    announced; the rows keep the file's order."""
    count = max(1, round(ratio * len(rows)))
    if count >= len(rows):
        raise ValueError(f"{path} has {len(rows)} row(s): too few to hold out {ratio:g} of them as the dev split; "
                         "pass --dev-file or add rows")
    chosen = set(torch.randperm(len(rows), generator=torch.Generator().manual_seed(SPLIT_SEED))[:count].tolist())
    report(f"no --dev-file: holding out {count:,} of the {len(rows):,} rows of {path} as the dev split "
           f"(--dev-ratio {ratio:g}, seeded: the same rows for every seed)")
    return [r for i, r in enumerate(rows) if i not in chosen], [r for i, r in enumerate(rows) if i in chosen]


class ClassifyTask(GlueTask):
    """GLUE's classifier training on the user's CSV/JSONL rows, with the classes they hold."""

    def __init__(self, cfg) -> None:
        missing = [flag for flag, value in (("--train-file", cfg.train_file), ("--text-field", cfg.text_field),
                                            ("--label-field", cfg.label_field)) if not value]
        if missing:
            raise ValueError(f"--task classify needs {', '.join(missing)} (a CSV or JSONL file and the names of its "
                             "text and label fields)")
        fields = (cfg.text_field,) + ((cfg.text_pair_field,) if cfg.text_pair_field else ())
        self.rows = read_rows(cfg.train_file, fields, cfg.label_field)
        labels, self.problem_type = discover_labels(self.rows, cfg.problem_type)
        super().__init__(cfg, _task(fields, cfg.label_field, labels, self.problem_type))

    def read(self, tokenizer) -> tuple[Split, dict[str, Split]]:
        cfg, task = self.cfg, self.task
        if cfg.dev_file:
            train_rows = self.rows
            dev = examples(read_rows(cfg.dev_file, task.text_columns, task.label_column), task, cfg.train_file)
        else:
            train_rows, dev_rows = held_out(self.rows, cfg.dev_ratio, cfg.train_file)
            dev = examples(dev_rows, task, cfg.train_file)
        train = first_rows(examples(train_rows, task, cfg.train_file), cfg.max_train_examples, "training rows",
                           "--max-train-examples")
        dev = first_rows(dev, cfg.max_eval_examples, "dev rows", "--max-eval-examples")
        return tokenize(tokenizer, train, cfg.max_length), {"dev": tokenize(tokenizer, dev, cfg.max_length)}

    def info(self) -> dict[str, Any]:
        return {**super().info(), "labels": None if self.task.labels is None else list(self.task.labels),
                "problem_type": self.problem_type, "text_fields": list(self.task.text_columns),
                "label_field": self.task.label_column}


def create(cfg) -> ClassifyTask:
    refuse_unread_flags(cfg, ("classify", "files"))
    refuse_packing(cfg)
    return ClassifyTask(cfg)

