"""How ``lorakit serve`` draws each next token from a row of logits, and the log-probabilities it reports.

For a row of logits ``z: (vocab,)``, in this order (vLLM's):

1. penalties, over the prompt ``P`` and the tokens generated so far ``G`` (``c_t``: the count of ``t`` in ``G``)::

       z_t <- z_t / r  if z_t > 0 else z_t * r        for t in P + G   (repetition_penalty r, vLLM's)
       z_t <- z_t - f c_t - p [c_t > 0]                                (frequency f, presence p: OpenAI's)

2. temperature 0: the argmax of ``z``; otherwise ``q = softmax(z / temperature)``, cut to the tokens with
   ``q_t >= min_p max(q)``, then to the ``top_k`` most likely, then to the nucleus of mass ``top_p``, and
   a draw from what is left (renormalised).

Log-probabilities (``logprobs``, ``echo``) are the model's own, ``log_softmax(z)`` of the raw logits before
any penalty, temperature or cut (vLLM's default, ``logprobs_mode="raw_logprobs"``): what lm-evaluation-harness
reads as the model's likelihood of a text, whatever the request samples with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Sampling", "Logprob", "MAX_LOGPROBS", "sample", "next_token", "penalize", "logprobs_of"]

MAX_LOGPROBS = 20  # the most alternatives a request may ask for per token (vLLM's default max_logprobs)


@dataclass(frozen=True)
class Sampling:
    """How one completion is decoded (the module's docstring has the math): ``temperature`` 0 takes the
    argmax; otherwise a draw from a generator seeded by ``seed`` (None: from torch's global generator).
    ``top_k`` 0 keeps every token, ``min_p`` 0 cuts none; penalties at their neutral values (1, 0, 0)
    change nothing. With ``ignore_eos`` a completion runs to ``max_tokens`` (load tests: vLLM's option
    of the same name); ``max_tokens`` 0 ends once the prompt is read (for ``prompt_logprobs``).

    ``logprobs``: each generated token's log-probability and its ``logprobs`` most likely alternatives
    (None: none); ``prompt_logprobs``: the same for every prompt token after the first (OpenAI's ``echo``).
    Errors name the request field and its range (ValueError)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be a non-negative 64-bit integer, got {self.seed}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be -1 or 0 (every token) or a positive integer, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be between 0 and 1, got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be positive (1: none), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be between -2 and 2, got {getattr(self, name)}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be between 0 and {MAX_LOGPROBS}, got {value}")

    @property
    def penalized(self) -> bool:
        """Whether a penalty changes the logits."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass(frozen=True)
class Logprob:
    """A token's log-probability (None: the prompt's first token, which nothing predicts) and the
    ``(token, logprob)`` pairs of the most likely tokens at its position, most likely first."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


def logprobs_of(logits: Tensor, tokens: list[int], k: int) -> list[Logprob]:
    """``logits: (R, vocab)``: each row's ``log_softmax`` at ``tokens[r]`` and its ``k`` largest entries."""
    lsm = torch.log_softmax(logits.float(), dim=-1)
    chosen = lsm.gather(1, torch.tensor(tokens, device=lsm.device)[:, None])[:, 0].tolist()
    values, ids = lsm.topk(k, dim=-1) if k else (lsm[:, :0], lsm[:, :0].long())
    return [Logprob(t, c, tuple(zip(i, v))) for t, c, i, v in zip(tokens, chosen, ids.tolist(), values.tolist())]


def penalize(logits: Tensor, sampling: Sampling, prompt: list[int], tokens: list[int]) -> Tensor:
    """``logits: (vocab,)`` after the penalties of ``sampling`` for ``prompt`` and the ``tokens`` generated
    so far (a new tensor; ``logits`` itself when there is none)."""
    if not sampling.penalized:
        return logits
    logits = logits.float().clone()
    vocab = logits.shape[-1]
    if sampling.repetition_penalty != 1:
        seen = torch.tensor(prompt + tokens, device=logits.device).unique()
        z = logits[seen]
        logits[seen] = torch.where(z > 0, z / sampling.repetition_penalty, z * sampling.repetition_penalty)
    if tokens and (sampling.presence_penalty or sampling.frequency_penalty):
        counts = torch.bincount(torch.tensor(tokens, device=logits.device), minlength=vocab).float()  # (vocab,)
        logits -= sampling.frequency_penalty * counts + sampling.presence_penalty * (counts > 0)
    return logits


def next_token(logits: Tensor, sampling: Sampling, prompt: list[int], tokens: list[int],
               generator: torch.Generator | None) -> int:
    """The next token after ``prompt`` and ``tokens`` from its row of finite ``logits`` ``(vocab,)``."""
    logits = penalize(logits, sampling, prompt, tokens)
    return int(logits.argmax()) if sampling.temperature == 0 else sample(logits, sampling, generator)


def sample(logits: Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """A token drawn from ``softmax(logits / temperature)`` after the ``min_p``, ``top_k`` and ``top_p`` cuts.

    ``logits`` must be finite. A temperature so small that ``logits / temperature``
    overflows is its limit, the argmax; every cut keeps the most likely token (a ``top_p``
    under its probability, or under float32's smallest number, is that token)."""
    scaled = logits.float() / sampling.temperature
    if not bool(torch.isfinite(scaled).all()):
        return int(logits.argmax())
    probs = torch.softmax(scaled, dim=-1)
    if sampling.min_p > 0:
        probs = torch.where(probs >= sampling.min_p * probs.max(), probs, 0)
    if 0 < sampling.top_k < probs.shape[-1]:
        top, order = probs.topk(sampling.top_k)
        probs = torch.zeros_like(probs).scatter_(-1, order, top)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        if sampling.min_p > 0 or sampling.top_k:  # the nucleus of what the cuts above left
            sorted_probs = sorted_probs / sorted_probs.sum()
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p  # mass before a token already >= top_p
        outside[0] = False
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
