"""The classification engine of ``lorakit serve``: one base classifier, many adapters, each bringing its head.

Requests that arrive together are classified together whatever adapters they name (paper section
4.2): :func:`lorakit.adapter_per_row` runs each row of a forward pass through its own adapter. Every
method of :class:`Engine` runs on the single thread that owns the model
(:class:`lorakit.serving.classify_api.Batcher`'s), so forwards and adapter loads never overlap.
"""

import asyncio
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import data
from ..io import load_adapter
from ..layers import ModulesToSave
from ..model import adapter_per_row, remove_adapter
from ..models import resolve_model
from ..precision import precision_context, resolve_precision
from ..receipt import Receipt
from ..tasks.classify import task_of
from ..tasks.glue import POOLINGS, load_classifier, mean_pooling
from . import verify
from .adapters import adapter_folder, check_name, clip, task_info
from .config import ClientError, ServeConfig

__all__ = ["AdapterInfo", "Job", "Engine", "length_groups"]


@dataclass
class AdapterInfo:
    name: str
    path: str
    task: data.Task
    pooling: str = "cls"
    receipt: dict[str, Any] = field(default_factory=dict)  # its receipt's check (lorakit.serving.verify.settle)

    def public(self, with_path: bool = False) -> dict[str, Any]:
        """What clients see; the server's file path only for admins."""
        return {"name": self.name, **({"path": self.path} if with_path else {}), "task": self.task.name,
                "labels": self.task.labels, "inputs_per_row": len(self.task.text_columns), "pooling": self.pooling,
                "receipt": self.receipt}


@dataclass(eq=False)
class Job:
    """The rows of one request (or of one part of a large one), tokenized, queued for a forward pass;
    ``future`` receives their result."""

    info: AdapterInfo
    features: list[dict[str, list[int]]]
    future: asyncio.Future = field(repr=False)


class Engine:
    """One base classifier and its adapters; every method runs on the single worker thread."""

    def __init__(self, model_name: str, precision: str = "auto", config: ServeConfig | None = None) -> None:
        self.config = config or ServeConfig()  # (its verify_adapters and verify_tolerance)
        precision = resolve_precision(precision)
        self.model_name = model_name
        self.precision = precision
        # The base's own head is never used: every adapter brings its head (resized to its task).
        self.tokenizer, self.model = load_classifier(model_name, data.get_task("mrpc"))
        self.model.eval()
        self.adapters: dict[str, AdapterInfo] = {}
        # Which rows of the next forward read the masked mean (adapters trained with --pooling mean): set before
        # every forward once the pooling hooks are in (at the first such adapter).
        self.mean_rows = torch.zeros(0, dtype=torch.bool)
        self._pooling_hooked = False
        limit = getattr(self.tokenizer, "model_max_length", None)
        self.max_length = limit if isinstance(limit, int) and limit < 1_000_000 else 512  # the model's position limit

    def load(self, name: str, path: str, task: str | None = None) -> AdapterInfo:
        check_name(name)
        if name in self.adapters:
            raise ClientError(409, f"an adapter named {name!r} is already loaded; DELETE it first")
        folder = adapter_folder(path)
        info = task_info(folder)
        task = task or info.get("task")
        pooling = info.get("pooling", "cls")
        if pooling not in POOLINGS:
            raise ClientError(400, f"adapter {name!r} has pooling {clip(str(pooling))!r} in its task.json; "
                                   f"expected one of {POOLINGS}")
        if pooling == "mean" and not self._pooling_hooked:
            try:
                mean_pooling(self.model, rows=lambda: self.mean_rows)
            except ValueError as e:
                raise ClientError(400, f"adapter {name!r} was trained with mean pooling: {e}") from None
            self._pooling_hooked = True
        if not task:
            raise ClientError(400, f"{str(folder)[:200]!r} has no task.json; give the adapter's GLUE task "
                                   "(\"task\" here, --task for lorakit serve)")
        trained_on = info.get("model")
        try:
            if trained_on and resolve_model(trained_on) != resolve_model(self.model_name):
                raise ClientError(400, f"adapter {name!r} was trained on {trained_on!r}, but this server runs "
                                       f"{self.model_name!r}")
            glue_task = task_of({**info, "task": task})  # a GLUE task, or classify with its classes
            load_adapter(self.model, folder, name, resize_saved=True)
        except (ValueError, TypeError, RuntimeError, MemoryError) as e:  # bad config values, tensors too large
            raise ClientError(400, " ".join(str(e).split())[:1000]) from None
        try:
            problem = self._head_problem(name, glue_task, pooling)
        except Exception as e:  # a head whose forward fails
            problem = f"fails on a probe input: {type(e).__name__}: {str(e)[:300]}"
        if problem:
            remove_adapter(self.model, name)
            raise ClientError(400, f"adapter {name!r} {problem}")
        receipt = self._check_receipt(name, folder, pooling)
        self.adapters[name] = AdapterInfo(name, str(folder), glue_task, pooling, receipt)
        return self.adapters[name]

    def _check_receipt(self, name: str, folder, pooling: str) -> dict[str, Any]:
        """Adapter ``name``'s receipt checked through this engine's per-row forward (:mod:`lorakit.serving.verify`):
        its result, or under ``strict`` a 400 once the adapter is detached."""
        reference, mode = verify.receipt_of(folder, self.config.verify_adapters), self.config.verify_adapters
        report = reference if not isinstance(reference, Receipt) else verify.check(
            reference, self.model, name, folder, self._probe_log_probs(reference, name, pooling),
            self.config.verify_tolerance)
        return verify.settle(name, report, mode, lambda: remove_adapter(self.model, name))

    @torch.inference_mode()
    def _probe_log_probs(self, reference: Receipt, name: str, pooling: str) -> torch.Tensor | None:
        ids = reference.tensors.get("probe.ids")
        if ids is None:
            return None
        self.mean_rows = torch.tensor([pooling == "mean"] * len(ids))
        with adapter_per_row(self.model, [name] * len(ids)), precision_context(self.precision):
            logits = self.model(input_ids=ids.long()).logits.float()
        return torch.log_softmax(logits, dim=-1).reshape(-1, logits.shape[-1])

    def _head_problem(self, name: str, task: data.Task, pooling: str) -> str | None:
        """Why adapter ``name`` cannot classify ``task`` (None if it can): it must bring its
        own classification head, with one output per label (one for regression)."""
        head = next((m for m in (getattr(self.model, n, None) for n in ("classifier", "score")) if m is not None), None)
        if not (isinstance(head, ModulesToSave) and name in head.copies):
            return "has no classification head of its own (modules_to_save); it cannot classify"
        self.mean_rows = torch.tensor([pooling == "mean"])
        with torch.inference_mode(), adapter_per_row(self.model, [name]):
            width = self.model(**self.tokenizer("probe", return_tensors="pt")).logits.shape[-1]
        if width != task.num_labels:
            return f"has a head with {width} outputs, but task {task.name} has {task.num_labels}"
        return None

    def unload(self, name: str) -> None:
        if name not in self.adapters:
            raise ClientError(404, f"no adapter named {clip(name)!r}; loaded: {sorted(self.adapters)}")
        del self.adapters[name]
        remove_adapter(self.model, name)

    @torch.inference_mode()
    def classify(self, requests: list[Job]) -> list[dict[str, Any] | ClientError]:
        """All ``requests`` in mixed-adapter forward passes; a result (or error) per request.

        Rows are sorted by length and cut into as few groups as keep padding under
        ``WASTE`` (a forward's cost grows with its padded tokens on a CPU), each group
        one forward pass whatever adapters its rows use.
        """
        # An adapter may have been unloaded (or replaced under its name) while requests waited.
        live = [r for r in requests if self.adapters.get(r.info.name) is r.info]
        features = [f for r in live for f in r.features]
        adapters = [r.info.name for r in live for _ in r.features]
        mean = [r.info.pooling == "mean" for r in live for _ in r.features]
        logits: list[torch.Tensor] = [torch.empty(0)] * len(features)
        for group in length_groups([len(f["input_ids"]) for f in features]):
            batch = data.collate([features[i] for i in group], [0] * len(group), self.tokenizer.pad_token_id or 0, False)
            batch.pop("labels")
            self.mean_rows = torch.tensor([mean[i] for i in group])
            with adapter_per_row(self.model, [adapters[i] for i in group]), precision_context(self.precision):
                out = self.model(**batch).logits.float()
            for i, row in zip(group, out):
                logits[i] = row
        results: list[dict[str, Any] | ClientError] = []
        start = 0
        for r in requests:
            if r not in live:
                results.append(ClientError(404, f"adapter {r.info.name!r} was unloaded while the request waited"))
                continue
            info = r.info
            rows = logits[start:start + len(r.features)]
            start += len(r.features)
            results.append(_result(info, torch.stack([row[: info.task.num_labels] for row in rows])))
        return results


WASTE = 0.1  # padding allowed in a forward pass, as a fraction of its real tokens
MIN_TOKENS = 256  # a forward pass this small is not split further (small matmuls are inefficient)


def length_groups(lengths: list[int], waste: float = WASTE, min_tokens: int = MIN_TOKENS) -> list[list[int]]:
    """Row indices sorted by length and cut into groups: a new group starts when the next
    row would pad the current one (of at least ``min_tokens`` real tokens) past ``waste``."""
    groups: list[list[int]] = []
    group: list[int] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if group and real >= min_tokens and lengths[i] * (len(group) + 1) > (1 + waste) * (real + lengths[i]):
            groups.append(group)
            group, real = [], 0
        group.append(i)
        real += lengths[i]
    return [*groups, group] if group else groups


def _result(info: AdapterInfo, logits: torch.Tensor) -> dict[str, Any]:
    task = info.task
    if task.labels is None:
        return {"adapter": info.name, "task": task.name, "labels": None, "scores": logits[:, 0].tolist()}
    probs = logits.softmax(-1)
    return {"adapter": info.name, "task": task.name, "labels": [task.labels[i] for i in probs.argmax(-1).tolist()],
            "scores": probs.tolist(), "label_names": list(task.labels)}

