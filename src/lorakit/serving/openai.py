"""``lorakit serve`` for causal LMs: many generation adapters on one base, OpenAI-compatible.

    POST /v1/completions        {"model": "e2e", "prompt": "name : The Vaults | Type : pub\\n", "max_tokens": 64}
    POST /v1/chat/completions   {"model": "support", "messages": [{"role": "user", "content": "..."}]}
    GET  /v1/models             the base model (no adapter) and every adapter

``model`` names an adapter, or the base model's name for no adapter; ``stream: true`` answers
with server-sent events. All requests share the decode steps of one :class:`Scheduler`
(continuous batching across adapters, :mod:`lorakit.serving.generation`); the adapter routes of
the HTTP shell (:mod:`lorakit.serving.http`) load and unload adapters while streams run.

Sampling fields (:mod:`lorakit.serving.sampling`): ``temperature``, ``top_p``, ``top_k``, ``min_p``,
``repetition_penalty`` (vLLM's), ``presence_penalty``, ``frequency_penalty``, ``seed`` (choice ``j`` of
``n`` draws with ``seed + j``, as vLLM). ``n`` completions of a prompt share its prefill (the scheduler's
forks); choice ``i * n + j`` is prompt ``i``'s ``j``-th. ``logprobs`` (completions: an int, the
alternatives per token; chat: ``logprobs: true`` and ``top_logprobs``) come in OpenAI's shapes, of the
model's raw logits; ``echo`` puts the prompt before the completion, with its tokens' log-probabilities
when ``logprobs`` is set (the first token's is null), and ``max_tokens: 0`` then returns them alone (what
lm-evaluation-harness's completions backend reads).
"""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations.
import asyncio
import itertools
import json
import time
import uuid
from dataclasses import replace
from typing import Any

from .config import CHARS_PER_TOKEN, ClientError, ServeConfig
from .generation import GenerationEngine
from .metrics import GenerationMetrics
from .openai_requests import check_n, check_prompts, sampling_of, schemas
from .sampling import Logprob, Sampling
from .scheduler import Busy, Sequence
from .tokens import add_tokenizer_routes, chat_ids, message_text

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

    async def load(self, name: str, path: str, task: str | None):
        await self.call(self.engine.load, name, path, task)
        return await self.engine.verify(name) if name in self.engine.pending else self.engine.adapters[name]

    def health(self) -> dict[str, Any]:
        return self.engine.health()

    def metrics(self) -> str:
        return self.stats.render()

    def mount(self, app, parse) -> None:
        add_routes(app, self.engine, self.config, parse, self.stats)
        add_tokenizer_routes(app, self.engine, parse)


def _seeded(sampling: Sampling, j: int) -> Sampling:
    """Choice ``j``'s sampling: its own seed, ``seed + j`` (vLLM's)."""
    return sampling if sampling.seed is None or j == 0 else replace(sampling, seed=(sampling.seed + j) % 2**63)


class _Run:
    """The completions of one request: ``n`` sequences per prompt (one submitted with ``n - 1`` forks)
    given to the scheduler, their events gathered on the event loop. ``echo``: each prompt's text, for
    a completion that starts with it; ``text_of``: a token's text."""

    def __init__(self, engine: GenerationEngine, prompts: list[list[int]], adapter: str | None, sampling: Sampling,
                 n: int, model: str, stats: GenerationMetrics, echo: list[str] | None = None) -> None:
        self.engine, self.model, self.stats, self.n, self.echo = engine, model, stats, n, echo
        self.sampling, self.text_of = sampling, engine.token_text
        self.events: asyncio.Queue = asyncio.Queue()
        self.seqs: list[Sequence] = []
        for p, ids in enumerate(prompts):  # choice p * n + j: prompt p's j-th
            forks = [Sequence(ids, adapter, _seeded(sampling, j), self._emitter(p * n + j)) for j in range(1, n)]
            self.seqs += [Sequence(ids, adapter, sampling, self._emitter(p * n), forks), *forks]
        self.open = len(self.seqs)
        self.start = time.monotonic()
        self.seen, self.last = [0] * len(self.seqs), [self.start] * len(self.seqs)  # per sequence: tokens, time
        self.given = [0] * len(self.seqs)  # per sequence: log-probabilities handed out
        for seq in self.seqs[::n]:
            try:
                engine.scheduler.submit(seq)
            except Busy as e:
                self.cancel()
                raise ClientError(503, str(e)) from None
        stats.request(model, sum(len(ids) for ids in prompts))

    def _emitter(self, i: int):
        loop = asyncio.get_running_loop()

        def emit(event) -> None:  # on the scheduler's thread, right after the token that made the event
            seq = self.seqs[i]
            loop.call_soon_threadsafe(self.events.put_nowait, (i, event, time.monotonic(), seq.sampled, len(seq.tokens)))

        return emit

    async def __aiter__(self):
        """``(index, event, logprobs)`` until every sequence is done (see :class:`Sequence`): the
        :class:`Logprob` of each token generated since the sequence's previous event (none unless asked)."""
        while self.open:
            i, event, at, sampled, tokens = await self.events.get()
            self._count(i, event, at, sampled)
            if event[0] != "text":
                self.open -= 1
            logprobs = self.seqs[i].logprobs[self.given[i] : tokens]  # (a final EOS's has no text: left out)
            self.given[i] = max(self.given[i], tokens)
            yield i, event, logprobs

    def prompt_logprobs(self, i: int) -> list[Logprob]:
        """Choice ``i``'s prompt's log-probabilities (read by the first of its ``n`` sequences)."""
        return self.seqs[i - i % self.n].prompt_logprobs

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
        prompt = sum(len(s.prompt) for s in self.seqs[:: self.n])  # (once per prompt, whatever n)
        completion = sum(s.sampled for s in self.seqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _until_disconnect(request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def add_routes(app, engine: GenerationEngine, config: ServeConfig, parse, stats: GenerationMetrics) -> None:
    """``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models`` on ``app``."""
    from fastapi import Request
    from fastapi.responses import StreamingResponse

    Completion, Chat = schemas()
    tokenizer = engine.tokenizer

    def encode_prompts(prompts: list[str]) -> list[list[int]]:
        return [tokenizer(p)["input_ids"] for p in prompts]

    def encode_chat(messages) -> list[list[int]]:
        return [chat_ids(tokenizer, engine.model_name, messages)]

    async def respond(request: Request, body, chat: bool):
        adapter = engine.resolve(body.model)
        echo = None
        if chat:
            if not body.messages:
                raise ClientError(400, "messages is empty")
            sampling = sampling_of(body, config, config.max_new_tokens, chat)
            check_n(body.n, 1, engine.scheduler.max_rows, config)
            chars = sum(len(message_text(m)) for m in body.messages)
            if chars > config.max_length * CHARS_PER_TOKEN:  # refused before tokenizing
                raise ClientError(400, f"messages are {chars} characters long, over the limit of {config.max_length} tokens")
            prompts = await asyncio.to_thread(encode_chat, body.messages)
        else:
            texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            texts = [texts] if texts and isinstance(texts[0], int) else texts  # (one prompt of token ids)
            if not texts or len(texts) > config.max_rows_per_request:
                limit = config.max_rows_per_request
                raise ClientError(413 if texts else 400, f"prompt takes 1 to {limit} strings, got {len(texts)}")
            sampling = sampling_of(body, config, 16, chat)
            check_n(body.n, len(texts), engine.scheduler.max_rows, config)
            if not isinstance(texts[0], str):
                prompts = texts
            elif any(len(t) > config.max_length * CHARS_PER_TOKEN for t in texts):  # refused before tokenizing
                raise ClientError(400, f"a prompt is over the limit of {config.max_length} tokens")
            else:
                prompts = await asyncio.to_thread(encode_prompts, texts)
        check_prompts(prompts, sampling, config, engine.vocab)
        if not chat and body.echo:
            echo = texts if isinstance(texts[0], str) else await asyncio.to_thread(tokenizer.batch_decode, prompts)
        run = _Run(engine, prompts, adapter, sampling, body.n, body.model, stats, echo)
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
        adapters = list(engine.adapters.values())
        base = {"id": engine.model_name, "object": "model", "created": 0, "owned_by": "lorakit"}
        return {"object": "list", "data": [base, *({**base, "id": a.name, "parent": engine.model_name,
                                                    "receipt": a.receipt} for a in adapters)]}


class _Shapes:
    """OpenAI's shapes of a run's choices and their log-probabilities. Completions: ``{tokens,
    token_logprobs, top_logprobs, text_offset}``, each ``top_logprobs`` entry a ``{text: logprob}`` of the
    most likely tokens and the token itself (vLLM's), ``text_offset`` counting the characters of the token
    texts before (``offset``: per choice, those given so far); chat: ``{content: [{token, logprob, bytes,
    top_logprobs: [{token, logprob, bytes}]}]}``."""

    def __init__(self, run: _Run, chat: bool) -> None:
        self.run, self.chat, self.text_of = run, chat, run.text_of
        self.offset = [0] * len(run.seqs)

    def echo(self, i: int) -> tuple[str, list[Logprob]]:
        """Choice ``i``'s start: its prompt and the prompt's log-probabilities (if echo asks)."""
        return (self.run.echo[i // self.run.n], self.run.prompt_logprobs(i)) if self.run.echo else ("", [])

    def logprobs(self, i: int, entries: list[Logprob], empty: bool = False) -> dict[str, Any] | None:
        """The next ``entries`` of choice ``i`` (None when the request did not ask, or there are none and
        not ``empty``)."""
        if self.run.sampling.logprobs is None or not (entries or empty):
            return None
        tokens = [self.text_of(e.token) for e in entries]
        if self.chat:
            return {"content": [{**self._entry(t, e.logprob), "top_logprobs": [self._entry(self.text_of(a), lp)
                                                                                for a, lp in e.top]}
                                for t, e in zip(tokens, entries)]}
        offsets = list(itertools.accumulate((len(t) for t in tokens), initial=self.offset[i]))
        self.offset[i] = offsets.pop()
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [None if e.logprob is None else {**{self.text_of(a): lp for a, lp in e.top}, t: e.logprob}
                                 for t, e in zip(tokens, entries)],
                "text_offset": offsets}

    @staticmethod
    def _entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


async def _complete(request, run: _Run, head: dict[str, Any], chat: bool) -> dict[str, Any]:
    texts = [""] * len(run.seqs)
    reasons: list[str | None] = [None] * len(run.seqs)
    shapes = _Shapes(run, chat)
    entries: list[list[Logprob]] = [[] for _ in run.seqs]

    async def collect():
        async for i, (kind, value), logprobs in run:
            entries[i] += logprobs
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
    choices = []
    for i, (text, reason) in enumerate(zip(texts, reasons)):
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "logprobs": shapes.logprobs(i, entries[i], empty=True), "finish_reason": reason})
        else:
            prompt, prompt_logprobs = shapes.echo(i)
            logprobs = shapes.logprobs(i, prompt_logprobs + entries[i], empty=True)
            choices.append({"index": i, "text": prompt + text, "logprobs": logprobs, "finish_reason": reason})
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices, "usage": run.usage()}


def _sse(payload: dict[str, Any] | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


async def _stream(run: _Run, head: dict[str, Any], chat: bool, usage: bool):
    """Server-sent events as OpenAI sends them, each chunk one choice's (``index``); a client that goes
    away cancels the run."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    shapes = _Shapes(run, chat)
    started = [False] * len(run.seqs)

    def chunk(i: int, text: str | None, reason: str | None, logprobs: list[Logprob]) -> bytes:
        if chat:
            delta = {} if text is None else {"content": text}
            choice = {"index": i, "delta": delta, "logprobs": shapes.logprobs(i, logprobs), "finish_reason": reason}
        else:
            choice = {"index": i, "text": text or "", "logprobs": shapes.logprobs(i, logprobs), "finish_reason": reason}
        return _sse({**head, "choices": [choice]})

    try:
        if chat:
            for i in range(len(run.seqs)):
                yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
        async for i, (kind, value), logprobs in run:
            if not started[i] and kind != "error" and run.echo:  # the prompt first, once it is read
                prompt, prompt_logprobs = shapes.echo(i)
                yield chunk(i, prompt, None, prompt_logprobs)
            started[i] = True
            if kind == "text":
                yield chunk(i, value, None, logprobs)
            elif kind == "done":
                yield chunk(i, None, value, logprobs)
            else:
                status, message = value
                kind = "invalid_request_error" if status < 500 else "server_error"
                yield _sse({"error": {"message": message, "type": kind, "code": status}})
        if usage:
            yield _sse({**head, "choices": [], "usage": run.usage()})
        yield _sse("[DONE]")
    finally:
        run.cancel()  # a no-op for finished sequences
