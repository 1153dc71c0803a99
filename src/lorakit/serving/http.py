"""``lorakit serve``: many adapters on one base model behind an HTTP JSON API.

A classifier base serves the routes below; a causal LM base serves OpenAI-compatible
completions instead (:mod:`lorakit.serving.openai`), with the same adapter routes and limits.

Requests that arrive together are batched whatever adapters they name (paper section
4.2): :func:`lorakit.adapter_per_row` runs each row of a forward pass through its own
adapter. A single worker thread owns the model, so forwards and adapter
loads/unloads never overlap; the event loop only parses, validates and queues.

    POST   /v1/classify          {"adapter": "mrpc", "inputs": [["s1", "s2"], ...]}
    GET    /v1/adapters
    POST   /v1/adapters          {"name": "rte", "path": "runs/rte/seed0/adapter"}   (token)
    DELETE /v1/adapters/{name}                                                      (token)
"""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations,
# whose types are defined inside create_app.
import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import data
from ..io import load_adapter
from ..layers import ModulesToSave
from ..model import adapter_per_row, remove_adapter
from ..models import resolve_model
from ..precision import precision_context, resolve_precision
from ..tasks.classify import task_of
from ..tasks.glue import POOLINGS, load_classifier, mean_pooling

__all__ = ["ServeConfig", "Engine", "create_app", "serve"]


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServeConfig:
    """The server's limits; field docs become ``lorakit serve --help``."""

    max_batch_rows: int = _opt(64, "rows in one forward pass (generation: sequences decoded together; their key/value "
                                   "cache holds at most max_batch_rows x (max_length + max_new_tokens) positions, and "
                                   "shrinks back when the load falls)")
    max_wait_ms: float = _opt(2.0, "how long a forward pass waits for more requests once one is queued")
    max_queue: int = _opt(256, "queued requests; more are refused with 503")
    max_rows_per_request: int = _opt(64, "rows in one request; more are refused with 413")
    max_length: int = _opt(512, "tokens per row (generation: per prompt); longer ones are refused")
    max_new_tokens: int = _opt(512, "generation: the most max_tokens a request may ask for")
    prefill_chunk: int = _opt(256, "generation: prompt tokens prefilled per decode step (long prompts take several)")
    max_body_bytes: int = _opt(1 << 20, "bytes in a request body; more are refused with 413")
    max_batch_tokens: int = _opt(8192, "tokens in one forward pass; larger requests run in parts, others in between")
    max_connections: int = _opt(64, "open connections; more get 503")
    header_timeout_s: float = _opt(10.0, "a connection must send each request head within this time (of opening, "
                                         "or of the previous response on a kept-alive connection)")
    body_timeout_s: float = _opt(10.0, "and its body within this time (else 408)")
    keep_alive_s: float = _opt(5.0, "an idle kept-alive connection is closed after this time")
    batching: bool = _opt(True, "batch requests together in forward passes (--no-batching: one request at a time)")
    engine: str = _opt("auto", "generation: the decoding engine: decoder (lorakit's lean forward: llama, mistral, qwen2 "
                               "without a sliding window, gpt2), model (the model's own transformers modules: every "
                               "served family), auto (decoder where it serves the family, else model)")
    compile: bool = _opt(False, "generation: run a single stream's decode step under torch.compile (the model engine; "
                                "compiled at start-up, about a minute per graph; also LORAKIT_COMPILE=1)")
    token: str | None = _opt(None, "bearer token of the admin routes (default: $LORAKIT_TOKEN; none: open on loopback)")

    def __post_init__(self) -> None:
        for name in ("max_batch_rows", "max_queue", "max_rows_per_request", "max_length", "max_body_bytes",
                     "max_batch_tokens", "max_new_tokens", "prefill_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.max_connections, bool) or not isinstance(self.max_connections, int) or self.max_connections <= 0:
            raise ValueError(f"max_connections must be a positive integer, got {self.max_connections!r}")
        if self.engine not in ("auto", "decoder", "model"):
            raise ValueError(f"engine must be auto, decoder or model, got {self.engine!r}")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be 0 or more, got {self.max_wait_ms!r}")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")


class ClientError(Exception):
    """A request the server refuses: becomes an HTTP ``status`` with ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class AdapterInfo:
    name: str
    path: str
    task: data.Task
    pooling: str = "cls"

    def public(self, with_path: bool = False) -> dict[str, Any]:
        """What clients see; the server's file path only for admins."""
        return {"name": self.name, **({"path": self.path} if with_path else {}), "task": self.task.name,
                "labels": self.task.labels, "inputs_per_row": len(self.task.text_columns), "pooling": self.pooling}


_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")


def clip(text: str, limit: int = 64) -> str:
    """``text`` cut to ``limit`` characters for an error message (a client's string is never echoed whole)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_name(name: str) -> None:
    """An adapter's name: 1 to 128 letters, digits, '_' or '-' (it is echoed in lists and errors)."""
    if not _NAME.fullmatch(name):
        raise ClientError(400, f"an adapter name is 1 to 128 letters, digits, '_' or '-'; got {clip(name)!r}")


def adapter_folder(path: str) -> Path:
    """``path`` as a folder that exists (else a 400)."""
    shown = path if len(path) <= 200 else path[:200] + "..."
    try:
        if not Path(path).is_dir():
            raise ClientError(400, f"adapter folder {shown!r} does not exist")
    except OSError as e:  # e.g. a name too long for the file system
        raise ClientError(400, f"adapter folder {shown!r} cannot be read: {e.strerror or e}") from None
    return Path(path)


def task_info(folder: Path) -> dict[str, Any]:
    """The folder's ``task.json`` (``{}`` if absent); ``task`` and ``model`` must be strings."""
    info_file = folder / "task.json"
    try:
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
        wrong = [k for k in ("task", "model") if k in info and not isinstance(info[k], str)]
        if wrong:
            raise ValueError(f"{wrong} must be strings")
    except (OSError, ValueError) as e:
        raise ClientError(400, f"{str(info_file)!r} is unreadable: {e}") from None
    return info


# ---- the model side (runs on the worker thread only) ----------------------------------------


class Engine:
    """One base classifier and its adapters; every method runs on the single worker thread."""

    def __init__(self, model_name: str, precision: str = "auto") -> None:
        precision = resolve_precision(precision)
        self.model_name = model_name
        self.precision = precision
        # The base's own head is never used: every adapter brings its head (resized to its task).
        self.tokenizer, self.model = load_classifier(model_name, data.get_task("mrpc"))
        self.model.eval()
        self.adapters: dict[str, AdapterInfo] = {}
        # Which rows of the next forward read the masked mean (adapters trained with --pooling mean): set before
        # every forward once the pooling hooks are in (at the first such adapter).
        self.mean_rows = torch.zeros(0, dtype=torch.bool)
        self._pooling_hooked = False
        limit = getattr(self.tokenizer, "model_max_length", None)
        self.max_length = limit if isinstance(limit, int) and limit < 1_000_000 else 512  # the model's position limit

    def load(self, name: str, path: str, task: str | None = None) -> AdapterInfo:
        check_name(name)
        if name in self.adapters:
            raise ClientError(409, f"an adapter named {name!r} is already loaded; DELETE it first")
        folder = adapter_folder(path)
        info = task_info(folder)
        task = task or info.get("task")
        pooling = info.get("pooling", "cls")
        if pooling not in POOLINGS:
            raise ClientError(400, f"adapter {name!r} has pooling {clip(str(pooling))!r} in its task.json; "
                                   f"expected one of {POOLINGS}")
        if pooling == "mean" and not self._pooling_hooked:
            try:
                mean_pooling(self.model, rows=lambda: self.mean_rows)
            except ValueError as e:
                raise ClientError(400, f"adapter {name!r} was trained with mean pooling: {e}") from None
            self._pooling_hooked = True
        if not task:
            raise ClientError(400, f"{str(folder)[:200]!r} has no task.json; give the adapter's GLUE task "
                                   "(\"task\" here, --task for lorakit serve)")
        trained_on = info.get("model")
        try:
            if trained_on and resolve_model(trained_on) != resolve_model(self.model_name):
                raise ClientError(400, f"adapter {name!r} was trained on {trained_on!r}, but this server runs "
                                       f"{self.model_name!r}")
            glue_task = task_of({**info, "task": task})  # a GLUE task, or classify with its classes
            load_adapter(self.model, folder, name, resize_saved=True)
        except (ValueError, TypeError, RuntimeError, MemoryError) as e:  # bad config values, tensors too large
            raise ClientError(400, " ".join(str(e).split())[:1000]) from None
        try:
            problem = self._head_problem(name, glue_task, pooling)
        except Exception as e:  # a head whose forward fails
            problem = f"fails on a probe input: {type(e).__name__}: {str(e)[:300]}"
        if problem:
            remove_adapter(self.model, name)
            raise ClientError(400, f"adapter {name!r} {problem}")
        self.adapters[name] = AdapterInfo(name, str(folder), glue_task, pooling)
        return self.adapters[name]

    def _head_problem(self, name: str, task: data.Task, pooling: str) -> str | None:
        """Why adapter ``name`` cannot classify ``task`` (None if it can): it must bring its
        own classification head, with one output per label (one for regression)."""
        head = next((m for m in (getattr(self.model, n, None) for n in ("classifier", "score")) if m is not None), None)
        if not (isinstance(head, ModulesToSave) and name in head.copies):
            return "has no classification head of its own (modules_to_save); it cannot classify"
        self.mean_rows = torch.tensor([pooling == "mean"])
        with torch.inference_mode(), adapter_per_row(self.model, [name]):
            width = self.model(**self.tokenizer("probe", return_tensors="pt")).logits.shape[-1]
        if width != task.num_labels:
            return f"has a head with {width} outputs, but task {task.name} has {task.num_labels}"
        return None

    def unload(self, name: str) -> None:
        if name not in self.adapters:
            raise ClientError(404, f"no adapter named {clip(name)!r}; loaded: {sorted(self.adapters)}")
        del self.adapters[name]
        remove_adapter(self.model, name)

    @torch.inference_mode()
    def classify(self, requests: "list[_Request]") -> list[dict[str, Any] | ClientError]:
        """All ``requests`` in mixed-adapter forward passes; a result (or error) per request.

        Rows are sorted by length and cut into as few groups as keep padding under
        ``WASTE`` (a forward's cost grows with its padded tokens on a CPU), each group
        one forward pass whatever adapters its rows use.
        """
        # An adapter may have been unloaded (or replaced under its name) while requests waited.
        live = [r for r in requests if self.adapters.get(r.info.name) is r.info]
        features = [f for r in live for f in r.features]
        adapters = [r.info.name for r in live for _ in r.features]
        mean = [r.info.pooling == "mean" for r in live for _ in r.features]
        logits: list[torch.Tensor] = [torch.empty(0)] * len(features)
        for group in length_groups([len(f["input_ids"]) for f in features]):
            batch = data.collate([features[i] for i in group], [0] * len(group), self.tokenizer.pad_token_id or 0, False)
            batch.pop("labels")
            self.mean_rows = torch.tensor([mean[i] for i in group])
            with adapter_per_row(self.model, [adapters[i] for i in group]), precision_context(self.precision):
                out = self.model(**batch).logits.float()
            for i, row in zip(group, out):
                logits[i] = row
        results: list[dict[str, Any] | ClientError] = []
        start = 0
        for r in requests:
            if r not in live:
                results.append(ClientError(404, f"adapter {r.info.name!r} was unloaded while the request waited"))
                continue
            info = r.info
            rows = logits[start:start + len(r.features)]
            start += len(r.features)
            results.append(_result(info, torch.stack([row[: info.task.num_labels] for row in rows])))
        return results


WASTE = 0.1  # padding allowed in a forward pass, as a fraction of its real tokens
MIN_TOKENS = 256  # a forward pass this small is not split further (small matmuls are inefficient)


def length_groups(lengths: list[int], waste: float = WASTE, min_tokens: int = MIN_TOKENS) -> list[list[int]]:
    """Row indices sorted by length and cut into groups: a new group starts when the next
    row would pad the current one (of at least ``min_tokens`` real tokens) past ``waste``."""
    groups: list[list[int]] = []
    group: list[int] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if group and real >= min_tokens and lengths[i] * (len(group) + 1) > (1 + waste) * (real + lengths[i]):
            groups.append(group)
            group, real = [], 0
        group.append(i)
        real += lengths[i]
    return [*groups, group] if group else groups


def _result(info: AdapterInfo, logits: torch.Tensor) -> dict[str, Any]:
    task = info.task
    if task.labels is None:
        return {"adapter": info.name, "task": task.name, "labels": None, "scores": logits[:, 0].tolist()}
    probs = logits.softmax(-1)
    return {"adapter": info.name, "task": task.name, "labels": [task.labels[i] for i in probs.argmax(-1).tolist()],
            "scores": probs.tolist(), "label_names": list(task.labels)}


# ---- the request side (event loop) ---------------------------------------------------------


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


@dataclass(eq=False)
class _Request:
    info: AdapterInfo
    features: list[dict[str, list[int]]]
    future: asyncio.Future = field(repr=False)


class Batcher:
    """A bounded queue of requests and one task that turns them into forward passes."""

    def __init__(self, engine: Engine, config: ServeConfig) -> None:
        self.engine = engine
        self.config = config
        self.queue: asyncio.Queue[_Request] = asyncio.Queue(maxsize=config.max_queue)
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-model")
        self.forwards = 0
        self._held: _Request | None = None  # a request that did not fit the previous batch

    async def call(self, fn, *args):
        """Run ``fn`` on the model thread (after any forward in progress)."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    async def submit(self, info: AdapterInfo, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        """The request's result. A request of more than ``max_batch_tokens`` tokens runs in
        parts, each queued after the previous one is done: requests that arrive meanwhile
        run in between instead of waiting for all of it."""
        results = []
        for part in _parts(features, self.config.max_batch_tokens):
            request = _Request(info, part, asyncio.get_running_loop().create_future())
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

    async def _next(self, timeout: float | None) -> _Request | None:
        if self._held is not None:
            request, self._held = self._held, None
            return request
        if timeout is None:
            return await self.queue.get()
        try:
            return self.queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self.queue.get(), timeout)
        except (asyncio.QueueEmpty, TimeoutError):
            return None

    async def _collect(self) -> list[_Request]:
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


# ---- HTTP -------------------------------------------------------------------------------------


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
        if sum(len(t) for t in texts) > config.max_length * _CHARS_PER_TOKEN:  # refused before tokenizing
            raise ClientError(413, f"inputs[{i}] is {sum(len(t) for t in texts)} characters long; the limit is "
                                   f"{config.max_length} tokens")
        rows.append(texts)
    return rows


_CHARS_PER_TOKEN = 32  # no tokenizer makes fewer tokens than characters / 32 of ordinary text


def _tokenize(tokenizer, rows: list[tuple[str, ...]], max_length: int) -> list[dict[str, list[int]]]:
    enc = tokenizer(*zip(*rows))
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    features = [{k: enc[k][i] for k in keys} for i in range(len(rows))]
    for i, f in enumerate(features):
        if len(f["input_ids"]) > max_length:
            raise ClientError(413, f"inputs[{i}] is {len(f['input_ids'])} tokens long; the limit is {max_length}")
    return features


async def _send_json(send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _header_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request head
    within ``seconds`` of opening, or of the previous response on a kept-alive connection
    (uvicorn itself waits forever for a first head, and restarts its keep-alive timer at
    every byte of a later one: slowloris)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._await_head()

        def _await_head(self) -> None:
            self._before_head = self.cycle  # the head has come when uvicorn starts a new cycle
            self._head_timer = self.loop.call_later(seconds, self._head_overdue)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not self._before_head:  # a request head arrived: the body timeout takes over
                self._head_timer.cancel()

        def on_response_complete(self) -> None:
            self._head_timer.cancel()
            self._await_head()  # the next head on this connection, if kept alive
            super().on_response_complete()  # (which may start a pipelined request at once)
            if self.cycle is not self._before_head:
                self._head_timer.cancel()

        def connection_lost(self, exc) -> None:
            self._head_timer.cancel()
            super().connection_lost(exc)

        def _head_overdue(self) -> None:
            if self.cycle is self._before_head and not self.transport.is_closing():
                self.transport.close()

    return Protocol


class _BodyLimit:
    """ASGI middleware: read the whole request body first (chunked too) and refuse it
    with 413 past ``limit`` bytes, before the app parses anything."""

    def __init__(self, app, limit: int, timeout: float) -> None:
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        deadline = asyncio.get_running_loop().time() + self.timeout
        while more:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except TimeoutError:  # a body trickling in: answer and let the connection go
                return await _send_json(send, 408, {"error": f"request body not received within {self.timeout} s"})
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await _send_json(send, 413, {"error": f"request body over the limit of {self.limit} bytes"})
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


def create_app(engine, config: ServeConfig | None = None, adapters: dict[str, str] | None = None,
               task: str | None = None):
    """The FastAPI app serving ``engine`` (an :class:`Engine`, or a causal LM's
    :class:`lorakit.serving.openai.GenerationEngine`); ``adapters`` (name -> folder) are loaded at start-up,
    as of ``task`` when given (in place of their task.json's: a PEFT SEQ_CLS adapter has none)."""
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, ValidationError

    config = config or ServeConfig()
    for name, path in (adapters or {}).items():
        try:
            engine.load(name, path, task)
        except ClientError as e:
            raise ValueError(f"--adapter {clip(name)}={path}: {e}") from None

    generation = not isinstance(engine, Engine)

    @asynccontextmanager
    async def lifespan(app):
        if generation:  # the scheduler's thread runs the model; admin calls go between its steps
            app.state.runner = engine
            engine.start()
            yield
            engine.stop()
            return
        app.state.runner = app.state.batcher = Batcher(engine, config)
        task = asyncio.create_task(app.state.batcher.run())
        yield
        task.cancel()
        app.state.batcher.worker.shutdown(wait=True)

    app = FastAPI(title="lorakit serve", lifespan=lifespan)

    class Classify(BaseModel):
        model_config = ConfigDict(extra="forbid")
        adapter: str
        inputs: list[str | list[str]]

    class LoadAdapter(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str
        path: str
        task: str | None = None

    def authorized(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return config.token is not None and hmac.compare_digest(given.encode(), f"Bearer {config.token}".encode())

    def admin(request: Request) -> None:
        if config.token is None:
            # Without a token, a web page could still POST here cross-site as text/plain (no CORS
            # preflight); a JSON content type cannot be sent that way.
            if request.method == "POST" and request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
                raise ClientError(415, "admin routes take 'Content-Type: application/json' when the server has no --token")
            return
        if not authorized(request):
            raise ClientError(401, "this route needs 'Authorization: Bearer <token>' with the server's --token")

    @app.exception_handler(ClientError)
    async def client_error(request: Request, e: ClientError):
        if generation and request.url.path in ("/v1/completions", "/v1/chat/completions"):  # OpenAI's error shape
            kind = "invalid_request_error" if e.status < 500 else "server_error"
            return JSONResponse({"error": {"message": str(e), "type": kind, "param": None, "code": e.status}},
                                status_code=e.status)
        return JSONResponse({"error": str(e)}, status_code=e.status)

    async def parse(request: Request, schema: type[BaseModel]):
        """The JSON body as ``schema``, whatever the Content-Type (``curl -d`` sends a form type)."""
        try:
            return schema.model_validate_json(await request.body())
        except ValidationError as e:
            problems = [f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" if err["loc"] else err["msg"]
                        for err in e.errors()]
            kind = "malformed JSON" if any(err["type"] == "json_invalid" for err in e.errors()) else "invalid request"
            raise ClientError(400, f"{kind}: " + "; ".join(problems)) from None

    def lookup(name: str) -> AdapterInfo:
        info = engine.adapters.get(name)
        if info is None:
            raise ClientError(404, f"no adapter named {clip(name)!r}; loaded: {sorted(engine.adapters)}")
        return info

    if generation:
        from .openai import add_routes

        add_routes(app, engine, config, parse)
    else:
        @app.post("/v1/classify")
        async def classify(request: Request):
            body = await parse(request, Classify)
            info = lookup(body.adapter)
            rows = _texts(info, body.inputs, config)
            # off the event loop: other requests are read and answered meanwhile
            features = await asyncio.to_thread(_tokenize, engine.tokenizer, rows, min(config.max_length, engine.max_length))
            return await request.app.state.batcher.submit(info, features)

    @app.get("/v1/adapters")
    async def list_adapters(request: Request):
        paths = authorized(request)  # file paths only with the admin token
        return {"model": engine.model_name, "adapters": [a.public(paths) for a in list(engine.adapters.values())]}

    @app.post("/v1/adapters", status_code=201, dependencies=[Depends(admin)])
    async def add(request: Request):
        body = await parse(request, LoadAdapter)
        info = await request.app.state.runner.call(engine.load, body.name, body.path, body.task)
        return info.public(with_path=True)

    @app.delete("/v1/adapters/{name}", dependencies=[Depends(admin)])
    async def remove(name: str, request: Request):
        await request.app.state.runner.call(engine.unload, name)
        return {"deleted": name}

    @app.get("/healthz")
    async def health(request: Request):
        if generation:
            return {"ok": True, **engine.health(), "time": time.time()}
        batcher = request.app.state.batcher
        return {"ok": True, "queued": batcher.queue.qsize(), "forwards": batcher.forwards, "time": time.time()}

    return _BodyLimit(app, config.max_body_bytes, config.body_timeout_s)


def serve(model: str | None, adapters: dict[str, str], config: ServeConfig, host: str, port: int,
          precision: str = "auto", quantize: str | None = None, task: str | None = None) -> None:
    """Load the model and adapters and serve until interrupted."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and not config.token:
        raise ValueError(f"--host {host} would open the admin routes (loading any folder) to the network; "
                         "set a token with $LORAKIT_TOKEN or --token")
    model = model or _base_of(next(iter(adapters.values()), None))
    engine = _engine(model, config, precision, quantize)
    app = create_app(engine, config, adapters, task)
    print(f"lorakit serve: {model} ({engine.precision}) with adapters {sorted(adapters) or 'none'} "
          f"on http://{host}:{port}", flush=True)
    options = dict(**uvicorn_options(config), host=host, port=port, log_level="warning")
    if isinstance(engine, Engine):
        uvicorn.run(app, **options)
        return
    # Generation: the scheduler on the main thread (see Scheduler.run), HTTP on another one.
    engine.main_thread = True
    compiled = " (a single stream's decode step compiled)" if getattr(engine.scheduler.decoder, "compiled", False) else ""
    print(f"lorakit serve: decoding with the {engine.scheduler.engine} engine{compiled}", flush=True)
    engine.prepare()  # here, not on the HTTP thread: torch ops run there once slowed this one (int8: 43 vs 21 ms/token)
    if engine.quantized:
        print(f"lorakit serve: {engine.quantized}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, **options))

    def http() -> None:
        try:
            server.run()
        finally:  # the server stopped (or never started: a port in use): so does the scheduler
            engine.scheduler.stop()

    thread = threading.Thread(target=http, name="lorakit-http", daemon=True)
    with _stop_on_signals(server, engine.scheduler):
        thread.start()
        engine.scheduler.run()  # until stopped; its completions then end with a 503 error event
        server.should_exit = True
        thread.join(SHUTDOWN_GRACE_S)  # the streams send their last event, uvicorn closes their connections
        if thread.is_alive():  # a client that reads nothing more holds its connection open
            server.force_exit = True
            thread.join(10)


SHUTDOWN_GRACE_S = 3.0  # how long open connections may take to close once generation has stopped


@contextlib.contextmanager
def _stop_on_signals(server, scheduler):
    """Ctrl-C (SIGINT) and SIGTERM stop the scheduler and the HTTP server, whose thread
    installs no signal handlers; a second one stops waiting for open connections. (Python's
    own KeyboardInterrupt would leave uvicorn waiting for streams that no longer advance.)"""
    import signal

    def stop(signum, frame) -> None:
        server.force_exit = server.should_exit
        server.should_exit = True
        scheduler.stop()

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _base_of(adapter: str | None) -> str:
    """The base model of ``adapter``, as eval, generate and merge read it: its ``task.json``'s model,
    else the ``base_model_name_or_path`` of its ``adapter_config.json`` (a PEFT adapter)."""
    from ..config import LoraConfig

    found = None
    if adapter is not None:
        try:
            found = task_info(Path(adapter)).get("model") or LoraConfig.load(adapter).base_model_name_or_path
        except ClientError as e:
            raise ValueError(str(e)) from None
    if not found:
        raise ValueError("name the base model with --model (no adapter that names its base: task.json's model or "
                         "adapter_config.json's base_model_name_or_path)")
    return found


def _engine(model: str, config: ServeConfig, precision: str, quantize: str | None = None):
    """A :class:`GenerationEngine` for a causal LM, else a classification :class:`Engine`."""
    from transformers import AutoConfig

    architectures = AutoConfig.from_pretrained(resolve_model(model)).architectures or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        from .openai import GenerationEngine

        return GenerationEngine(model, config, precision, quantize)
    if quantize:
        raise ValueError("--quantize applies to causal LMs (generation) only")
    return Engine(model, precision)


def uvicorn_options(config: ServeConfig) -> dict[str, Any]:
    """Connection limits and timeouts for ``uvicorn.run`` / ``uvicorn.Config``."""
    return {"http": _header_timeout_protocol(config.header_timeout_s), "limit_concurrency": config.max_connections,
            "timeout_keep_alive": config.keep_alive_s}
