"""Causal-LM tasks: a prompt and a completion, loss on the completion only (paper
section 5.5 and Table 3: GPT-2 on the E2E NLG Challenge; Table 11: its recipe).

- ``e2e``: the E2E NLG Challenge's CSV files (``mr,ref``): prompt = the meaning
  representation, completion = one human reference + EOS. Dev and test are scored per
  unique MR with all its references (BLEU, NIST, METEOR, ROUGE-L, CIDEr).
- ``jsonl``: the user's files, one JSON object per line, ``{"prompt", "completion"}``
  or ``{"messages": [{"role", "content"}, ...]}`` (chat template, loss on assistant turns).

Prompts are plain text (``prompt_format="plain"``: the prompt, ``prompt_separator`` (a
newline unless set; ``""`` joins TRL-style rows verbatim), the completion) or the model's chat
template (``"chat"``: the prompt is the user's turn). ``task.json`` records both, so that
``lorakit generate`` and ``eval`` prompt an adapter as it was trained.
The training loss is the token-level mean cross-entropy with label smoothing
``eps`` over completion tokens ``y_t``:
``-(1 - eps) log p(y_t) - eps / V sum_v log p(v)``; logits are computed only where the
loss is taken.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import data, quant
from ..distributed import World, as_forward, is_sharded
from ..models import resolve_model
from ..training.datasets import Fields, columns_hint, json_object, map_record, read_records, text_lines
from . import Split, first_rows, refuse_unread_flags, report

__all__ = ["TASKS", "LMTask", "CausalLMLoss", "read_e2e", "read_jsonl", "read_rows", "check_row",
           "encode", "collate", "load_causal_lm",
           "e2e_data_dir", "create", "presets", "default_preset", "canonical_name", "decoding_for", "evaluate_e2e", "prompt_ids",
           "group_references", "score_outputs", "read_prompts", "read_conversations", "conversation_ids",
           "require_system_role", "trained_prompt_format"]

TASKS = ("e2e", "jsonl")
IGNORE = -100

_PAPER = dict(batch_size=8, epochs=5, lr=2e-4, warmup_steps=500, weight_decay=0.01, lora_dropout=0.1,
              label_smoothing=0.1, lora_r=4, lora_alpha=32.0, max_length=512, grad_clip=0.0, decoding="paper")
# CPU-sized (make demo-e2e): 300 steps on the first 2,400 E2E training rows, dev on 100 MRs with
# greedy decoding; a higher learning rate than the paper's 5-epoch recipe.
_DEMO = dict(batch_size=8, epochs=1, lr=1e-3, warmup_steps=50, weight_decay=0.01, lora_dropout=0.1,
             label_smoothing=0.1, lora_r=4, lora_alpha=32.0, max_length=128, grad_clip=1.0, decoding="greedy",
             max_train_examples=2400, max_eval_examples=100)


def presets(name: str) -> dict[str, dict[str, Any]]:
    """``paper``: Table 11 (GPT-2 M on E2E); ``demo``: sized for a 2-core CPU."""
    return {"paper": dict(_PAPER), "demo": dict(_DEMO)}


def default_preset(name: str) -> str:
    """``demo`` for E2E (its CPU-sized demo); ``none`` for your own JSONL data: a neutral recipe
    (no label smoothing, no warm-up override, no truncation) unless a preset is named."""
    return "demo" if name.lower() == "e2e" else "none"


def canonical_name(name: str) -> str:
    return name.lower()


def decoding_for(name: str, max_new_tokens: int = 64):
    """``greedy`` or ``paper`` (beam 10, length penalty 0.9, no repeated 4-grams)."""
    from ..generate import PAPER_DECODING, Decoding

    if name == "greedy":
        return Decoding(max_new_tokens=max_new_tokens)
    if name == "paper":
        import dataclasses

        return dataclasses.replace(PAPER_DECODING, max_new_tokens=max_new_tokens)
    raise ValueError(f"decoding must be 'greedy' or 'paper', got {name!r}")


# ---- data ----------------------------------------------------------------------------------


def e2e_data_dir(data_dir: str | Path | None = None) -> Path:
    """``data_dir``, else ``$LORAKIT_E2E_DIR``, else ``../shared/data/e2e``."""
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get("LORAKIT_E2E_DIR"):
        return Path(os.environ["LORAKIT_E2E_DIR"])
    glue = data.default_data_dir()
    if glue is not None and (glue.parent / "e2e").is_dir():
        return glue.parent / "e2e"
    raise ValueError("no E2E data found: pass --data-dir DIR (trainset.csv, devset.csv, testset_w_refs.csv)")


_E2E_FILES = {"train": "trainset.csv", "dev": "devset.csv", "test": "testset_w_refs.csv"}


def read_e2e(split: str, data_dir: str | Path | None = None) -> list[tuple[str, str]]:
    """``(mr, ref)`` rows of ``split`` (train, dev, test), from the CSV files or, with
    ``data_dir="hub"``, the HF dataset ``tuetschek/e2e_nlg``."""
    if split not in _E2E_FILES:
        raise ValueError(f"E2E split must be one of {list(_E2E_FILES)}, got {split!r}")
    if str(data_dir) == "hub":
        rows = data.load_hub_dataset("tuetschek/e2e_nlg", split={"dev": "validation"}.get(split, split))
        return [(r["meaning_representation"], r["human_reference"]) for r in rows]
    path = e2e_data_dir(data_dir) / _E2E_FILES[split]
    if not path.is_file():
        raise ValueError(f"missing E2E {split} split: expected the file {path}")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:2]] != ["mr", "ref"]:
            raise ValueError(f"{path}: expected a CSV with the header 'mr,ref', got {header}")
        return [(row[0], row[1]) for row in reader if row]


def group_references(rows: Iterable[tuple[str, str]]) -> tuple[list[str], list[list[str]]]:
    """Unique MRs in order of first appearance, and each one's references."""
    groups: dict[str, list[str]] = {}
    for mr, ref in rows:
        groups.setdefault(mr, []).append(ref)
    return list(groups), list(groups.values())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file, each ``{"prompt": str, "completion": str}`` or
    ``{"messages": [{"role": ..., "content": str}, ...]}`` with at least one assistant turn.
    Errors name the file and line."""
    rows = [check_row(json_object(line, where), where) for line, where in text_lines(path)]
    if not rows:
        raise ValueError(f"{path}: no rows (expected one JSON object per line)")
    return rows


def read_rows(source: str, fields: Fields | None = None, split: str = "train", config: str | None = None
              ) -> list[dict[str, Any]]:
    """Rows of any dataset source (JSONL, JSON, CSV, Parquet, a save_to_disk folder, a Hub name:
    :mod:`lorakit.training.datasets`) mapped by ``fields`` and checked as JSONL rows are."""
    fields = fields or Fields()
    rows = [check_row(map_record(record, fields, where), where) for record, where in read_records(source, split, config)]
    if not rows:
        raise ValueError(f"{source}: no rows")
    return rows


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Rows ``{"prompt": str, "adapter": str (optional)}`` of a JSONL file for generation."""
    rows = []
    for line, where in text_lines(path):
        row = json_object(line, where)
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("adapter", ""), str):
            raise ValueError(f"{where}: expected {{\"prompt\": str}} (and optionally \"adapter\": str)")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows (expected one JSON object per line)")
    return rows


def read_conversations(path: str | Path) -> list[dict[str, Any]]:
    """Rows ``{"messages": [{"role", "content"}, ...], "adapter": str (optional)}`` of a JSONL file for
    generation: each line a JSON list of messages or an object with ``"messages"``. The reply to each
    conversation is generated, so none may end with an assistant turn."""
    rows = []
    for line, where in text_lines(path):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        row = {"messages": value} if isinstance(value, list) else value
        if not isinstance(row, dict) or "messages" not in row or not isinstance(row.get("adapter", ""), str):
            raise ValueError(f"{where}: expected a JSON list of {{\"role\", \"content\"}} messages or an object "
                             "{\"messages\": [...]} (and optionally \"adapter\": str)")
        messages = _check_messages(row["messages"], where)
        if messages[-1]["role"] == "assistant":
            raise ValueError(f"{where}: the conversation ends with an assistant turn; end it with the turn to answer "
                             "(lorakit generate writes the assistant's reply)")
        rows.append({"messages": messages, **({"adapter": row["adapter"]} if "adapter" in row else {})})
    if not rows:
        raise ValueError(f"{path}: no rows (expected one conversation per line)")
    return rows


def check_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    """``row`` as ``{"prompt", "completion"}`` or ``{"messages"}``; a one-line error naming ``where``."""
    if "messages" in row:
        messages = _check_messages(row["messages"], where)
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where}: 'messages' has no assistant turn to learn")
        return {"messages": messages}
    for key in ("prompt", "completion"):
        if not isinstance(row.get(key), str):
            raise ValueError(f"{where}: expected {{\"prompt\": str, \"completion\": str}} or {{\"messages\": [...]}}; "
                             f"'{key}' is {'missing' if key not in row else type(row[key]).__name__}"
                             + (f"; {columns_hint(row)}" if key not in row else ""))
    if not row["completion"]:
        raise ValueError(f"{where}: 'completion' is empty")
    return {"prompt": row["prompt"], "completion": row["completion"]}


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{\"role\": str, \"content\": str}}")
    return messages


# ---- encoding ------------------------------------------------------------------------------


def _ids(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _chat(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt_format 'chat' needs a tokenizer with a chat template; use --prompt-format plain")
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as e:  # a template's raise_exception(), e.g. "roles must alternate user/assistant"
        raise ValueError(f"the chat template refused a conversation: {e}") from None
    return _ids(tokenizer, text)


def prompt_ids(tokenizer, prompt: str, prompt_format: str, separator: str = "\n") -> list[int]:
    """The tokens a completion follows: ``prompt + separator`` (plain; a newline by default,
    ``""`` for rows whose prompt and completion join verbatim, as TRL's ``"Capital:"`` +
    ``" Paris"``) or the user's turn and the assistant header of the chat template (chat)."""
    if prompt_format == "chat":
        return _chat(tokenizer, [{"role": "user", "content": prompt}], generation_prompt=True)
    return _ids(tokenizer, prompt + separator, special=True)


def conversation_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The tokens the next assistant turn follows: ``messages`` and the assistant header, through the chat template."""
    return _chat(tokenizer, messages, generation_prompt=True)


def require_system_role(tokenizer, model_name: str) -> None:
    """A one-line error unless the chat template shows a system message: some raise on one (Gemma's
    "System role not supported"), some drop it."""
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"--system needs a chat template; the tokenizer of {model_name} has none")
    probe = [{"role": "system", "content": _MARK}, {"role": "user", "content": "hi"}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except TemplateError as e:
        why = f"it raises {str(e)!r}"
    else:
        if _MARK in text:
            return
        why = "it drops system messages"
    raise ValueError(f"--system: the chat template of {model_name} has no system role ({why}); put the "
                     "instructions in the user turn instead")


def encode(tokenizer, row: dict[str, Any], prompt_format: str, max_length: int,
           separator: str = "\n") -> dict[str, list[int]] | None:
    """``{"input_ids", "labels"}`` with labels ``IGNORE`` outside the completion (or the
    assistant turns); None when truncation leaves no completion token. Prompt/completion rows
    are ``prompt_ids(prompt, prompt_format, separator)`` + the completion's tokens + EOS
    (tokenized apart, as a prompt is at generation); ``messages`` rows always go through the
    chat template."""
    if "messages" in row:
        ids, labels = _encode_messages(tokenizer, row["messages"])
    else:
        prompt = prompt_ids(tokenizer, row["prompt"], prompt_format, separator)
        completion = _ids(tokenizer, row["completion"]) + [tokenizer.eos_token_id]
        ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
    ids, labels = ids[:max_length], labels[:max_length]
    if all(t == IGNORE for t in labels[1:]):
        return None
    return {"input_ids": ids, "labels": labels}


def _encode_messages(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """The whole conversation through the chat template; labels on each assistant turn
    (the tokens its message adds after the generation prompt), never on anything else."""
    ids = _chat(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_chat(tokenizer, messages[:i], generation_prompt=True)) if i else _first_turn_start(tokenizer, messages)
        end = len(_chat(tokenizer, messages[: i + 1], generation_prompt=False))
        labels[start:end] = ids[start:end]
    return ids, labels


_MARK = "\x1florakit-turn\x1f"  # a content no conversation holds (a control character each side)


def _first_turn_start(tokenizer, messages: list[dict[str, str]]) -> int:
    """Tokens before the content of an opening assistant turn. The template of no message with
    a generation prompt is not that prefix: templates add a default system prompt only when
    the conversation has messages (SmolLM2's, Qwen's), so render the turn with a marker as its
    content and count the tokens before the marker."""
    text = tokenizer.apply_chat_template([{**messages[0], "content": _MARK}], tokenize=False, add_generation_prompt=False)
    if _MARK not in text:
        raise ValueError("the chat template does not show an opening assistant message's content; "
                         "start the conversation with a user (or system) message")
    return len(_ids(tokenizer, text[: text.index(_MARK)]))


def collate(features: list[dict[str, list[int]]], pad_id: int, multiple: int = data.PAD_MULTIPLE) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``labels`` (``IGNORE`` on padding), as wide as the longest
    row rounded up to ``multiple``, and ``attention_mask``; packed sequences
    (:mod:`lorakit.training.packing`) carry ``position_ids`` instead, their padding a row of its
    own (positions from 0) that no other row sees."""
    width = data.padded_width((len(f["input_ids"]) for f in features), multiple)
    pad = [width - len(f["input_ids"]) for f in features]
    batch = {
        "input_ids": torch.tensor([f["input_ids"] + [pad_id] * n for f, n in zip(features, pad)]),
        "labels": torch.tensor([f["labels"] + [IGNORE] * n for f, n in zip(features, pad)]),
    }
    if "position_ids" in features[0]:
        batch["position_ids"] = torch.tensor([f["position_ids"] + list(range(n)) for f, n in zip(features, pad)])
    else:
        batch["attention_mask"] = torch.tensor([[1] * len(f["input_ids"]) + [0] * n for f, n in zip(features, pad)])
    return batch


# ---- model and loss ------------------------------------------------------------------------


def load_causal_lm(model_name: str, quantize_base: str | None = None, empty: bool = False):
    """Tokenizer (with a pad token) and causal LM; float32 weights, or its linear layers quantized with
    bitsandbytes (``quantize_base``: nf4, fp4, bnb-int8; default: what ``lorakit.quant.base_quantization`` set).

    ``empty``: the model on the meta device, to be sharded and then filled by
    :func:`lorakit.training.materialise.materialise` (``--fsdp``). A folder with a config and no
    weights gives a model of random weights (transformers' init, seeded by each module's name)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    from ..training.materialise import empty_causal_lm, materialise, weightless

    logging.set_verbosity_error()
    logging.disable_progress_bar()  # one-line errors on stderr, no loading bars before them
    path = resolve_model(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {model_name!r} has no EOS token; completions need one to stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    quantize_base = quantize_base if quantize_base is not None else quant.current_base_quantization()
    random = weightless(path)
    if random and quantize_base:
        raise ValueError(f"--quantize-base {quantize_base}: {model_name} has a config and no weights; bitsandbytes "
                         "quantizes loaded weights, so give a folder with model.safetensors or drop --quantize-base")
    if random:
        report(f"{model_name}: a config and no weights: random weights (transformers' init, seeded by module names)")
    if empty or random:
        model = empty_causal_lm(_local_folder(path))
        if not empty:
            materialise(model, "cpu", None)
        return tokenizer, model
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **quant.load_kwargs(quantize_base))
    quant.adopt_all(model)  # before any forward: computes in its compute dtype from the loaded weights (lorakit.quant)
    return tokenizer, model


def _local_folder(path: str) -> str:
    """``path``, or the local copy of a Hub model's config and safetensors files."""
    if Path(path).is_dir():
        return path
    from huggingface_hub import snapshot_download

    return snapshot_download(path, allow_patterns=["*.json", "*.safetensors"])


def _right_padded(mask: torch.Tensor) -> bool:
    """True if every row of ``mask: (B, T)`` is ones then zeros."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


class CausalLMLoss(nn.Module):
    """Completion-only, label-smoothed next-token loss of a transformers causal LM.

    The decoder runs on ``input_ids: (B, T)``; the output projection only on the
    ``N`` positions whose next token is a label: ``(N, H) -> (N, V)`` instead of
    ``(B, T, V)`` (for a 49k vocabulary the full logits dominate memory).

    ``forward`` returns the training objective (smoothed when ``label_smoothing > 0``) and
    keeps the plain cross-entropy of the same tokens in ``reported`` (detached): the training
    loss lorakit shows, comparable with the dev loss, which is never smoothed.
    """

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing
        self.reported: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``attention_mask`` for padded rows, or ``position_ids`` (restarting at each row, no
        mask) for packed ones: transformers then keeps the rows apart (:mod:`lorakit.training.packing`)."""
        # FSDP: a forward of the model
        return as_forward(self.model, self._loss, input_ids, attention_mask, labels, position_ids)

    def _loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
              position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None and _right_padded(attention_mask):
            # Causal attention never lets a real token see the padding after it, and padded
            # positions carry no label: the plain causal mask (SDPA's is_causal path) suffices.
            attention_mask = None
        # base_model: the decoder stack in every transformers version (get_decoder() is the whole
        # model for GPT-2 before transformers 5)
        packed = {} if position_ids is None else {"position_ids": position_ids}  # not every family takes them
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                       **packed).last_hidden_state  # (B, T, H)
        targets = labels[:, 1:]
        where = targets != IGNORE
        logits = self.model.get_output_embeddings()(hidden[:, :-1][where]).float()  # (N, V)
        loss = F.cross_entropy(logits, targets[where], label_smoothing=self.label_smoothing)
        if not self.label_smoothing:
            self.reported = loss.detach()
            return loss
        with torch.no_grad():
            self.reported = F.cross_entropy(logits, targets[where])
        return loss


# ---- the task ------------------------------------------------------------------------------


class LMTask:
    """E2E or JSONL prompt -> completion fine-tuning of a causal LM."""

    task_type = "CAUSAL_LM"

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.name = cfg.task.lower()
        self.higher_is_better = self.name == "e2e"  # e2e: dev BLEU; jsonl: dev loss
        self.main = ("dev", "BLEU" if self.name == "e2e" else "loss")
        self.tokenizer = None
        self.prompt_format = cfg.prompt_format  # how the training rows were encoded: set by read()
        self._held_out: dict[str, list[dict[str, Any]]] | None = None  # without a dev source: train/dev rows
        if self.name == "jsonl" and not cfg.train_file:
            raise ValueError("--task jsonl needs --train-file (JSONL, JSON, CSV, Parquet, a save_to_disk folder or a "
                             "Hub dataset name) and, optionally, --dev-file or --dev-split (else --dev-ratio holds "
                             "training rows out)")
        if getattr(cfg, "pooling", "cls") != "cls":
            raise ValueError(f"--pooling applies to classifiers, not to the causal-LM task {self.name}")
        refuse_unread_flags(cfg, ("jsonl", "files") if self.name == "jsonl" else ())

    def load_model(self, model_name: str):
        """Under ``--fsdp`` the model is built on the meta device: the trainer fills each process's
        shards after sharding, so no process holds the whole base."""
        empty = getattr(self.cfg, "fsdp", False)
        if empty and getattr(self.cfg, "use_dora", False):
            raise ValueError("--fsdp with --use-dora: DoRA's magnitude is computed from the whole base weight, which "
                             "no process holds under --fsdp (built on the meta device); train DoRA with DDP (drop --fsdp)")
        self.tokenizer, model = load_causal_lm(model_name, getattr(self.cfg, "quantize_base", None), empty=empty)
        return self.tokenizer, model

    def head(self, model: nn.Module) -> str | None:
        return None

    def _rows(self, split: str) -> list[dict[str, Any]]:
        if self.name == "e2e":
            return [{"prompt": mr, "completion": ref} for mr, ref in read_e2e(split, self.cfg.data_dir)]
        if self._held_out is not None:
            return self._held_out[split]
        cfg = self.cfg
        fields = Fields(cfg.prompt_field, cfg.completion_field, cfg.messages_field)
        if split == "dev" and (cfg.dev_file or cfg.dev_split):
            return read_rows(cfg.dev_file or cfg.train_file, fields, cfg.dev_split or cfg.train_split, cfg.dataset_config)
        train = read_rows(cfg.train_file, fields, cfg.train_split, cfg.dataset_config)
        if cfg.dev_file or cfg.dev_split:
            return train
        from .classify import held_out

        rows, dev = held_out(train, cfg.dev_ratio, cfg.train_file)
        self._held_out = {"train": rows, "dev": dev}
        return self._held_out[split]

    def encode_rows(self, rows: list[dict[str, Any]], tokenizer, what: str = "training rows") -> Split:
        """``rows`` encoded; rows that leave no completion token within ``max_length`` are
        dropped and counted (all of them: an error)."""
        cfg = self.cfg
        encoded = [encode(tokenizer, row, cfg.prompt_format, cfg.max_length, cfg.prompt_separator) for row in rows]
        kept = [(f, row) for f, row in zip(encoded, rows) if f is not None]
        why = f"longer than --max-length {cfg.max_length} (no completion token left)"
        if not kept:
            raise ValueError(f"all {len(rows):,} {what} are {why}: raise --max-length")
        if len(kept) < len(rows):
            report(f"dropped {len(rows) - len(kept):,} of {len(rows):,} {what}: {why}")
        return Split([f for f, _ in kept], [row for _, row in kept])

    def read(self, tokenizer) -> tuple[Split, dict[str, Split]]:
        rows = first_rows(self._rows("train"), self.cfg.max_train_examples, "training rows", "--max-train-examples")
        self.prompt_format = trained_prompt_format(rows, self.cfg.prompt_format)
        train = self.encode_rows(rows, tokenizer)
        dev_rows = self._rows("dev")
        what = "dev rows"
        if self.name == "e2e":  # one row per MR, carrying all its references
            mrs, refs = group_references((r["prompt"], r["completion"]) for r in dev_rows)
            dev_rows = [{"prompt": mr, "completion": group[0], "references": group} for mr, group in zip(mrs, refs)]
            what = "dev MRs"
        dev_rows = first_rows(dev_rows, self.cfg.max_eval_examples, what, "--max-eval-examples")
        return train, {"dev": self.encode_rows(dev_rows, tokenizer, what)}

    def collate(self, split: Split, rows: list[int]) -> dict[str, torch.Tensor]:
        return collate([split.features[i] for i in rows], self.tokenizer.pad_token_id)

    def loss_module(self, model: nn.Module) -> nn.Module:
        return CausalLMLoss(model, self.cfg.label_smoothing)

    def loss_units(self, split: Split, rows: list[int]) -> int:
        """Completion tokens: the labels that follow a position (what ``CausalLMLoss`` averages)."""
        return sum(sum(t != IGNORE for t in split.features[i]["labels"][1:]) for i in rows)

    @torch.no_grad()
    def dev_loss(self, model: nn.Module, split: Split, world: World) -> float:
        """Mean completion-token loss (no label smoothing) over ``split``."""
        model.eval()
        module, total, count = CausalLMLoss(model), 0.0, 0
        batches = list(data.sequential_batches(len(split), self.cfg.eval_batch_size, split.lengths))
        share = batches[world.rank :: world.size]
        # Every process runs as many forward passes (FSDP gathers weights in each); extras count 0.
        padding = [[]] * ((-(-len(batches) // world.size) - len(share)) if is_sharded(model) else 0)
        for rows in share + padding:
            batch = {k: v.to(world.device) for k, v in self.collate(split, rows or batches[0]).items()}
            tokens = int((batch["labels"][:, 1:] != IGNORE).sum()) if rows else 0
            loss = module(**batch).item()
            total, count = total + loss * tokens, count + tokens
        total, count = map(sum, zip(*world.gather((total, count))))
        return total / count

    def evaluate(self, model: nn.Module, dev: dict[str, Split], world: World, out: Path | None = None
                 ) -> dict[str, dict[str, float]]:
        split = dev["dev"]
        metrics = {"loss": self.dev_loss(model, split, world)}
        if self.name == "e2e":
            prompts = [prompt_ids(self.tokenizer, row["prompt"], self.cfg.prompt_format, self.cfg.prompt_separator)
                       for row in split.targets]
            outputs = self.generate(model, prompts, world)
            metrics.update(score_outputs(outputs, [row["references"] for row in split.targets], out, "dev"))
        return {"dev": metrics}

    def generate(self, model: nn.Module, prompts: list[list[int]], world: World = World()) -> list[str]:
        """Texts generated for ``prompts`` with the configured decoding; each process
        takes a share, every process gets all. An FSDP-sharded model generates every prompt
        in every process: each decoding step is a forward pass that all processes must run,
        and their completions differ in length."""
        from ..generate import generate_ids

        together = is_sharded(model)
        mine = list(range(len(prompts))) if together else list(range(world.rank, len(prompts), world.size))
        ids = generate_ids(model, [prompts[i] for i in mine], pad_id=self.tokenizer.pad_token_id,
                           eos_id=self.tokenizer.eos_token_id, decoding=decoding_for(self.cfg.decoding, self.cfg.max_new_tokens),
                           batch_size=self.cfg.eval_batch_size, progress=self.cfg.progress and world.main)
        texts: list[str] = [""] * len(prompts)
        for part in [list(zip(mine, ids))] if together else world.gather(list(zip(mine, ids))):
            for i, t in part:
                texts[i] = self.tokenizer.decode(t, skip_special_tokens=True).strip()
        return texts

    def info(self) -> dict[str, Any]:
        """``prompt_format``: how the adapter saw prompts (see :func:`trained_prompt_format`);
        ``prompt_separator``: what joined a plain prompt to its completion. ``lorakit
        generate`` and ``eval`` prompt the adapter the same way."""
        return {"task": self.name, "prompt_format": self.prompt_format, "prompt_separator": self.cfg.prompt_separator}


def trained_prompt_format(rows: list[dict[str, Any]], prompt_format: str) -> str:
    """How an adapter trained on ``rows`` saw a prompt, for ``task.json``: ``prompt_format``
    where the rows include prompt/completion rows (a generation prompt is such a prompt), else
    ``chat`` (``messages`` rows always go through the chat template). A file that mixes
    ``messages`` rows with plain prompt/completion rows trained both; it records ``plain``, said
    when reading; ``lorakit generate --prompt-format chat`` prompts it like the conversations."""
    conversations = sum("messages" in row for row in rows)
    if conversations == len(rows):
        return "chat"
    if conversations and prompt_format == "plain":
        report(f"{conversations:,} of {len(rows):,} training rows are conversations (chat template), the others "
               "plain prompt/completion rows: the adapter records prompt_format plain, as its prompts were")
    return prompt_format


def score_outputs(outputs: list[str], references: list[list[str]], out: Path | None, split: str) -> dict[str, float]:
    """The five E2E metrics; with ``out``, the outputs (one per line) and scores are written there."""
    from ..nlg_metrics import score

    scores = score(references, outputs)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{split}-outputs.txt").write_text("".join(o.replace("\n", " ") + "\n" for o in outputs))
        (out / f"{split}-scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    return scores


def evaluate_e2e(model: nn.Module, tokenizer, split: str = "test", *, data_dir: str | Path | None = None,
                 prompt_format: str = "plain", decoding=None, batch_size: int = 8, max_examples: int | None = None,
                 out: Path | None = None, progress: bool = True, prompt_separator: str = "\n") -> dict[str, float]:
    """One output per unique MR of ``split`` (630 in test), scored against all its
    references with the five E2E metrics (paper Table 3); outputs and scores go to ``out``.
    Prompts are built as in training (``prompt_format``, ``prompt_separator``: task.json's)."""
    from ..generate import PAPER_DECODING, generate_ids

    mrs, refs = group_references(read_e2e(split, data_dir))
    mrs, refs = mrs[:max_examples], refs[:max_examples]
    prompts = [prompt_ids(tokenizer, mr, prompt_format, prompt_separator) for mr in mrs]
    ids = generate_ids(model, prompts, pad_id=tokenizer.pad_token_id,
                       eos_id=tokenizer.eos_token_id, decoding=decoding or PAPER_DECODING, batch_size=batch_size,
                       progress=progress)
    outputs = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]
    return score_outputs(outputs, refs, out, split)


def create(cfg) -> LMTask:
    return LMTask(cfg)
