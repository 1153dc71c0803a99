"""The limits of ``lorakit serve`` (its ``--help``) and the error every part of the server raises."""

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ServeConfig", "ClientError", "CHARS_PER_TOKEN"]

CHARS_PER_TOKEN = 32  # no tokenizer makes fewer tokens than characters / 32 of ordinary text: longer text is
# refused before tokenizing


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
    prefix_cache_tokens: int = _opt(16384, "generation: prompt tokens whose keys and values are kept for later prompts "
                                           "that begin the same way on the same adapter (least recently used "
                                           "dropped first; blocks of 16 tokens; SmolLM2-135M fp32: 45 KB a token); 0 turns it "
                                           "off")
    verify_adapters: str = _opt("strict", "check each adapter's receipt (receipt.safetensors) through this server's own "
                                          "engine at start-up and on load: strict refuses an adapter that does not "
                                          "reproduce, warn serves it with a warning, off reads no receipt; an adapter "
                                          "without a receipt is served as unverified in every mode")
    verify_tolerance: str | None = _opt(None, "the receipt check's tolerance in place of the documented one for the "
                                              "precision in use, as lorakit verify's --tolerance (top1=0.99,kl=1e-3)")
    token: str | None = _opt(None, "bearer token of the admin routes (default: $LORAKIT_TOKEN; none: open on loopback)")

    def __post_init__(self) -> None:
        for name in ("max_batch_rows", "max_queue", "max_rows_per_request", "max_length", "max_body_bytes",
                     "max_batch_tokens", "max_new_tokens", "prefill_chunk", "max_connections"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not _is_int(self.prefix_cache_tokens) or self.prefix_cache_tokens < 0:
            raise ValueError(f"prefix_cache_tokens must be 0 (off) or a positive integer, got {self.prefix_cache_tokens!r}")
        if self.engine not in ("auto", "decoder", "model"):
            raise ValueError(f"engine must be auto, decoder or model, got {self.engine!r}")
        if self.verify_adapters not in ("strict", "warn", "off"):
            raise ValueError(f"verify_adapters must be strict, warn or off, got {self.verify_adapters!r}")
        if self.verify_tolerance is not None:
            from ..receipt import override

            override(self.verify_tolerance, "fp32")  # (a ValueError for what it cannot read, before loading anything)
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be 0 or more, got {self.max_wait_ms!r}")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ClientError(Exception):
    """A request the server refuses: becomes an HTTP ``status`` with ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

