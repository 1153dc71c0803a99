"""The HTTP shell of ``lorakit serve``: what both APIs share, around the routes each mounts.

Limits and timeouts (a body over ``max_body_bytes``: 413; a head or body too slow: cut or 408; too
many connections: 503), the admin token, the two error shapes (lorakit's ``{"error": message}``;
OpenAI's ``{"error": {"message", "type", "param", "code"}}`` on the routes an API names), and the
routes every API has:

    GET    /healthz                     {"ok": true, ...the engine's counts}
    GET    /health                      200, no body (vLLM's)
    GET    /metrics                     Prometheus' text format (:mod:`lorakit.serving.metrics`)
    GET    /v1/adapters
    POST   /v1/adapters                 {"name": "rte", "path": "runs/rte/seed0/adapter"}          (token)
    DELETE /v1/adapters/{name}                                                                    (token)
    POST   /v1/load_lora_adapter        {"lora_name": "rte", "lora_path": "runs/rte/seed0/adapter"} (token, vLLM's)
    POST   /v1/unload_lora_adapter      {"lora_name": "rte"}                                        (token, vLLM's)

An :class:`Api` brings the rest: its engine (adapters, load, unload), its own routes, the thread
that runs the model (:class:`lorakit.serving.classify_api.ClassifyApi`,
:class:`lorakit.serving.openai.OpenAIApi`). The shell imports neither.
"""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations.
import asyncio
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from .adapters import clip
from .config import ClientError, ServeConfig
from .metrics import CONTENT_TYPE

__all__ = ["Api", "build_app", "uvicorn_options"]


class Api(Protocol):
    """What an API gives the shell."""

    engine: Any  # model_name, adapters (name -> info with .public(with_path)), load(name, path, task) at start-up, unload(name)
    openai_paths: frozenset[str]  # its routes that answer errors in OpenAI's shape

    def mount(self, app, parse: Callable[..., Awaitable[Any]]) -> None:
        """Add the API's own routes to ``app``; ``parse(request, schema)`` reads a JSON body (400 if invalid)."""

    def start(self) -> None:
        """Start the thread that runs the model (on the event loop, before the first request)."""

    def stop(self) -> None: ...

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the thread that runs the model, between two of its forward passes."""

    async def load(self, name: str, path: str, task: str | None) -> Any:
        """Load an adapter while serving (checking its receipt); its info (``.public(with_path)``)."""

    def health(self) -> dict[str, Any]:
        """The API's part of ``/healthz``."""

    def metrics(self) -> str:
        """``/metrics``: its counts in Prometheus' text format."""


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



VLLM_ADAPTER_ROUTES = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})


def build_app(api: Api, config: ServeConfig, adapters: dict[str, str] | None = None, task: str | None = None):
    """The ASGI app serving ``api`` within ``config``'s limits; ``adapters`` (name -> folder) are loaded at
    start-up, as of ``task`` when given (in place of their task.json's: a PEFT SEQ_CLS adapter has none)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    for name, path in (adapters or {}).items():
        try:
            api.engine.load(name, path, task)
        except ClientError as e:
            raise ValueError(f"--adapter {clip(name)}={path}: {e}") from None

    @asynccontextmanager
    async def lifespan(app):
        api.start()
        yield
        api.stop()

    app = FastAPI(title="lorakit serve", lifespan=lifespan)
    _error_shapes(app, api.openai_paths | VLLM_ADAPTER_ROUTES)
    api.mount(app, _parse)
    authorized, admin = _authorization(config)
    _adapter_routes(app, api, authorized, admin)
    _vllm_adapter_routes(app, api, admin)
    _health_routes(app, api)
    return _BodyLimit(app, config.max_body_bytes, config.body_timeout_s)


def _health_routes(app, api: Api) -> None:
    from fastapi import Response

    @app.get("/healthz")
    async def healthz():
        return {"ok": True, **api.health(), "time": time.time()}

    @app.get("/health")
    async def health():  # vLLM's: a 200 while the server answers
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        return Response(api.metrics(), media_type=CONTENT_TYPE)


def _error_shapes(app, openai_paths: frozenset[str]) -> None:
    """A :class:`ClientError` as JSON: in OpenAI's shape on ``openai_paths``, else ``{"error": message}``."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    @app.exception_handler(ClientError)
    async def client_error(request: Request, e: ClientError):
        if request.url.path in openai_paths:
            kind = "invalid_request_error" if e.status < 500 else "server_error"
            return JSONResponse({"error": {"message": str(e), "type": kind, "param": None, "code": e.status}},
                                status_code=e.status)
        return JSONResponse({"error": str(e)}, status_code=e.status)


async def _parse(request, schema):
    """The JSON body as ``schema`` (a pydantic model), whatever the Content-Type (``curl -d`` sends a form type)."""
    from pydantic import ValidationError

    try:
        return schema.model_validate_json(await request.body())
    except ValidationError as e:
        problems = [f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" if err["loc"] else err["msg"]
                    for err in e.errors()]
        kind = "malformed JSON" if any(err["type"] == "json_invalid" for err in e.errors()) else "invalid request"
        raise ClientError(400, f"{kind}: " + "; ".join(problems)) from None


def _authorization(config: ServeConfig):
    """``(authorized, admin)``: whether a request carries the admin token; a route dependency refusing one
    that does not (401), or without a token on the server, a POST that is not JSON (415)."""
    from fastapi import Request

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

    return authorized, admin


def _adapter_routes(app, api: Api, authorized, admin) -> None:
    """List, load and unload adapters; loading and unloading are for admins."""
    from fastapi import Depends, Request
    from pydantic import BaseModel, ConfigDict

    class LoadAdapter(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str
        path: str
        task: str | None = None

    engine = api.engine

    @app.get("/v1/adapters")
    async def list_adapters(request: Request):
        paths = authorized(request)  # file paths only with the admin token
        return {"model": engine.model_name, "adapters": [a.public(paths) for a in list(engine.adapters.values())]}

    @app.post("/v1/adapters", status_code=201, dependencies=[Depends(admin)])
    async def add(request: Request):
        body = await _parse(request, LoadAdapter)
        info = await api.load(body.name, body.path, body.task)
        return info.public(with_path=True)

    @app.delete("/v1/adapters/{name}", dependencies=[Depends(admin)])
    async def remove(name: str, request: Request):
        await api.call(engine.unload, name)
        return {"deleted": name}


def _vllm_adapter_routes(app, api: Api, admin) -> None:
    """vLLM's two adapter routes, for admins: their request shapes, their plain-text answers; errors in OpenAI's
    shape (a name already taken stays a 409, where vLLM answers 400)."""
    from fastapi import Depends, Request
    from fastapi.responses import PlainTextResponse
    from pydantic import BaseModel, ConfigDict

    class LoadLoRA(BaseModel):
        model_config = ConfigDict(extra="forbid")
        lora_name: str
        lora_path: str
        load_inplace: bool = False

    class UnloadLoRA(BaseModel):
        model_config = ConfigDict(extra="forbid")
        lora_name: str
        lora_int_id: int | None = None  # (vLLM's own number of an adapter: the name suffices)

    @app.post("/v1/load_lora_adapter", dependencies=[Depends(admin)])
    async def load_lora(request: Request):
        body = await _parse(request, LoadLoRA)
        if body.load_inplace:
            raise ClientError(400, "load_inplace is not supported: unload the adapter first (/v1/unload_lora_adapter)")
        await api.load(body.lora_name, body.lora_path, None)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(admin)])
    async def unload_lora(request: Request):
        body = await _parse(request, UnloadLoRA)
        await api.call(api.engine.unload, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def uvicorn_options(config: ServeConfig) -> dict[str, Any]:
    """Connection limits and timeouts for ``uvicorn.run`` / ``uvicorn.Config``."""
    return {"http": _header_timeout_protocol(config.header_timeout_s), "limit_concurrency": config.max_connections,
            "timeout_keep_alive": config.keep_alive_s}
