"""``lorakit serve``: the engine the base model needs, its API on the HTTP shell, run by uvicorn.

A classifier base gets the classification engine and ``/v1/classify``
(:mod:`lorakit.serving.classify_api`); a causal LM the generation engine and OpenAI's routes
(:mod:`lorakit.serving.openai`), its scheduler on the main thread and HTTP on another one.
"""

import contextlib
import threading

from ..models import resolve_model
from .adapters import base_of
from .classify import Engine
from .classify_api import ClassifyApi
from .config import ServeConfig
from .generation import GenerationEngine
from .http import build_app, uvicorn_options
from .openai import OpenAIApi

__all__ = ["create_app", "serve"]

SHUTDOWN_GRACE_S = 3.0  # how long open connections may take to close once generation has stopped


def create_app(engine: Engine | GenerationEngine, config: ServeConfig | None = None,
               adapters: dict[str, str] | None = None, task: str | None = None):
    """The app serving ``engine``: OpenAI's routes for a :class:`GenerationEngine`, ``/v1/classify`` for a
    classification :class:`Engine`; ``adapters`` (name -> folder) are loaded at start-up, as of ``task`` when
    given (in place of their task.json's: a PEFT SEQ_CLS adapter has none)."""
    config = config or ServeConfig()
    api = OpenAIApi(engine, config) if isinstance(engine, GenerationEngine) else ClassifyApi(engine, config)
    return build_app(api, config, adapters, task)


def serve(model: str | None, adapters: dict[str, str], config: ServeConfig, host: str, port: int,
          precision: str = "auto", quantize: str | None = None, task: str | None = None) -> None:
    """Load the model and adapters and serve until interrupted."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and not config.token:
        raise ValueError(f"--host {host} would open the admin routes (loading any folder) to the network; "
                         "set a token with $LORAKIT_TOKEN or --token")
    model = model or base_of(next(iter(adapters.values()), None))
    engine = _engine(model, config, precision, quantize)
    app = create_app(engine, config, adapters, task)
    print(f"lorakit serve: {model} ({engine.precision}) with adapters {sorted(adapters) or 'none'} "
          f"on http://{host}:{port}", flush=True)
    options = dict(**uvicorn_options(config), host=host, port=port, log_level="warning")
    if isinstance(engine, Engine):
        uvicorn.run(app, **options)
    else:
        _serve_generation(engine, uvicorn.Server(uvicorn.Config(app, **options)))


def _serve_generation(engine: GenerationEngine, server) -> None:
    """The scheduler on the main thread (see :meth:`Scheduler.run`), uvicorn's ``server`` on another one."""
    engine.main_thread = True
    compiled = " (a single stream's decode step compiled)" if getattr(engine.scheduler.decoder, "compiled", False) else ""
    print(f"lorakit serve: decoding with the {engine.scheduler.engine} engine{compiled}", flush=True)
    engine.prepare()  # here, not on the HTTP thread: torch ops run there once slowed this one (int8: 43 vs 21 ms/token)
    if engine.quantized:
        print(f"lorakit serve: {engine.quantized}", flush=True)

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


def _engine(model: str, config: ServeConfig, precision: str, quantize: str | None = None) -> Engine | GenerationEngine:
    """A :class:`GenerationEngine` for a causal LM, else a classification :class:`Engine`."""
    from transformers import AutoConfig

    architectures = AutoConfig.from_pretrained(resolve_model(model)).architectures or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return GenerationEngine(model, config, precision, quantize)
    if quantize:
        raise ValueError("--quantize applies to causal LMs (generation) only")
    return Engine(model, precision, config)
