"""``lorakit serve`` for causal LMs: many generation adapters on one base, OpenAI-compatible.

    POST /v1/completions        {"model": "e2e", "prompt": "name : The Vaults | Type : pub\\n", "max_tokens": 64}
    POST /v1/chat/completions   {"model": "support", "messages": [{"role": "user", "content": "..."}]}
    GET  /v1/models             the base model (no adapter) and every adapter

``model`` names an adapter, or the base model's name for no adapter; ``stream: true`` answers
with server-sent events. All requests share the decode steps of one :class:`Scheduler`
(continuous batching across adapters, :mod:`lorakit.serving.generation`); the adapter routes of
the HTTP shell (:mod:`lorakit.serving.http`) load and unload adapters while streams run.
"""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations.
import asyncio
import json
import time
import uuid
from typing import Any

from .config import CHARS_PER_TOKEN, ClientError, ServeConfig
from .generation import GenerationEngine
from .metrics import GenerationMetrics
from .scheduler import Busy, Sampling, Sequence
from .tokens import add_tokenizer_routes, chat_ids, message_schema, message_text

__all__ = ["OpenAIApi", "add_routes"]


class OpenAIApi:
    """OpenAI's routes (and vLLM's tokenizer routes, :mod:`lorakit.serving.tokens`) over a
    :class:`GenerationEngine`, for :func:`lorakit.serving.http.build_app`; the engine's scheduler runs the model."""

    # errors in OpenAI's shape
    openai_paths = frozenset({"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"})

    def __init__(self, engine: GenerationEngine, config: ServeConfig) -> None:
        self.engine, self.config = engine, config
        self.stats = GenerationMetrics(waiting=lambda: engine.scheduler.queued, adapters=lambda: len(engine.adapters),
                                       running=lambda: len(engine.scheduler.rows), prefix=lambda: engine.scheduler.prefix)

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()

    async def call(self, fn, *args):
        return await self.engine.call(fn, *args)

    def health(self) -> dict[str, Any]:
        return self.engine.health()

    def metrics(self) -> str:
        return self.stats.render()

    def mount(self, app, parse) -> None:
        add_routes(app, self.engine, self.config, parse, self.stats)
        add_tokenizer_routes(app, self.engine, parse)


# ---- requests -------------------------------------------------------------------------------


def _schemas():
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
        # accepted at their neutral values only (refused otherwise, by name)
        n: int = 1
        presence_penalty: float = 0.0
        frequency_penalty: float = 0.0
        logit_bias: dict[str, float] | None = None

    class Completion(Common):
        prompt: str | list[str]
        echo: bool = False
        best_of: int = 1
        logprobs: int | None = None
        suffix: str | None = None

    Message = message_schema()

    class Chat(Common):
        messages: list[Message]
        max_completion_tokens: int | None = None
        logprobs: bool = False

    return Completion, Chat


_NEUTRAL = {"n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": None, "echo": False,
            "best_of": 1, "logprobs": None, "suffix": None}


def _sampling(body, config: ServeConfig, default_max: int) -> Sampling:
    for name, neutral in _NEUTRAL.items():
        value = getattr(body, name, neutral)
        if not (value is None or value == neutral or value == {} or (name == "logprobs" and value is False)):
            raise ClientError(400, f"{name}={value!r} is not supported by lorakit serve (leave it out)")
    name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
    max_tokens = getattr(body, name)
    max_tokens = default_max if max_tokens is None else max_tokens
    if not 1 <= max_tokens <= config.max_new_tokens:
        why = " (0 asks for the prompt's logprobs only, with echo: not supported)" if max_tokens == 0 else ""
        raise ClientError(400, f"{name} must be between 1 and {config.max_new_tokens}, got {max_tokens}{why}")
    if not 0 <= body.temperature <= 2:
        raise ClientError(400, f"temperature must be between 0 and 2, got {body.temperature}")
    if not 0 < body.top_p <= 1:
        raise ClientError(400, f"top_p must be in (0, 1], got {body.top_p}")
    if body.seed is not None and not 0 <= body.seed < 2**63:
        raise ClientError(400, f"seed must be a non-negative 64-bit integer, got {body.seed}")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise ClientError(400, "stop takes up to 4 non-empty strings")
    return Sampling(max_tokens, body.temperature, body.top_p, body.seed, tuple(stop), body.ignore_eos)


def _check_prompts(prompts: list[list[int]], sampling: Sampling, config: ServeConfig) -> None:
    for i, ids in enumerate(prompts):
        if not ids:
            raise ClientError(400, f"prompt {i} is empty")
        if len(ids) > config.max_length:
            raise ClientError(400, f"prompt {i} is {len(ids)} tokens long; the limit is {config.max_length}")


class _Run:
    """The completions of one request: sequences submitted to the scheduler, their events
    gathered on the event loop."""

    def __init__(self, engine: GenerationEngine, prompts: list[list[int]], adapter: str | None, sampling: Sampling,
                 model: str, stats: GenerationMetrics) -> None:
        self.engine, self.model, self.stats = engine, model, stats
        self.events: asyncio.Queue = asyncio.Queue()
        self.seqs = [Sequence(ids, adapter, sampling, self._emitter(i)) for i, ids in enumerate(prompts)]
        self.open = len(self.seqs)
        self.start = time.monotonic()
        self.seen, self.last = [0] * len(self.seqs), [self.start] * len(self.seqs)  # per sequence: tokens, time
        for seq in self.seqs:
            try:
                engine.scheduler.submit(seq)
            except Busy as e:
                self.cancel()
                raise ClientError(503, str(e)) from None
        stats.request(model, sum(len(ids) for ids in prompts))

    def _emitter(self, i: int):
        loop = asyncio.get_running_loop()

        def emit(event) -> None:  # on the scheduler's thread, right after the token that made the event
            loop.call_soon_threadsafe(self.events.put_nowait, (i, event, time.monotonic(), self.seqs[i].sampled))

        return emit

    async def __aiter__(self):
        """``(index, event)`` until every sequence is done (see :class:`Sequence`)."""
        while self.open:
            i, event, at, sampled = await self.events.get()
            self._count(i, event, at, sampled)
            if event[0] != "text":
                self.open -= 1
            yield i, event

    def _count(self, i: int, event, at: float, sampled: int) -> None:
        """Sequence ``i``'s new tokens and latencies in the metrics (see :class:`GenerationMetrics`)."""
        new, stats = sampled - self.seen[i], self.stats
        if new:
            stats.generation_tokens.inc(new, model_name=self.model)
            if self.seen[i] == 0:
                stats.first_token.observe(at - self.start)
            else:
                stats.inter_token.observe((at - self.last[i]) / new, times=new)
            self.seen[i], self.last[i] = sampled, at
        if event[0] != "text":
            stats.finished.inc(model_name=self.model, finished_reason=event[1] if event[0] == "done" else "error")

    def cancel(self) -> None:
        for seq in self.seqs:
            if not seq.finished:
                self.engine.scheduler.cancel(seq)

    def usage(self) -> dict[str, int]:
        prompt = sum(len(s.prompt) for s in self.seqs)
        completion = sum(s.sampled for s in self.seqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _until_disconnect(request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def add_routes(app, engine: GenerationEngine, config: ServeConfig, parse, stats: GenerationMetrics) -> None:
    """``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models`` on ``app``."""
    from fastapi import Request
    from fastapi.responses import StreamingResponse

    Completion, Chat = _schemas()
    tokenizer = engine.tokenizer

    def encode_prompts(prompts: list[str]) -> list[list[int]]:
        return [tokenizer(p)["input_ids"] for p in prompts]

    def encode_chat(messages) -> list[list[int]]:
        return [chat_ids(tokenizer, engine.model_name, messages)]

    async def respond(request: Request, body, chat: bool):
        adapter = engine.resolve(body.model)
        if chat:
            if not body.messages:
                raise ClientError(400, "messages is empty")
            sampling = _sampling(body, config, config.max_new_tokens)
            chars = sum(len(message_text(m)) for m in body.messages)
            if chars > config.max_length * CHARS_PER_TOKEN:  # refused before tokenizing
                raise ClientError(400, f"messages are {chars} characters long, over the limit of {config.max_length} tokens")
            prompts = await asyncio.to_thread(encode_chat, body.messages)
        else:
            texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if not texts or len(texts) > config.max_rows_per_request:
                limit = config.max_rows_per_request
                raise ClientError(413 if texts else 400, f"prompt takes 1 to {limit} strings, got {len(texts)}")
            sampling = _sampling(body, config, 16)
            if any(len(t) > config.max_length * CHARS_PER_TOKEN for t in texts):  # refused before tokenizing
                raise ClientError(400, f"a prompt is over the limit of {config.max_length} tokens")
            prompts = await asyncio.to_thread(encode_prompts, texts)
        _check_prompts(prompts, sampling, config)
        run = _Run(engine, prompts, adapter, sampling, body.model, stats)
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()), "model": body.model}
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(run, head, chat, usage), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
        return await _complete(request, run, head, chat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(request, await parse(request, Completion), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await respond(request, await parse(request, Chat), chat=True)

    @app.get("/v1/models")
    async def models():
        names = [engine.model_name, *engine.adapters]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "lorakit",
                                            **({"parent": engine.model_name} if n != engine.model_name else {})}
                                           for n in names]}


async def _complete(request, run: _Run, head: dict[str, Any], chat: bool) -> dict[str, Any]:
    texts = [""] * len(run.seqs)
    reasons: list[str | None] = [None] * len(run.seqs)

    async def collect():
        async for i, (kind, value) in run:
            if kind == "text":
                texts[i] += value
            elif kind == "error":
                raise ClientError(*value)
            else:
                reasons[i] = value

    # A client that goes away frees its rows at once, not after its completion is done.
    work, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            run.cancel()
    work.result()
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices, "usage": run.usage()}


def _sse(payload: dict[str, Any] | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


async def _stream(run: _Run, head: dict[str, Any], chat: bool, usage: bool):
    """Server-sent events as OpenAI sends them; a client that goes away cancels the run."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(i: int, text: str | None, reason: str | None) -> bytes:
        if chat:
            delta = {} if text is None else {"content": text}
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}
        return _sse({**head, "choices": [choice]})

    try:
        if chat:
            for i in range(len(run.seqs)):
                yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
        async for i, (kind, value) in run:
            if kind == "text":
                yield chunk(i, value, None)
            elif kind == "done":
                yield chunk(i, None, value)
            else:
                status, message = value
                kind = "invalid_request_error" if status < 500 else "server_error"
                yield _sse({"error": {"message": message, "type": kind, "code": status}})
        if usage:
            yield _sse({**head, "choices": [], "usage": run.usage()})
        yield _sse("[DONE]")
    finally:
        run.cancel()  # a no-op for finished sequences
