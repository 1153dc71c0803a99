"""Training rows from any dataset source (issue #28, item 2).

A source is a local file (``.jsonl``, ``.json``, ``.csv``, ``.parquet``), a folder written by
``datasets``' ``save_to_disk``, or a Hugging Face Hub dataset name (``owner/name``). JSONL is read
without ``datasets`` (as before); the other sources need the optional ``datasets`` package,
imported only when one is read.

:func:`map_record` applies the column mapping (``--prompt-field``, ``--completion-field``,
``--messages-field``). A prompt field may name several columns, comma-separated
(``instruction,input``): their non-empty values are joined by a blank line, which is how Alpaca
rows (``instruction`` / ``input`` / ``output``) keep their ``input``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["FILE_TYPES", "PROMPT_JOIN", "Fields", "read_records", "map_record", "columns_hint", "text_lines", "json_object"]

# file extension -> the `datasets` builder that reads it (.jsonl is read here, without datasets)
FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
PROMPT_JOIN = "\n\n"


class Fields:
    """The column mapping. ``prompt``: one or more comma-separated columns; unset, rows are read by
    the default names (``prompt`` / ``completion``, or ``messages``) as JSONL rows always were."""

    def __init__(self, prompt: str | None = None, completion: str | None = None, messages: str | None = None) -> None:
        if messages is not None and (prompt is not None or completion is not None):
            raise ValueError("--messages-field maps conversations; it cannot be combined with --prompt-field or "
                             "--completion-field")
        self.prompt = [c.strip() for c in (prompt or "prompt").split(",") if c.strip()]
        if not self.prompt:
            raise ValueError(f"--prompt-field names no column: {prompt!r}")
        self.completion = completion or "completion"
        self.messages = messages
        self.mapped = prompt is not None or completion is not None or messages is not None


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ValueError("reading JSON, CSV, Parquet, a save_to_disk folder or a Hub dataset needs the `datasets` "
                         "package, which is not installed: pip install 'lorakit[hub]' (or datasets); JSONL files are "
                         "read without it") from None
    return datasets


def text_lines(path: str | Path) -> Iterable[tuple[str, str]]:
    """The non-blank lines of a UTF-8 text file, each with ``"path:line"`` for errors."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{number}: not UTF-8 text (byte {e.start + 1} of the line: {e.reason}); "
                                 "save the file as UTF-8") from None
            if line.strip():
                yield line, f"{path}:{number}"


def json_object(line: str, where: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def read_records(source: str, split: str = "train", config: str | None = None) -> list[tuple[dict[str, Any], str]]:
    """``(record, where)`` pairs of ``source``'s ``split``; ``where`` locates the record for errors
    (``file:line`` for JSONL, ``source row N`` otherwise). ``split`` and ``config`` apply to Hub
    datasets and to save_to_disk folders holding several splits; a file is one split."""
    path = Path(source)
    if path.is_dir():
        return _numbered(_from_disk(path, split), source)
    suffix = path.suffix.lower()
    if path.exists() or suffix in FILE_TYPES:
        if suffix not in FILE_TYPES:
            raise ValueError(f"{source}: unknown file type {suffix or '(no extension)'!r}; --train-file and --dev-file "
                             f"take {', '.join(FILE_TYPES)} files, a datasets save_to_disk folder or a Hub dataset name")
        if suffix == ".jsonl":
            return [(json_object(line, where), where) for line, where in text_lines(path)]
        if not path.is_file():
            raise ValueError(f"no such file: {source}")
        return _numbered(_datasets().load_dataset(FILE_TYPES[suffix], data_files=str(path), split="train"), source)
    if "/" not in source:
        raise ValueError(f"no such file or folder: {source} (a Hub dataset is named owner/name, e.g. "
                         "HuggingFaceH4/no_robots)")
    return _numbered(_datasets().load_dataset(source, config, split=split), f"{source} ({split})")


def _numbered(records, source: str) -> list[tuple[dict[str, Any], str]]:
    return [(dict(r), f"{source} row {number}") for number, r in enumerate(records, start=1)]


def _from_disk(path: Path, split: str):
    if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise ValueError(f"{path} is a folder but not one written by datasets' save_to_disk (no dataset_info.json "
                         "or dataset_dict.json)")
    loaded = _datasets().load_from_disk(str(path))
    if hasattr(loaded, "keys"):  # a DatasetDict: pick the split
        if split not in loaded:
            raise ValueError(f"{path} has no split {split!r}; its splits: {', '.join(loaded.keys())} (--train-split, "
                             "--dev-split)")
        loaded = loaded[split]
    return loaded


def map_record(record: dict[str, Any], fields: Fields, where: str) -> dict[str, Any]:
    """``record`` as ``{"prompt", "completion"}`` or ``{"messages"}`` by the mapping (unchecked
    beyond the columns: the task checks the values). A missing column names the record's columns."""
    if not fields.mapped:
        return record
    if fields.messages is not None:
        if fields.messages not in record:
            _missing(record, [fields.messages], where)
        return {"messages": record[fields.messages]}
    missing = [c for c in (*fields.prompt, fields.completion) if c not in record]
    if missing:
        _missing(record, missing, where)
    prompt = PROMPT_JOIN.join(str(record[c]) for c in fields.prompt if record[c] not in (None, ""))
    return {"prompt": prompt, "completion": record[fields.completion]}


def _missing(record: dict[str, Any], missing: list[str], where: str) -> None:
    raise ValueError(f"{where}: no column {', '.join(map(repr, missing))}; {columns_hint(record)}")


def columns_hint(record: dict[str, Any]) -> str:
    """What a row that lacks a mapped column has, and how to map it."""
    return (f"its columns: {', '.join(map(repr, record)) or 'none'} (map them with --prompt-field and "
            "--completion-field, or --messages-field)")
