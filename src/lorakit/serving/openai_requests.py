"""The request bodies of OpenAI's routes (:mod:`lorakit.serving.openai`) and what they ask for: a
:class:`~lorakit.serving.sampling.Sampling`, or a one-line 400 naming the field."""

# No `from __future__ import annotations`: pydantic reads the schemas' annotations.
from .config import ClientError, ServeConfig
from .sampling import MAX_LOGPROBS, Sampling
from .tokens import message_schema

__all__ = ["schemas", "sampling_of", "check_n", "check_prompts"]


def schemas():
    """The pydantic models of ``/v1/completions`` and ``/v1/chat/completions`` bodies."""
    from pydantic import BaseModel, ConfigDict

    class Common(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # (JSON parsers take NaN and Infinity)
        model: str
        max_tokens: int | None = None
        temperature: float = 1.0
        top_p: float = 1.0
        stop: str | list[str] | None = None
        seed: int | None = None
        stream: bool = False
        stream_options: dict[str, bool] | None = None
        user: str | None = None
        ignore_eos: bool = False  # vLLM's extension: run to max_tokens (load tests)
        n: int = 1
        top_k: int | None = None  # vLLM's: None, -1 or 0 keep every token
        min_p: float = 0.0  # vLLM's
        repetition_penalty: float = 1.0  # vLLM's
        presence_penalty: float = 0.0
        frequency_penalty: float = 0.0
        logit_bias: dict[str, float] | None = None  # accepted empty only (refused otherwise, by name)

    class Completion(Common):
        prompt: str | list[str] | list[int] | list[list[int]]  # text, or token ids (lm-evaluation-harness)
        echo: bool = False
        best_of: int | None = None  # n only
        logprobs: int | None = None
        suffix: str | None = None  # refused

    Message = message_schema()

    class Chat(Common):
        messages: list[Message]
        max_completion_tokens: int | None = None
        logprobs: bool = False
        top_logprobs: int | None = None

    return Completion, Chat


def sampling_of(body, config: ServeConfig, default_max: int, chat: bool) -> Sampling:
    """The request's :class:`Sampling`; a 400 naming the field for a value out of range or not supported."""
    for name in ("logit_bias", "suffix"):
        if getattr(body, name, None):
            raise ClientError(400, f"{name}={getattr(body, name)!r} is not supported by lorakit serve (leave it out)")
    best_of = getattr(body, "best_of", None)
    if best_of is not None and best_of != body.n:
        raise ClientError(400, f"best_of must be at least n ({body.n}), got {best_of}" if best_of < body.n else
                          f"best_of={best_of} (more than n) is not supported by lorakit serve (leave it out)")
    echo = getattr(body, "echo", False)
    name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
    max_tokens = getattr(body, name)
    max_tokens = default_max if max_tokens is None else max_tokens
    if not (0 if echo else 1) <= max_tokens <= config.max_new_tokens:
        why = " (0, the prompt's logprobs only, needs echo)" if max_tokens == 0 else ""
        raise ClientError(400, f"{name} must be between 1 and {config.max_new_tokens}, got {max_tokens}{why}")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise ClientError(400, "stop takes up to 4 non-empty strings")
    if chat:
        if body.top_logprobs is not None and not body.logprobs:
            raise ClientError(400, "top_logprobs needs logprobs: true")
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_LOGPROBS:
            raise ClientError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {body.top_logprobs}")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
    else:
        logprobs = body.logprobs
    try:
        return Sampling(max_tokens, body.temperature, body.top_p, body.seed, tuple(stop), body.ignore_eos,
                        top_k=0 if body.top_k in (None, -1) else body.top_k, min_p=body.min_p,
                        repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                        frequency_penalty=body.frequency_penalty, logprobs=logprobs,
                        prompt_logprobs=logprobs if echo else None)
    except ValueError as e:
        raise ClientError(400, str(e)) from None


def check_n(n: int, prompts: int, rows: int, config: ServeConfig) -> None:
    """``n`` completions of each of ``prompts`` prompts, on a server decoding ``rows`` rows at once."""
    if not 1 <= n <= rows:
        raise ClientError(400, f"n must be between 1 and {rows} (the rows this server decodes at once), got {n}")
    if prompts * n > config.max_rows_per_request:
        raise ClientError(413, f"{prompts} prompts x n={n} are {prompts * n} completions, over the limit of "
                               f"{config.max_rows_per_request} per request")


def check_prompts(prompts: list[list[int]], sampling: Sampling, config: ServeConfig, vocab: int) -> None:
    for i, ids in enumerate(prompts):
        if not ids:
            raise ClientError(400, f"prompt {i} is empty")
        if len(ids) > config.max_length:
            raise ClientError(400, f"prompt {i} is {len(ids)} tokens long; the limit is {config.max_length}")
        if not 0 <= min(ids) <= max(ids) < vocab:
            raise ClientError(400, f"prompt {i} has a token id outside the vocabulary (0 to {vocab - 1})")
