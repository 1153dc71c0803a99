"""The classification API of ``lorakit serve``, mounted on the HTTP shell (:mod:`lorakit.serving.http`).

    POST /v1/classify          {"adapter": "mrpc", "inputs": [["s1", "s2"], ...]}

The event loop only parses, validates and tokenizes (on a thread); a :class:`Batcher` queues the
requests and turns them into mixed-adapter forward passes on the one thread that owns the model.
"""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations.
import asyncio
import concurrent.futures
import json
from typing import Any

from .adapters import clip
from .classify import AdapterInfo, Engine, Job
from .config import CHARS_PER_TOKEN, ClientError, ServeConfig
from .metrics import Gauge, RequestMetrics

__all__ = ["Batcher", "ClassifyApi"]


def _tokens(features: list[dict[str, list[int]]]) -> int:
    return sum(len(f["input_ids"]) for f in features)


def _parts(features: list[dict[str, list[int]]], budget: int) -> list[list[dict[str, list[int]]]]:
    """Consecutive rows in parts of at most ``budget`` tokens (a longer row alone)."""
    parts: list[list[dict[str, list[int]]]] = [[]]
    for f in features:
        if parts[-1] and _tokens(parts[-1]) + len(f["input_ids"]) > budget:
            parts.append([])
        parts[-1].append(f)
    return parts



class Batcher:
    """A bounded queue of requests and one task that turns them into forward passes."""

    def __init__(self, engine: Engine, config: ServeConfig) -> None:
        self.engine = engine
        self.config = config
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=config.max_queue)
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-model")
        self.forwards = 0
        self._held: Job | None = None  # a request that did not fit the previous batch

    async def call(self, fn, *args):
        """Run ``fn`` on the model thread (after any forward in progress)."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    async def submit(self, info: AdapterInfo, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        """The request's result. A request of more than ``max_batch_tokens`` tokens runs in
        parts, each queued after the previous one is done: requests that arrive meanwhile
        run in between instead of waiting for all of it."""
        results = []
        for part in _parts(features, self.config.max_batch_tokens):
            request = Job(info, part, asyncio.get_running_loop().create_future())
            try:
                self.queue.put_nowait(request)
            except asyncio.QueueFull:
                raise ClientError(503, f"server busy: {self.config.max_queue} requests already queued; retry later") from None
            result = await request.future
            if isinstance(result, ClientError):
                raise result
            results.append(result)
        return results[0] if len(results) == 1 else {**results[0], **{k: [v for r in results for v in r[k]]
                                                                         for k in ("labels", "scores") if results[0][k]}}

    async def _next(self, timeout: float | None) -> Job | None:
        if self._held is not None:
            request, self._held = self._held, None
            return request
        if timeout is None:
            return await self.queue.get()
        try:
            return self.queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self.queue.get(), timeout)
        except (asyncio.QueueEmpty, TimeoutError):
            return None

    async def _collect(self) -> list[Job]:
        batch = [await self._next(None)]
        rows, tokens = len(batch[0].features), _tokens(batch[0].features)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.max_wait_ms / 1000
        while self.config.batching and rows < self.config.max_batch_rows:
            request = await self._next(deadline - loop.time())
            if request is None:
                break
            if (rows + len(request.features) > self.config.max_batch_rows
                    or tokens + _tokens(request.features) > self.config.max_batch_tokens):
                self._held = request
                break
            batch.append(request)
            rows, tokens = rows + len(request.features), tokens + _tokens(request.features)
        return batch

    async def run(self) -> None:
        while True:
            batch = await self._collect()
            try:
                results = await self.call(self.engine.classify, batch)
            except Exception as e:  # a bug or an out-of-memory: fail these requests, keep serving
                results = [ClientError(500, f"forward pass failed: {type(e).__name__}: {e}")] * len(batch)
            self.forwards += 1
            for request, result in zip(batch, results):
                if not request.future.done():
                    request.future.set_result(result)


# ---- requests ----------------------------------------------------------------------------------


def _texts(info: AdapterInfo, inputs: list[Any], config: ServeConfig) -> list[tuple[str, ...]]:
    want = len(info.task.text_columns)
    if not inputs:
        raise ClientError(400, "'inputs' is empty")
    if len(inputs) > config.max_rows_per_request:
        raise ClientError(413, f"{len(inputs)} rows in one request; the limit is {config.max_rows_per_request}")
    rows = []
    for i, row in enumerate(inputs):
        texts = (row,) if isinstance(row, str) else tuple(row)
        if len(texts) != want or not all(isinstance(t, str) for t in texts):
            shape = "a string or [string]" if want == 1 else f"[{', '.join(['string'] * want)}]"
            raise ClientError(400, f"inputs[{i}]: task {info.task.name} takes {shape} per row, got {json.dumps(row)[:80]}")
        if sum(len(t) for t in texts) > config.max_length * CHARS_PER_TOKEN:  # refused before tokenizing
            raise ClientError(413, f"inputs[{i}] is {sum(len(t) for t in texts)} characters long; the limit is "
                                   f"{config.max_length} tokens")
        rows.append(texts)
    return rows


def _tokenize(tokenizer, rows: list[tuple[str, ...]], max_length: int) -> list[dict[str, list[int]]]:
    enc = tokenizer(*zip(*rows))
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    features = [{k: enc[k][i] for k in keys} for i in range(len(rows))]
    for i, f in enumerate(features):
        if len(f["input_ids"]) > max_length:
            raise ClientError(413, f"inputs[{i}] is {len(f['input_ids'])} tokens long; the limit is {max_length}")
    return features



class ClassifyApi:
    """``/v1/classify`` over a classification :class:`Engine`, for :func:`lorakit.serving.http.build_app`."""

    openai_paths: frozenset[str] = frozenset()  # (lorakit's error shape on every route)

    def __init__(self, engine: Engine, config: ServeConfig) -> None:
        self.engine, self.config = engine, config
        self.batcher: Batcher | None = None
        self.stats = RequestMetrics(waiting=lambda: self.batcher.queue.qsize(), adapters=lambda: len(engine.adapters))
        self.stats.gauges.append(Gauge("lorakit:forward_passes_total", "Forward passes run", lambda: self.batcher.forwards,
                                       kind="counter"))

    def start(self) -> None:
        """On the event loop: the batcher and its task."""
        self.batcher = Batcher(self.engine, self.config)
        self._task = asyncio.create_task(self.batcher.run())

    def stop(self) -> None:
        self._task.cancel()
        self.batcher.worker.shutdown(wait=True)

    async def call(self, fn, *args):
        return await self.batcher.call(fn, *args)

    async def load(self, name: str, path: str, task: str | None):
        return await self.call(self.engine.load, name, path, task)

    def health(self) -> dict[str, Any]:
        return {"queued": self.batcher.queue.qsize(), "forwards": self.batcher.forwards}

    def metrics(self) -> str:
        return self.stats.render()

    def mount(self, app, parse) -> None:
        from fastapi import Request
        from pydantic import BaseModel, ConfigDict

        class Classify(BaseModel):
            model_config = ConfigDict(extra="forbid")
            adapter: str
            inputs: list[str | list[str]]

        engine, config = self.engine, self.config

        @app.post("/v1/classify")
        async def classify(request: Request):
            body = await parse(request, Classify)
            info = engine.adapters.get(body.adapter)
            if info is None:
                raise ClientError(404, f"no adapter named {clip(body.adapter)!r}; loaded: {sorted(engine.adapters)}")
            rows = _texts(info, body.inputs, config)
            # off the event loop: other requests are read and answered meanwhile
            features = await asyncio.to_thread(_tokenize, engine.tokenizer, rows, min(config.max_length, engine.max_length))
            result = await self.batcher.submit(info, features)
            self.stats.request(info.name, _tokens(features))
            return result
