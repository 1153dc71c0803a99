"""Text generation with causal LMs and LoRA adapters, on top of transformers' ``model.generate``.

transformers keeps the decoding algorithms (KV cache, greedy, sampling, beam search); this
module adds batching by prompt length, decoding presets, one adapter per prompt (the paper's
section 4.2: many tasks served from one batch) and a small API::

    from lorakit.generate import PAPER_DECODING, generate
    texts = generate(gpt2, tokenizer, ["name : The Vaults | Type : pub ||"], decoding=PAPER_DECODING, eos_id=[50256, 628])

A batch is left-padded to ``(B, T)`` with an attention mask; transformers derives each row's
position ids from the mask, so a padded prompt generates what it generates alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, NoRepeatNGramLogitsProcessor

from .model import adapter_per_row

__all__ = ["Decoding", "PAPER_DECODING", "generate_ids", "generate"]

Strategy = Literal["greedy", "sample", "beam"]
_STRATEGIES = ("greedy", "sample", "beam")
# Fields that only sampling reads, with their neutral values.
_SAMPLING_ONLY = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": None}


def _require(ok: bool, field: str, value: object, fix: str) -> None:
    if not ok:
        raise ValueError(f"Decoding.{field}={value!r}: {fix}")


@dataclass(frozen=True)
class Decoding:
    """How completions are decoded (validated on creation; fields a strategy does not read must
    keep their neutral values, so a setting is never silently ignored).

    ``greedy`` takes the argmax; ``sample`` draws from ``softmax(logits / temperature)`` cut to
    the ``top_k`` tokens (0: all) and the nucleus of mass ``top_p`` (always the top token),
    seeded by ``seed``; a temperature so small that ``logits / temperature`` overflows (e.g.
    ``1e-40``) draws its limit, the argmax, as ``lorakit serve`` does;
    ``beam`` keeps ``num_beams`` hypotheses scored ``sum log p / len ** length_penalty`` (``len``
    counts completion tokens) and runs until no hypothesis can improve (no early-stop heuristic).
    ``no_repeat_ngram_size = n > 0`` forbids any n-gram twice in a completion; unlike transformers'
    own flag, n-grams of the prompt (and its padding) may be repeated, as in the official LoRA
    scripts. With ``stop_at_eos`` a completion ends at the first EOS id (excluded); without, it
    runs to ``max_new_tokens``.
    """

    max_new_tokens: int = 64
    strategy: Strategy = "greedy"
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        _require(self.strategy in _STRATEGIES, "strategy", self.strategy, f"use one of {_STRATEGIES}")
        _require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be at least 1")
        _require(self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size", self.no_repeat_ngram_size, "must be >= 0 (0: off)")
        if self.strategy == "beam":
            _require(self.num_beams >= 2, "num_beams", self.num_beams, "strategy='beam' needs num_beams >= 2")
        else:
            _require(self.num_beams == 1, "num_beams", self.num_beams, "applies to strategy='beam' only; leave it at 1")
            _require(self.length_penalty == 1.0, "length_penalty", self.length_penalty, "applies to strategy='beam' only")
        if self.strategy != "sample":
            for name, neutral in _SAMPLING_ONLY.items():
                value = getattr(self, name)
                _require(value == neutral, name, value, f"applies to strategy='sample' only; leave it at {neutral!r}")
        _require(self.temperature > 0, "temperature", self.temperature, "must be > 0 (use strategy='greedy' for the argmax)")
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        _require(self.top_k >= 0, "top_k", self.top_k, "must be >= 0 (0: no top-k cut)")
        _require(self.seed is None or self.seed >= 0, "seed", self.seed, "must be None or a non-negative integer")


# The paper's E2E decoding (Table 11; microsoft/LoRA examples/NLG/src/gpt2_beam.py, --eval_len 64):
# beam 10, length penalty 0.9, no repeated 4-gram within the completion, stop at EOS. The official
# scripts stop at both <|endoftext|> and "\n\n" on GPT-2: pass eos_id=[50256, 628]. (Their README's
# E2E command uses --length_penalty 0.8, Table 11's value for WebNLG and DART.)
PAPER_DECODING = Decoding(max_new_tokens=64, strategy="beam", num_beams=10, length_penalty=0.9, no_repeat_ngram_size=4)


class _OverflowIsArgmax(LogitsProcessor):
    """Rows whose ``scores / temperature`` would overflow become the argmax alone (0 there,
    -inf elsewhere), so the temperature warper after it gives a one-hot distribution instead of
    inf - inf = NaN: the limit of sampling as the temperature goes to 0. Other rows pass as they are."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        over = (torch.isinf(scores / self.temperature) & torch.isfinite(scores)).any(-1)  # (B,); -inf: a banned token
        if not bool(over.any()):
            return scores
        argmax = torch.full_like(scores, -torch.inf).scatter_(-1, scores.argmax(-1, keepdim=True), 0.0)
        return torch.where(over[:, None], argmax, scores)


class _CompletionNoRepeatNGram(NoRepeatNGramLogitsProcessor):
    """transformers' n-gram blocking over ``input_ids[:, prompt_len:]``, the completion only."""

    def __init__(self, ngram_size: int, prompt_len: int) -> None:
        super().__init__(ngram_size)
        self.prompt_len = prompt_len

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        return super().__call__(input_ids[:, self.prompt_len :], scores)


def _generation_config(decoding: Decoding, pad_id: int, eos: list[int]) -> GenerationConfig:
    d = decoding
    beam = {"length_penalty": d.length_penalty, "early_stopping": "never"} if d.strategy == "beam" else {}
    sample = {"temperature": d.temperature, "top_p": d.top_p, "top_k": d.top_k} if d.strategy == "sample" else {}
    eos_ids = eos if d.stop_at_eos else None
    return GenerationConfig(max_new_tokens=d.max_new_tokens, do_sample=d.strategy == "sample", num_beams=d.num_beams,
                            pad_token_id=pad_id, eos_token_id=eos_ids, **beam, **sample)


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """No autograd, eval mode (each module's own mode restored after), and the model's
    ``generation_config`` (a checkpoint's defaults, e.g. a repetition penalty) set aside,
    so that the call's :class:`Decoding` alone decides."""
    modes = [(m, m.training) for m in model.modules()]
    saved = model.generation_config
    model.eval()
    model.generation_config = GenerationConfig()
    try:
        with torch.no_grad():
            yield
    finally:
        model.generation_config = saved
        for m, mode in modes:
            m.training = mode


@contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's generators for the block, then restore their state (CPU and ``device``)."""
    if seed is None:
        yield
        return
    accelerators = [] if device.type == "cpu" else [device]
    with torch.random.fork_rng(devices=accelerators, device_type=device.type if accelerators else "cuda"):
        torch.manual_seed(seed)
        yield


def _length_batches(prompts: Sequence[list[int]], batch_size: int) -> Iterator[list[int]]:
    """Indices of the prompts, shortest first, in groups of ``batch_size`` (little padding)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _left_pad(prompts: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``ids`` and ``attention_mask``, both ``(B, T)`` with ``T`` the longest prompt; padding on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def _generate_batch(model: nn.Module, prompts: Sequence[list[int]], adapters: list[str | None] | None,
                    config: GenerationConfig, decoding: Decoding) -> Tensor:
    """One batch's new tokens, ``(B, N)``; rows that ended early are padded after their EOS."""
    ids, mask = _left_pad(prompts, config.pad_token_id, model.device)
    n = decoding.no_repeat_ngram_size
    processors = LogitsProcessorList([_CompletionNoRepeatNGram(n, ids.shape[1])] if n else [])
    if decoding.strategy == "sample":  # transformers runs these before its temperature warper
        processors.append(_OverflowIsArgmax(decoding.temperature))
    # generate repeats row i num_beams times in place (repeat_interleave) and reorders beams only
    # within a row's group, so row i's hypotheses stay at rows i*num_beams ... (i+1)*num_beams - 1.
    rows = nullcontext() if adapters is None else adapter_per_row(model, [a for a in adapters for _ in range(decoding.num_beams)])
    with rows:
        out = model.generate(ids, attention_mask=mask, generation_config=config, logits_processor=processors)
    return out[:, ids.shape[1] :]


def _until(tokens: list[int], stop: Sequence[int]) -> list[int]:
    end = next((j for j, t in enumerate(tokens) if t in stop), len(tokens))
    return tokens[:end]


def _check_inputs(model: nn.Module, prompts: Sequence[list[int]], adapters: Sequence[str | None] | None, batch_size: int) -> None:
    if not callable(getattr(model, "generate", None)):
        raise TypeError(f"model must be a transformers causal LM (with .generate), got {type(model).__name__}")
    if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], int)):
        raise TypeError("prompts must be a list of prompts (token-id lists for generate_ids); wrap a single one in a list")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"prompts {empty} are empty; each prompt needs at least one token (e.g. BOS)")
    if adapters is not None and len(adapters) != len(prompts):
        raise ValueError(f"adapters has {len(adapters)} names for {len(prompts)} prompts; give one per prompt (None: base model)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def generate_ids(model: nn.Module, prompts: Sequence[list[int]], *, pad_id: int | None, eos_id: int | list[int],
                 decoding: Decoding = Decoding(), adapters: Sequence[str | None] | None = None,
                 batch_size: int = 8, progress: bool = False) -> list[list[int]]:
    """The completion of each prompt (token ids, without the prompt, cut before the first EOS), in input order.

    Prompts are batched ``batch_size`` at a time by similar length. With ``adapters``, prompt
    ``i`` runs through adapter ``adapters[i]`` (None: the base model) in the same batch, via
    :func:`lorakit.adapter_per_row` (the model must not be merged); without, the model runs as
    it is (its active adapters, merged or not). ``pad_id`` None pads with the first EOS id.
    Sampled completions depend on how prompts share batches: the same call with the same
    ``seed`` repeats them exactly.
    """
    _check_inputs(model, prompts, adapters, batch_size)
    eos = [eos_id] if isinstance(eos_id, int) else list(eos_id)
    if not eos:
        raise ValueError("eos_id must name at least one token id")
    config = _generation_config(decoding, eos[0] if pad_id is None else pad_id, eos)
    out: list[list[int]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), disable=not progress, unit="prompt", desc="generate")
    with _inference(model), _seeded(decoding.seed, model.device), bar:
        for idx in _length_batches(prompts, batch_size):
            names = None if adapters is None else [adapters[i] for i in idx]
            new = _generate_batch(model, [prompts[i] for i in idx], names, config, decoding)
            for i, tokens in zip(idx, new.tolist()):
                out[i] = _until(tokens, eos) if decoding.stop_at_eos else tokens
            bar.update(len(idx))
    return out


def generate(model: nn.Module, tokenizer, prompts: Sequence[str], *, eos_id: int | list[int] | None = None,
             decoding: Decoding = Decoding(), adapters: Sequence[str | None] | None = None,
             batch_size: int = 8, progress: bool = False) -> list[str]:
    """:func:`generate_ids` on plain text: each prompt tokenized as is (no chat template; special
    tokens as the tokenizer adds them by default), completions decoded without special tokens.

    ``eos_id`` defaults to the tokenizer's EOS; padding uses its pad token, or EOS if it has none.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, got one string; wrap it in a list")
    eos = tokenizer.eos_token_id if eos_id is None else eos_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; pass eos_id (the token id(s) that end a completion)")
    ids = tokenizer(list(prompts))["input_ids"] if len(prompts) else []
    out = generate_ids(model, ids, pad_id=tokenizer.pad_token_id, eos_id=eos, decoding=decoding, adapters=adapters,
                       batch_size=batch_size, progress=progress)
    return [tokenizer.decode(c, skip_special_tokens=True) for c in out]
