"""How ``lorakit serve`` draws each next token from a row of logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Sampling", "sample"]


@dataclass(frozen=True)
class Sampling:
    """How one completion is decoded: ``temperature`` 0 takes the argmax; otherwise a draw
    from ``softmax(logits / temperature)`` cut to the nucleus of mass ``top_p``, from a
    generator seeded by ``seed`` (None: from torch's global generator). With ``ignore_eos``
    a completion runs to ``max_tokens`` (load tests: vLLM's option of the same name)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


def sample(logits: Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """A token drawn from ``softmax(logits / temperature)`` within the ``top_p`` nucleus.

    ``logits`` must be finite. A temperature so small that ``logits / temperature``
    overflows is its limit, the argmax; the nucleus always keeps the most likely token (a
    ``top_p`` under its probability, or under float32's smallest number, is that token)."""
    scaled = logits.float() / sampling.temperature
    if not bool(torch.isfinite(scaled).all()):
        return int(logits.argmax())
    probs = torch.softmax(scaled, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p  # mass before a token already >= top_p
        outside[0] = False
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
