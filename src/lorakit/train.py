"""Fine-tune a model on a task with LoRA or a baseline: GLUE classifiers (paper section
5.2, Table 2) and causal LMs on prompt -> completion data (section 5.5, Table 3: E2E).

Reads top to bottom: config, load, attach, data, loop, evaluate, save. The task (a
:class:`lorakit.tasks.Task`) reads, collates, computes the loss and evaluates; the loop
never asks which task it runs. One run per seed writes into ``<out>/seed<N>/``:
``log.jsonl``, ``summary.json``, ``curve.png``, the best epoch's adapter (``adapter/``,
PEFT format) or trainable weights (``trainable.safetensors``), generated outputs per
evaluation (``outputs/``, generation tasks), and ``checkpoint-<epoch>-<step>.pt``
after every epoch and every ``--save-steps`` steps so that ``--resume`` continues a
killed run where it stopped. Under ``torchrun`` the same code trains with DDP.

The loop counts optimizer steps as transformers' Trainer does (:mod:`lorakit.training.loop`):
``--gradient-accumulation-steps`` batches each, ``--max-steps`` of them or ``--epochs``, the
learning rate on a schedule of transformers' ``get_scheduler`` (``--lr-scheduler``); it evaluates after every
epoch or every ``--eval-steps``, and logs every ``--logging-steps``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import random
import shutil
import statistics
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import baselines, checkpoint, data, quant, runfiles, tasks
from .config import LoraConfig
from .distributed import World, fully_shard_model, setup
from .fastops import use_fast_dropout
from .io import PREFIX, adapter_state_dict, copy_strict, read_weights
from .model import add_lora, lora_layers, trainable_parameters
from .models import resolve_model
from .precision import PRECISIONS, precision_context, resolve_precision
from .settings import check_fields, int_list, pattern_text, read_yaml, string_list, typed
from .tasks import Task, format_metrics
from .training import loop, packing, schedule
from .training.materialise import Checkpoint, has_meta, materialise
from .variants import loraplus_param_groups

__all__ = ["TrainConfig", "resolve_config", "read_config_file", "write_config_file", "read_yaml", "train", "train_seeds",
           "seeds_report", "attach_method", "BASELINE_LR", "DEFAULT_MODELS"]


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; field docs become ``lorakit train --help``."""

    task: str = _opt("mrpc", "GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte), e2e, jsonl (your prompt/"
                             "completion files) or classify (your labelled CSV/JSONL files)")
    model: str = _opt("minilm", "model: minilm (embedded), mpnet-base, smollm2 (causal LM), or any HF name or folder")
    method: str = _opt("lora", "lora, full (full fine-tuning), bitfit (biases only) or adapter (Houlsby)")
    data_dir: str | None = _opt(None, "GLUE tsv / E2E csv folder, or 'hub' (default: ../shared/data/glue or /e2e)")
    train_file: str | None = _opt(None, "jsonl task: training rows {prompt, completion} or {messages} from a .jsonl, "
                                        ".json, .csv or .parquet file, a datasets save_to_disk folder or a Hub dataset "
                                        "name (owner/name; pip install 'lorakit[hub]' for all but JSONL); classify "
                                        "task: a CSV or JSONL file of texts and labels (the classes are read from it)")
    dev_file: str | None = _opt(None, "jsonl and classify tasks: dev rows, same formats (without it and without "
                                      "--dev-split: a seeded --dev-ratio of the training rows)")
    dataset_config: str | None = _opt(None, "jsonl task, a Hub dataset: its configuration (load_dataset's name)")
    train_split: str = _opt("train", "jsonl task, a Hub dataset or a save_to_disk folder of several splits: the "
                                     "training split")
    dev_split: str | None = _opt(None, "jsonl task: the dev split of the same Hub dataset or folder (or of --dev-file)")
    prompt_field: str | None = _opt(None, "jsonl task: the column holding the prompt; several, comma-separated "
                                          "(instruction,input), are joined by a blank line, empty ones left out "
                                          "(default: prompt)")
    completion_field: str | None = _opt(None, "jsonl task: the column holding the completion (default: completion)")
    messages_field: str | None = _opt(None, "jsonl task: the column holding conversations, lists of {role, content} "
                                            "(default: messages, where a row has no prompt)")
    text_field: str | None = _opt(None, "classify task: the column / JSON field holding the text")
    text_pair_field: str | None = _opt(None, "classify task: the field holding the second text of a pair (as MRPC)")
    label_field: str | None = _opt(None, "classify task: the field holding the label: strings and integers are classes "
                                         "(sorted; integers numerically), other numbers a regression score")
    problem_type: str | None = _opt(None, "classify task: single_label_classification or regression, overriding what "
                                          "the labels suggest")
    dev_ratio: float = _opt(0.1, "jsonl and classify tasks without --dev-file (or --dev-split): the share of training "
                                 "rows held out as dev (seeded, the same rows for every seed)")
    prompt_format: str = _opt("plain", "causal LM prompts: plain (prompt, separator, completion) or chat (chat template)")
    prompt_separator: str = _opt("\n", "plain prompts: the text between prompt and completion, recorded in task.json "
                                       "for generate and eval (default: a newline; '' joins them verbatim, as TRL does)")
    out: str = _opt("runs/{task}", "output folder; one seed<N>/ subfolder per seed")
    seeds: tuple[int, ...] = _opt((0,), "comma-separated seeds; the reported figure is the median over seeds")
    epochs: int = _opt(10, "training epochs (the best epoch is reported, as in the paper)")
    batch_size: int = _opt(16, "training batch size per process (under torchrun the global batch is N times larger)")
    lr: float = _opt(4e-4, "peak learning rate (AdamW; warm-up and decay: --lr-scheduler)")
    lr_scheduler: str = _opt("linear", "learning-rate schedule, transformers' get_scheduler: linear, cosine, "
                                       "cosine_with_restarts, polynomial, constant or constant_with_warmup; legacy_linear: "
                                       "lorakit's own before this flag (warm-up (s+1)/(w+1), not s/w), which runs started "
                                       "then recorded and resume on")
    gradient_accumulation_steps: int = _opt(1, "each optimizer step takes this many batches, the loss normalised by "
                                               "all their tokens (classifiers: rows): the update of a batch N times "
                                               "larger")
    max_steps: int | None = _opt(None, "train this many optimizer steps, overriding --epochs (the last epoch may end "
                                       "early; the schedule spans them) (default: --epochs)")
    max_length: int = _opt(128, "truncate examples to this many tokens (batches are padded dynamically, to a multiple of 8)")
    packing: bool = _opt(False, "causal LMs (TRL's packing): concatenate training rows into sequences of up to "
                                "--max-length tokens (first-fit, in an order the seed draws), each row attending only "
                                "to itself, its positions from 0; --batch-size then counts sequences. The loss is the "
                                "unpacked rows' loss")
    pooling: str = _opt("cls", "classifiers: the head reads the first token (cls, the model's own) or the masked "
                               "mean of the last hidden states (mean: how sentence embedders were trained)")
    warmup_ratio: float = _opt(0.06, "fraction of steps spent warming up the learning rate")
    warmup_steps: int | None = _opt(None, "warm-up steps (overrides --warmup-ratio)")
    weight_decay: float = _opt(0.1, "AdamW weight decay on matrices (not on biases or norms)")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this value (0: no clipping)")
    label_smoothing: float = _opt(0.0, "causal LM: label smoothing of the completion loss")
    lora_r: int = _opt(8, "LoRA rank r (PEFT's r)")
    lora_alpha: float = _opt(16.0, "LoRA alpha: the update is scaled by alpha/r (PEFT's lora_alpha)")
    lora_dropout: float = _opt(0.1, "dropout on the LoRA branch input")
    target_modules: str | None = _opt(None, "comma-separated LoRA target modules, or all-linear (every linear layer but "
                                            "the output layer; default: the query/value projections)")
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": (
        "other ranks for some layers, PEFT's rank_pattern: 'q_proj=16,v_proj=4' (a key is a regex matched against the "
        "end of a module's name, the first match wins; YAML: a mapping) (default: none)")})
    alpha_pattern: dict[str, float] = field(default_factory=dict, metadata={"help": (
        "other alphas for some layers, PEFT's alpha_pattern, given as --rank-pattern (default: none)")})
    use_dora: bool = _opt(False, "DoRA (weight-decomposed LoRA, PEFT's use_dora): a trained magnitude per output "
                                 "channel on top of the LoRA direction")
    loraplus_lr_ratio: float | None = _opt(None, "LoRA+: B's learning rate is this times --lr (A's), as PEFT's "
                                                 "create_loraplus_optimizer (LoRA on embeddings: 1e-6) (default: off)")
    adapter_dim: int = _opt(64, "bottleneck size of Houlsby adapters (method adapter)")
    init_adapter: str | None = _opt(None, "start the LoRA factors from this adapter (the paper's MNLI start)")
    resume: bool = _opt(False, "continue from the newest complete checkpoint in the run folder")
    overwrite: bool = _opt(False, "replace a previous run in the output folder (without it, lorakit refuses)")
    report_to: str = _opt("none", "experiment tracking: none, or tensorboard (scalars in <run>/tensorboard)")
    eval_steps: int = _opt(0, "evaluate every N optimizer steps and after the last (0: after every epoch); the best "
                              "evaluation's weights are saved")
    save_steps: int = _opt(0, "also checkpoint every N optimizer steps, counted over the run (0: after every epoch "
                              "only); --save-every is its older name")
    save_total_limit: int = _opt(2, "keep this many checkpoints, the newest (0: all of them)")
    logging_steps: int | None = _opt(None, "every N optimizer steps print the mean training loss, learning rate and "
                                           "gradient norm, and send them to --report-to (default: no lines; "
                                           "--report-to gets every step)")
    fsdp: bool = _opt(False, "under torchrun: shard the model across processes with FSDP2 instead of DDP's copies")
    eval_batch_size: int = _opt(64, "evaluation (and generation) batch size")
    max_train_examples: int | None = _opt(None, "use only the first N training examples (quick runs, tests)")
    max_eval_examples: int | None = _opt(None, "use only the first N dev examples (E2E: unique MRs)")
    decoding: str = _opt("greedy", "causal LM dev generation: greedy, or paper (beam 10, length penalty 0.9, no 4-gram repeats)")
    max_new_tokens: int = _opt(64, "causal LM: longest generated completion")
    progress: bool = _opt(True, "show progress bars")
    fast_dropout: bool = _opt(True, "fast dropout (lorakit.fastops) in LoRA and the model; --no-fast-dropout: torch's")
    gradient_checkpointing: bool = _opt(False, "recompute each transformer block's activations in the backward pass: "
                                               "less memory, about a third more time")
    precision: str = _opt("auto", "auto: bf16 where the CPU/GPU has native bf16 (AVX-512 BF16, AMX), else fp32; fp32; "
                                  "bf16 (autocast: bfloat16 matmuls, fp32 weights and optimizer)")
    quantize_base: str | None = _opt(None, "QLoRA: load the frozen base quantized with bitsandbytes, nf4 or fp4 (4-bit, "
                                           "double quantization) or bnb-int8 (LLM.int8), and train LoRA on it; task.json "
                                           "records it for eval, generate, merge and serve (pip install 'lorakit[quant]')")

    def __post_init__(self) -> None:
        check_fields(self, _field_types())
        tasks.canonical_name(self.task)
        if self.method not in baselines.METHODS:
            raise ValueError(f"method must be one of {baselines.METHODS}, got {self.method!r}")
        for name in ("epochs", "batch_size", "max_length", "eval_batch_size", "lora_r", "adapter_dim", "max_new_tokens",
                     "gradient_accumulation_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_steps", "save_steps", "save_total_limit"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be 0 or positive, got {getattr(self, name)}")
        for name in ("max_steps", "logging_steps"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive (or None: {_UNSET[name]}), got {getattr(self, name)}")
        schedule.check_scheduler(self.lr_scheduler)
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        for name in ("max_train_examples", "max_eval_examples"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive (or None: all rows), got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.prompt_format not in ("plain", "chat"):
            raise ValueError(f"prompt_format must be 'plain' or 'chat', got {self.prompt_format!r}")
        if self.report_to not in runfiles.REPORT_TO:
            raise ValueError(f"report_to must be one of {runfiles.REPORT_TO}, got {self.report_to!r}")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}")
        if self.problem_type not in (None, "single_label_classification", "regression"):
            raise ValueError(f"problem_type must be single_label_classification or regression, got {self.problem_type!r}")
        if not 0.0 < self.dev_ratio < 1.0:
            raise ValueError(f"dev_ratio must be between 0 and 1 (exclusive), got {self.dev_ratio}")
        if self.decoding not in ("greedy", "paper"):
            raise ValueError(f"decoding must be 'greedy' or 'paper', got {self.decoding!r}")
        if self.loraplus_lr_ratio is not None and not self.loraplus_lr_ratio > 0:
            raise ValueError(f"loraplus_lr_ratio must be positive (B's lr / A's), got {self.loraplus_lr_ratio}")
        LoraConfig(rank_pattern=self.rank_pattern, alpha_pattern=self.alpha_pattern)  # checked as LoraConfig checks them
        self._check_quantize_base()

    def _check_quantize_base(self) -> None:
        quant.check_quantize_base(self.quantize_base)
        if self.quantize_base is None:
            return
        if self.method != "lora":
            raise ValueError(f"--quantize-base {self.quantize_base} keeps the base frozen in few bits and trains LoRA on it; "
                             f"--method {self.method} cannot train it (use --method lora, or no --quantize-base)")
        if self.fsdp:
            raise ValueError(f"--fsdp with --quantize-base {self.quantize_base}: FSDP2 shards float parameters, not "
                             "bitsandbytes' packed weights; train a quantized base with DDP (drop --fsdp)")
        quant.require_bitsandbytes(f"--quantize-base {self.quantize_base}")

    @property
    def run_dir(self) -> Path:
        return Path(self.out.format(task=tasks.canonical_name(self.task), model=self.model, method=self.method))


_UNSET = {"max_steps": "--epochs decides", "logging_steps": "no log lines"}


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


# Presets hold LoRA's learning rates; the baselines take these instead (full fine-tuning
# in the range RoBERTa used, BitFit and adapters as in their papers' GLUE runs).
BASELINE_LR = {"full": 5e-5, "bitfit": 1e-3, "adapter": 5e-4}
# The model a task family trains when --model is not given.
DEFAULT_MODELS = {"e2e": "smollm2", "jsonl": "smollm2"}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML file of TrainConfig fields (and ``preset``), each value checked against its field's
    type (see :mod:`lorakit.settings`: ``lr: 1e-4``, a string in YAML 1.1, reads as the number);
    ``seeds`` is an integer or a flat list of them, ``target_modules`` a string (comma-separated) or
    a flat list of module names. Older names (``r``, ``alpha``, ``targets``, in runs written before
    the PEFT/TRL names) and TRL's ``lora_target_modules`` are read as today's. Errors name the file and the key."""
    values = read_yaml(path, {f.name for f in dataclasses.fields(TrainConfig)} | set(checkpoint.ALIASES) | {"preset"})
    hints = {**_field_types(), "preset": str}
    try:  # each value checked under the name the file gives it, then renamed
        return checkpoint.current_names({key: _config_value(key, value, hints[checkpoint.ALIASES.get(key, key)])
                                         for key, value in values.items()})
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _config_value(key: str, value: Any, hint: Any) -> Any:
    if value is None:
        return None
    if key == "seeds":
        return tuple(int_list(key, value))
    if checkpoint.ALIASES.get(key, key) == "target_modules" and not isinstance(value, str):
        return ",".join(string_list(key, value))
    if key in ("rank_pattern", "alpha_pattern") and isinstance(value, str):  # as on the command line
        return pattern_text(key, value, typing.get_args(hint)[1])
    return typed(key, value, hint)


def write_config_file(cfg: TrainConfig, seed: int, path: Path) -> None:
    """``cfg`` for one seed as YAML, fully resolved: ``lorakit train --config path`` repeats the run."""
    import yaml

    values = {"preset": "none", **dataclasses.asdict(cfg), "seeds": [seed], "resume": False, "overwrite": False}
    path.write_text(yaml.safe_dump(values, sort_keys=False))


def resolve_config(preset: str | None, **overrides: Any) -> TrainConfig:
    """Defaults, then the preset's values for the task (and method), then explicit ``overrides``."""
    task = overrides.get("task") or TrainConfig.task
    method = overrides.get("method") or TrainConfig.method
    values: dict[str, Any] = {"model": DEFAULT_MODELS.get(tasks.canonical_name(task), TrainConfig.model)}
    if preset is not None:
        recipes = tasks.presets(task)
        if preset not in recipes:
            raise ValueError(f"unknown preset {preset!r}; choose one of {list(recipes)}")
        values.update(recipes[preset])
        if method in BASELINE_LR:
            values["lr"] = BASELINE_LR[method]
    values.update({k: v for k, v in checkpoint.current_names(overrides).items() if v is not None})
    return TrainConfig(**values)


# ---- model -----------------------------------------------------------------------------------


def _lora_config(model: nn.Module, cfg: TrainConfig, task: Task, head: str | None) -> LoraConfig:
    targets: tuple[str, ...] | str | None = tuple(cfg.target_modules.split(",")) if cfg.target_modules else None
    if cfg.target_modules == "all-linear":  # LoraConfig's (and PEFT's) keyword: every linear layer but the output
        targets = cfg.target_modules
    enable = {}
    if targets is None and _is_fused_qkv(model):  # GPT-2's c_attn = q|k|v: adapt the q and v slices (paper)
        targets, enable = ("c_attn",), {"c_attn": (True, False, True)}
    # a path or hub id PEFT's AutoPeftModel* can load (not lorakit's alias such as "minilm")
    return LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=targets,
                      modules_to_save=(head,) if head else (), enable_lora=enable, use_dora=cfg.use_dora,
                      rank_pattern=cfg.rank_pattern, alpha_pattern=cfg.alpha_pattern,
                      base_model_name_or_path=resolve_model(cfg.model), task_type=task.task_type)


def _is_fused_qkv(model: nn.Module) -> bool:
    return any(name.endswith(".c_attn") and type(m).__name__ == "Conv1D" for name, m in model.named_modules())


def attach_method(model: nn.Module, cfg: TrainConfig, task: Task | None = None) -> list[str]:
    """Make only the method's parameters trainable; returns the adapted module names."""
    task = task or tasks.create(cfg)
    head = task.head(model)
    if cfg.method == "lora":
        add_lora(model, _lora_config(model, cfg, task, head))
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


def _prepare(cfg: TrainConfig, task: Task, world: World = World()):
    """Tokenizer and model with the method attached (and fast dropout if asked)."""
    tokenizer, model = task.load_model(cfg.model)
    adapted = attach_method(model, cfg, task)
    if cfg.fast_dropout:
        use_fast_dropout(model)
    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if world.main:
        if adapted:
            names = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in adapted}))
            print(f"{cfg.method}: adapted {len(adapted)} modules: {names}")
        print(trainable_parameters(model))
    return tokenizer, model


# ---- training --------------------------------------------------------------------------------


def _optimizer(model: nn.Module, cfg: TrainConfig, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if cfg.loraplus_lr_ratio is not None:  # LoRA+ (the schedule below scales each group's own lr)
        if cfg.method != "lora":
            raise ValueError(f"--loraplus-lr-ratio applies to --method lora, not {cfg.method}")
        groups = loraplus_param_groups(model, cfg.lr, cfg.loraplus_lr_ratio, weight_decay=cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    return optimizer, schedule.create_scheduler(optimizer, cfg.lr_scheduler, _warmup(cfg, total_steps), total_steps)


def _warmup(cfg: TrainConfig, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)


def _recipe(cfg: TrainConfig, task: Task, train_rows: int, dev_rows: int, plan: loop.Plan) -> str:
    """The resolved values a run's result depends on, in one line (printed as it starts)."""
    warmup = _warmup(cfg, plan.total_steps)
    smoothing = f", label smoothing {cfg.label_smoothing:g}" if task.task_type == "CAUSAL_LM" else ""
    how = "--warmup-steps" if cfg.warmup_steps is not None else f"ratio {cfg.warmup_ratio:g}"
    method = (f"lora r {cfg.lora_r}, alpha {cfg.lora_alpha:g}, dropout {cfg.lora_dropout:g}, "
              f"targets {cfg.target_modules or 'default'}" + _variants(cfg)
              if cfg.method == "lora" else cfg.method + (f" (dim {cfg.adapter_dim})" if cfg.method == "adapter" else ""))
    limits = "".join(f", {flag} {value}" for flag, value in (("--max-train-examples", cfg.max_train_examples),
                                                            ("--max-eval-examples", cfg.max_eval_examples)) if value)
    steps = (f"{cfg.epochs} epochs x {plan.steps_per_epoch} steps" if cfg.max_steps is None else
             f"--max-steps {cfg.max_steps} ({plan.steps_per_epoch} per epoch)")
    accumulated = cfg.gradient_accumulation_steps
    unit = "packed sequences" if cfg.packing else "rows"
    rows = f"{cfg.batch_size * accumulated} {unit}" + (f" ({accumulated} accumulated batches of {cfg.batch_size})"
                                                       if accumulated > 1 else "")
    return (f"recipe: {cfg.model}, {method}; lr {cfg.lr:g}, {steps} of {rows}, warm-up {warmup} steps ({how}){smoothing}, "
            f"weight decay {cfg.weight_decay:g}, grad clip {cfg.grad_clip:g}, max length {cfg.max_length}; {train_rows:,} "
            f"training {unit}, {dev_rows:,} dev rows{limits}; {cfg.lr_scheduler} schedule")


def _variants(cfg: TrainConfig) -> str:
    """The LoRA options beyond r, alpha and targets, as the recipe line shows them."""
    parts = [f"{name} {_pattern_shown(getattr(cfg, name))}" for name in ("rank_pattern", "alpha_pattern")
             if getattr(cfg, name)]
    parts += ["DoRA"] * cfg.use_dora + ([f"LoRA+ ratio {cfg.loraplus_lr_ratio:g}"] if cfg.loraplus_lr_ratio else [])
    return "".join(", " + p for p in parts)


def _pattern_shown(pattern: dict[str, Any]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in pattern.items())


def _train_epoch(loss_fn: nn.Module, task: Task, cfg: TrainConfig, plan: loop.Plan, precision: str, split,
                 order: list[list[int]], epoch: int, optimizer, scheduler, progress: checkpoint.Progress, world: World,
                 run: Path, after_step, tracker: runfiles.Tracker) -> None:
    """The optimizer steps of ``order`` (one per entry: its global rows) from ``progress.step`` on,
    updating ``progress``; ``after_step(step, epoch_end)`` after each (``step``: counted over the
    run; it returns whether it evaluated the model). ``loss_fn`` may be DDP-wrapped."""
    from tqdm.auto import tqdm

    loss_fn.train()
    trainable = [p for p in loss_fn.parameters() if p.requires_grad]
    bar = tqdm(total=len(order), initial=progress.step, disable=not (cfg.progress and world.main),
               desc=f"epoch {epoch + 1}/{plan.epochs}", leave=False)
    window = [0.0, 0]  # loss sum and rows since the last log line
    for step in range(progress.step, len(order)):
        started = time.perf_counter()
        done = loop.accumulate(loss_fn, task, split, order[step], plan.micro_rows, world, precision)
        norm = _local(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)).item()
        value = next((v for v, _, _ in done if not math.isfinite(v)), done[-1][0])
        if world.any(not (math.isfinite(value) and math.isfinite(norm))):  # one collective per step
            what = f"the training loss became {value}" if not math.isfinite(value) else "the gradient norm became non-finite"
            _stop(what, progress, step, run)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum, n = sum(shown * rows for _, shown, rows in done), sum(rows for _, _, rows in done)
        progress.step, progress.loss_sum, progress.seen = step + 1, progress.loss_sum + loss_sum, progress.seen + n
        progress.seconds += time.perf_counter() - started
        window = [window[0] + loss_sum, window[1] + n]
        global_step = epoch * plan.steps_per_epoch + progress.step
        if plan.logging_steps is None or plan.logs(global_step):
            values = {"loss": window[0] / max(1, window[1]), "lr": scheduler.get_last_lr()[0], "grad_norm": norm,
                      "examples_per_second": progress.seen * world.size / progress.seconds}
            tracker.step(global_step, values)
            if plan.logging_steps is not None and world.main:
                tqdm.write(f"step {global_step}/{plan.total_steps} (epoch {global_step / plan.steps_per_epoch:.2f}): "
                           f"loss {values['loss']:.4f}, lr {values['lr']:.3g}, grad norm {norm:.3g}")
            window = [0.0, 0]
        bar.update()
        bar.set_postfix(loss=f"{progress.loss_sum / max(1, progress.seen):.4f}",
                        ex_s=f"{progress.seen * world.size / progress.seconds:.1f}")
        if after_step(global_step, progress.step == len(order)):  # it evaluated
            loss_fn.train()
    bar.close()


def _packed(split, max_length: int, seed: int, world: World):
    """``split``'s rows packed into sequences of ``max_length`` tokens (:mod:`lorakit.training.packing`), said."""
    packed = packing.pack(split, max_length, seed)
    if world.main:
        tokens = sum(split.lengths)
        print(f"--packing: {len(split):,} training rows in {len(packed):,} sequences of up to {max_length} tokens "
              f"({tokens / (len(packed) * max_length):.1%} of their room filled)")
    return packed


def _local(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor (FSDP's gradient norm is a DTensor)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _stop(what: str, progress: checkpoint.Progress, step: int, run: Path) -> None:
    last = checkpoint.checkpoints(run)
    raise FloatingPointError(
        f"{what} at epoch {progress.epoch + 1}, step {step + 1}; stopped before updating the weights. Last good "
        f"checkpoint: {last[0] if last else 'none'}. To change --lr or --precision (a lower rate, or fp32 instead "
        f"of bf16 often helps), start a new run with another --out")


# What a run writes into its folder (besides checkpoints).
_RUN_FILES = ("log.jsonl", "summary.json", "curve.png", "task.json", "trainable.safetensors", "adapter", "outputs",
              "config.yaml", "tensorboard")


def _previous_run(run: Path) -> list[str]:
    """Names of a previous run's files in ``run``."""
    return [n for n in _RUN_FILES if (run / n).exists()] + [p.name for p in checkpoint.checkpoints(run)]


def _fresh_start(run: Path) -> None:
    """Remove a previous run's files and checkpoints (and torn temp files) from ``run``."""
    for torn in run.glob(".checkpoint-*.tmp"):  # a write a kill interrupted
        torn.unlink()
    for name in _RUN_FILES:
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    for old in checkpoint.checkpoints(run):
        old.unlink()


def train(cfg: TrainConfig, seed: int) -> dict[str, Any]:
    """One training run; returns (and, in the main process, writes) its summary.

    Under ``torchrun``/``accelerate launch`` each process takes its share of every
    global batch (``batch_size`` rows per process) and DDP averages the gradients.
    """
    world = setup()
    task = tasks.create(cfg)
    run = cfg.run_dir / f"seed{seed}"
    found = _previous_run(run) if not (cfg.resume or cfg.overwrite) else []
    if found:
        raise ValueError(f"{run} holds a previous run ({', '.join(found[:4])}); pass --resume to continue it or "
                         "--overwrite to replace it, or choose another --out")
    tracker = runfiles.Tracker(cfg.report_to if world.main else "none", run)  # checked before any work
    if world.main and importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no curve.png will be written (pip install matplotlib)")
    run.mkdir(parents=True, exist_ok=True)
    record = {**dataclasses.asdict(cfg), "seed": seed}
    torch.manual_seed(seed)
    random.seed(seed)
    precision = resolve_precision(cfg.precision, world.device)
    if cfg.fsdp and not world.distributed:
        raise ValueError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node N")
    tokenizer, model = _prepare(cfg, task, world)
    empty = has_meta(model)  # a causal LM under --fsdp: built on the meta device, filled once sharded
    if not empty:
        model.to(world.device)
    if cfg.fsdp:
        blocks = fully_shard_model(model)
        if empty:
            materialise(model, world.device, Checkpoint.find(model.name_or_path))
        if world.main:
            print(f"FSDP2: sharded {', '.join(blocks)} and the rest over {world.size} processes"
                  + (", each process reading only its shards" if empty else ""))
    train_split, dev = task.read(tokenizer)
    if cfg.packing:
        packing.check_model(model, world.device)
        train_split = _packed(train_split, cfg.max_length, seed, world)
    plan = loop.Plan.of(cfg, len(train_split), world.size)
    if world.main:
        print(_recipe(cfg, task, len(train_split), sum(map(len, dev.values())), plan))
    optimizer, scheduler = _optimizer(model, cfg, plan.total_steps)
    progress = (checkpoint.resume(run, record, model, optimizer, scheduler, world, _defaults()) if cfg.resume
                else checkpoint.Progress())
    if world.main and progress.epoch == progress.step == 0:
        _fresh_start(run)
    if world.main:
        write_config_file(cfg, seed, run / "config.yaml")
    loss_fn = task.loss_module(model)
    if world.distributed and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        loss_fn = DistributedDataParallel(loss_fn, device_ids=[world.device] if world.device.type == "cuda" else None)

    (split, metric), sign = task.main, 1 if task.higher_is_better else -1

    def save() -> None:
        checkpoint.save(run, record, progress, model, optimizer, scheduler, world, keep=cfg.save_total_limit)

    def evaluate(step: int) -> None:
        """Evaluate after ``step`` optimizer steps; record it, keep the weights if they are the best."""
        epoch = progress.epoch + 1 if not cfg.eval_steps else round(step / plan.steps_per_epoch, 4)
        train_time = progress.seconds
        started = time.perf_counter()
        outputs = run / "outputs" / (f"epoch{epoch}" if not cfg.eval_steps else f"step{step}")
        with precision_context(precision, world.device):
            metrics = task.evaluate(model, dev, world, outputs if world.main else None)
        progress.wall += train_time + time.perf_counter() - started
        loss_sum, seen = map(sum, zip(*world.gather((progress.loss_sum, progress.seen))))
        best = max((sign * h["dev"][split][metric] for h in progress.history), default=-math.inf)
        progress.history.append({"epoch": epoch, "step": step, "train_loss": loss_sum / seen, "dev": metrics,
                                 "train_seconds": train_time, "examples_per_second": seen / train_time,
                                 "lr": scheduler.get_last_lr()[0]})
        progress.loss_sum, progress.seen, progress.seconds = 0.0, 0, 0.0
        if sign * metrics[split][metric] > best:  # the same decision in every process (gathered metrics)
            info = {**task.info(), "model": cfg.model, "method": cfg.method,
                    **({"quantize_base": cfg.quantize_base} if cfg.quantize_base else {})}
            runfiles.save_weights(model, cfg.method, run, info | ({"adapter_dim": cfg.adapter_dim}
                                                                  if cfg.method == "adapter" else {}), world)
        tracker.epoch(step, metrics)
        if world.main:
            runfiles.append_log(run, progress.history[-1])
            where = f"epoch {epoch}" if not cfg.eval_steps else f"step {step} (epoch {epoch:g})"
            print(f"{where}: train loss {loss_sum / seen:.4f}, dev {format_metrics(metrics)}, {train_time:.0f}s")

    def after_step(step: int, epoch_end: bool) -> bool:
        evaluates = plan.evaluates(step, epoch_end)
        if evaluates:
            evaluate(step)
        if plan.saves(step, epoch_end):
            save()
        return evaluates

    for epoch in range(progress.epoch, plan.epochs):
        if progress.step == 0:  # else the checkpoint restored the random state mid-epoch
            # dropout masks depend on (seed, epoch, process) only: resumable
            torch.manual_seed(seed * 1_000 + epoch + 1_000_003 * world.rank)
        order = data.length_grouped_batches(train_split.lengths, plan.rows_per_step, seed, epoch)[:plan.steps_in(epoch)]
        _train_epoch(loss_fn, task, cfg, plan, precision, train_split, order, epoch, optimizer, scheduler, progress, world,
                     run, after_step, tracker)
        progress.epoch, progress.step = epoch + 1, 0
        save()
    tracker.close()
    return _summarize(cfg, task, run, record, model, progress, world)


def _best_epoch(task: Task, history: list[dict[str, Any]]) -> int:
    (split, metric), sign = task.main, 1 if task.higher_is_better else -1
    return max(range(len(history)), key=lambda i: sign * history[i]["dev"][split][metric])


def _summarize(cfg: TrainConfig, task: Task, run: Path, record: dict[str, Any], model: nn.Module,
               progress: checkpoint.Progress, world: World = World()) -> dict[str, Any]:
    """The summary of a finished run; the main process writes it and the learning curve."""
    history = progress.history
    best = _best_epoch(task, history)
    params = trainable_parameters(model)
    size = runfiles.weights_path(run, cfg.method).stat().st_size if world.main else None
    summary = {
        "config": record, "task": task.name, "main_metric": list(task.main), "higher_is_better": task.higher_is_better,
        "best_epoch": best + 1, "best_step": history[best].get("step"), "best": history[best]["dev"], "epochs": history,
        "trainable_params": params.trainable, "total_params": params.total,
        "weights_bytes": world.gather(size)[0],  # only the main process wrote it
        "wall_seconds": progress.wall, "versions": runfiles.versions(),
    }
    if world.main:
        runfiles.write_summary(run, summary, title=f"{cfg.model} {cfg.method} {task.name} seed {record['seed']}")
    return summary


def _defaults() -> dict[str, Any]:
    return {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
            for f in dataclasses.fields(TrainConfig)}


def train_seeds(cfg: TrainConfig) -> dict[str, Any]:
    """Run every seed; report each run's best epoch and the median over seeds (paper protocol)."""
    report = seeds_report([train(cfg, seed) for seed in cfg.seeds])
    if setup().main:
        (cfg.run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def seeds_report(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The paper's protocol over finished runs (their summaries, one per seed): each run's best
    epoch, the median over seeds. Runs of different recipes are refused."""
    first = runs[0]
    defaults = _defaults()  # a field added since a run was made keeps its default
    configs = [checkpoint.completed(r["config"], defaults) for r in runs]
    same = checkpoint.MAY_CHANGE | {"seed", "out"}
    differ = sorted({k for c in configs for k in c if k not in same and c[k] != configs[0].get(k)})
    if differ:
        raise ValueError(f"these runs differ in {', '.join(differ)}; a median over seeds needs one recipe")
    split, splits = first["main_metric"][0], first["best"]
    median = {
        f"{s}/{m}" if len(splits) > 1 else m: statistics.median(r["best"][s][m] for r in runs)
        for s in splits for m in splits[s] if all(r["best"][s][m] is not None for r in runs)
    }
    return {"task": first["task"], "model": first["config"]["model"], "method": first["config"]["method"],
            "seeds": [r["config"]["seed"] for r in runs], "median": median,
            "per_seed": {str(r["config"]["seed"]): r["best"][split] for r in runs},
            "trainable_params": first["trainable_params"], "weights_bytes": first["weights_bytes"],
            "wall_seconds": sum(r["wall_seconds"] for r in runs)}
