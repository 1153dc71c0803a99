"""GLUE classification and regression (paper section 5.2, Table 2) as a :class:`Task`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import data, quant
from ..distributed import World
from ..metrics import compute_metrics
from ..models import resolve_model
from . import Split, first_rows, refuse_packing, refuse_unread_flags

__all__ = ["GlueTask", "load_classifier", "mean_pooling", "tokenize", "evaluate", "create", "presets", "default_preset",
           "canonical_name", "POOLINGS"]

POOLINGS = ("cls", "mean")

# Table 9 of the paper (RoBERTa-base, LoRA): batch size, epochs, learning rate per task;
# r = 8, alpha = 16 (the official scripts), max length 512, warm-up 0.06, AdamW.
_PAPER = {"mnli": (16, 30, 5e-4), "sst2": (16, 60, 5e-4), "mrpc": (16, 30, 4e-4), "cola": (32, 80, 4e-4),
          "qnli": (32, 25, 4e-4), "qqp": (16, 25, 5e-4), "rte": (32, 80, 5e-4), "stsb": (16, 40, 4e-4)}


def presets(name: str) -> dict[str, dict[str, Any]]:
    bs, epochs, lr = _PAPER[canonical_name(name)]
    return {
        "paper": dict(batch_size=bs, epochs=epochs, lr=lr, max_length=512, lora_r=8, lora_alpha=16.0, warmup_ratio=0.06,
                      weight_decay=0.1, grad_clip=1.0),
        # A CPU-sized recipe for the embedded MiniLM: shorter, with a higher learning rate.
        "demo": dict(batch_size=16, epochs=8, lr=1e-3, max_length=128),
    }


def default_preset(name: str) -> str:
    return "demo"


def canonical_name(name: str) -> str:
    return data.get_task(name).name


def load_classifier(model_name: str, task: data.Task, pooling: str = "cls", quantize_base: str | None = None):
    """Tokenizer and sequence-classification model for ``task`` (regression for STS-B); the
    head reads the first token (``cls``, the model's own) or the masked mean (``mean``). The
    model's config names the task's classes (``id2label``), so a merged model saves them.
    ``quantize_base`` (nf4, fp4, bnb-int8): the encoder's linear layers quantized with bitsandbytes,
    the head in float32 (default: what ``lorakit.quant.base_quantization`` set)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()  # one-line errors on stderr, no loading bars before them
    path = resolve_model(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    names = {} if task.labels is None else dict(id2label=dict(enumerate(task.labels)),
                                                 label2id={name: i for i, name in enumerate(task.labels)})
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=task.num_labels, problem_type="regression" if task.labels is None else "single_label_classification",
        ignore_mismatched_sizes=True, **names,  # a folder with another task's head gets a fresh one
        **quant.load_kwargs(quantize_base if quantize_base is not None else quant.current_base_quantization(),
                            skip=quant.SKIPPED_HEADS),
    )
    quant.adopt_all(model)  # before any forward: computes in its compute dtype from the loaded weights (lorakit.quant)
    return tokenizer, mean_pooling(model) if pooling == "mean" else model


def mean_pooling(model: nn.Module, rows: Callable[[], torch.Tensor] | None = None) -> nn.Module:
    """Make the classification head of ``model`` (in place) read the mean of the last hidden
    states over the tokens its ``attention_mask`` keeps, instead of the first token: how
    sentence embedders such as all-MiniLM-L6-v2 and all-mpnet-base-v2 were trained.

    The encoder's output gets the mean in its first position, which every HF head reads
    (BERT's pooler, RoBERTa's and MPNet's classification heads), so the head itself and the
    model's files are unchanged; the pooling is recorded in the run's ``task.json``.
    ``rows()``, if given, says per forward which rows of the batch are pooled (a ``(B,)``
    bool tensor; the others keep their first token): a server mixing adapters of both poolings.
    """
    base = model.base_model
    encoder = getattr(base, "encoder", None)
    if base is model or not isinstance(encoder, nn.Module):
        raise ValueError(f"mean pooling needs an encoder classifier (model.<base>.encoder), not {type(model).__name__}")
    mask: list[torch.Tensor | None] = [None]

    def keep_mask(module, args, kwargs):
        mask[0] = kwargs.get("attention_mask")

    def pool(module, args, output):
        hidden = output[0]
        which = None if rows is None else rows().to(hidden.device)
        if which is not None and not which.any():
            return output
        keep = torch.ones(hidden.shape[:2], device=hidden.device) if mask[0] is None else mask[0]
        keep = keep.to(hidden.dtype).unsqueeze(-1)
        mean = (hidden * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1)  # (B, 1, H)
        first = mean if which is None else torch.where(which[:, None, None], mean, hidden[:, :1])
        output.last_hidden_state = torch.cat([first, hidden[:, 1:]], dim=1)
        return output

    base.register_forward_pre_hook(keep_mask, with_kwargs=True)
    encoder.register_forward_hook(pool)
    return model

def tokenize(tokenizer, examples: list[data.Example], max_length: int) -> Split:
    """Tokenise examples (pairs as two segments), truncated to ``max_length``; targets are the labels."""
    columns = list(zip(*(e.texts for e in examples)))
    enc = tokenizer(*columns, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    features = [{k: enc[k][i] for k in keys} for i in range(len(examples))]
    return Split(features, [e.label for e in examples])


@torch.no_grad()
def evaluate(model: nn.Module, task: data.Task, split: Split, batch_size: int, pad_id: int,
             world: World = World()) -> dict[str, float]:
    """The task's metrics on ``split``; with several processes each predicts a share of
    the batches and the predictions are gathered."""
    model.eval()
    predictions: list[float] = [0.0] * len(split)
    batches = list(data.sequential_batches(len(split), batch_size, split.lengths))
    share = batches[world.rank :: world.size]
    # Every process runs as many forward passes (FSDP gathers weights in each); extras are dropped.
    padding = [[]] * (-(-len(batches) // world.size) - len(share))
    mine: list[tuple[int, float]] = []
    for idx in share + padding:
        rows = idx or batches[0]
        batch = data.collate([split.features[i] for i in rows], [split.targets[i] for i in rows], pad_id, task.labels is None)
        batch.pop("labels")
        logits = model(**{k: v.to(world.device) for k, v in batch.items()}).logits.float()
        values = logits.squeeze(-1) if task.labels is None else logits.argmax(-1)
        mine += zip(idx, values.tolist())
    for part in world.gather(mine):
        for i, v in part:
            predictions[i] = v
    return compute_metrics(task.metrics, predictions, split.targets)


def _head_name(model: nn.Module) -> str:
    for name in ("classifier", "score"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ValueError(f"cannot find the classification head of {type(model).__name__} (expected 'classifier' or 'score')")


class _ModelLoss(nn.Module):
    """``model(**batch).loss`` as a module's output (what DDP wraps)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.model(**batch).loss


class GlueTask:
    """One GLUE task read from a tsv folder (or the hub), scored with the paper's metrics; with
    ``task`` given, that classification task instead (the user's own files: :mod:`.classify`)."""

    task_type = "SEQ_CLS"
    higher_is_better = True

    def __init__(self, cfg, task: data.Task | None = None) -> None:
        self.task = task or data.get_task(cfg.task)
        self.name = self.task.name
        self.main = (self.task.dev_splits[0], self.task.main_metric)
        self.cfg = cfg
        self.pad_id = 0

    def load_model(self, model_name: str):
        tokenizer, model = load_classifier(model_name, self.task, self.cfg.pooling, getattr(self.cfg, "quantize_base", None))
        self.pad_id = tokenizer.pad_token_id or 0
        return tokenizer, model

    def head(self, model: nn.Module) -> str | None:
        return _head_name(model)

    def read(self, tokenizer) -> tuple[Split, dict[str, Split]]:
        cfg = self.cfg
        data_dir = cfg.data_dir if cfg.data_dir is not None else data.default_data_dir()
        train = first_rows(data.read_split(self.task, "train", data_dir), cfg.max_train_examples, "training rows",
                           "--max-train-examples")
        dev = {s: tokenize(tokenizer, first_rows(data.read_split(self.task, s, data_dir), cfg.max_eval_examples,
                                                 f"{s} rows", "--max-eval-examples"), cfg.max_length)
               for s in self.task.dev_splits}
        return tokenize(tokenizer, train, cfg.max_length), dev

    def collate(self, split: Split, rows: list[int]) -> dict[str, torch.Tensor]:
        return data.collate([split.features[i] for i in rows], [split.targets[i] for i in rows], self.pad_id,
                            self.task.labels is None)

    def loss_module(self, model: nn.Module) -> nn.Module:
        return _ModelLoss(model)

    def loss_units(self, split: Split, rows: list[int]) -> int:
        return len(rows)  # the model's loss is the mean over rows

    def evaluate(self, model: nn.Module, dev: dict[str, Split], world: World, out: Path | None = None
                 ) -> dict[str, dict[str, float]]:
        return {s: evaluate(model, self.task, split, self.cfg.eval_batch_size, self.pad_id, world)
                for s, split in dev.items()}

    def info(self) -> dict[str, Any]:
        return {"task": self.name, "pooling": self.cfg.pooling}


def create(cfg) -> GlueTask:
    refuse_unread_flags(cfg)
    refuse_packing(cfg)
    return GlueTask(cfg)
