"""Prompts as token ids and back: OpenAI's chat messages through the model's chat template, and
vLLM's two tokenizer routes (their request and response shapes):

    POST /tokenize     {"model": "e2e", "prompt": "..."}  or  {"messages": [{"role": "user", "content": "..."}]}
                       -> {"count": 7, "max_model_len": 1024, "tokens": [...], "token_strs": null}
    POST /detokenize   {"model": "e2e", "tokens": [101, 2023]}  -> {"prompt": "..."}

``model`` (optional) must name the base model or a loaded adapter: they share the base's tokenizer.
"""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations.
import asyncio
import functools
from typing import Literal

from .config import ClientError

__all__ = ["message_schema", "message_text", "chat_ids", "add_tokenizer_routes"]


@functools.cache
def message_schema():
    """The pydantic model of one chat message (OpenAI's shape, text parts only)."""
    from pydantic import BaseModel, ConfigDict

    class Part(BaseModel):
        type: Literal["text"]
        text: str

    class Message(BaseModel):
        model_config = ConfigDict(extra="forbid")
        role: Literal["system", "user", "assistant", "developer"]
        content: str | list[Part]
        name: str | None = None

    return Message


def message_text(message) -> str:
    """A chat message's content as one string (its text parts joined)."""
    return message.content if isinstance(message.content, str) else "".join(p.text for p in message.content)


def chat_ids(tokenizer, model_name: str, messages: list, *, add_generation_prompt: bool = True,
             continue_final_message: bool = False, add_special_tokens: bool = False) -> list[int]:
    """``messages`` through the tokenizer's chat template, as token ids (the template adds the special tokens
    it wants; ``add_special_tokens`` adds the tokenizer's on top)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ClientError(400, f"{model_name!r} has no chat template; send a prompt (/v1/completions), not messages")
    # "developer" is OpenAI's newer name of the system role, which chat templates know
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": message_text(m)} for m in messages]
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         continue_final_message=continue_final_message)
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def _schemas():
    from pydantic import BaseModel, ConfigDict

    class Tokenize(BaseModel):
        model_config = ConfigDict(extra="forbid")
        model: str | None = None
        prompt: str | None = None
        messages: list[message_schema()] | None = None
        add_special_tokens: bool | None = None  # default: True for a prompt; False for messages (the template's own)
        add_generation_prompt: bool = True
        continue_final_message: bool = False
        return_token_strs: bool = False

    class Detokenize(BaseModel):
        model_config = ConfigDict(extra="forbid")
        model: str | None = None
        tokens: list[int]

    return Tokenize, Detokenize


def add_tokenizer_routes(app, engine, parse) -> None:
    """``/tokenize`` and ``/detokenize`` on ``app`` for ``engine`` (a :class:`GenerationEngine`)."""
    from fastapi import Request

    Tokenize, Detokenize = _schemas()
    tokenizer = engine.tokenizer

    def encode(body) -> list[int]:
        if body.messages is None:
            return tokenizer(body.prompt, add_special_tokens=body.add_special_tokens is not False)["input_ids"]
        return chat_ids(tokenizer, engine.model_name, body.messages, add_generation_prompt=body.add_generation_prompt,
                        continue_final_message=body.continue_final_message, add_special_tokens=bool(body.add_special_tokens))

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await parse(request, Tokenize)
        if body.model is not None:
            engine.resolve(body.model)  # (404 if it names neither the base nor an adapter)
        if (body.prompt is None) == (body.messages is None):
            raise ClientError(400, "give either 'prompt' or 'messages'")
        if body.messages is not None and body.add_generation_prompt and body.continue_final_message:
            raise ClientError(400, "continue_final_message and add_generation_prompt cannot both be true")
        ids = await asyncio.to_thread(encode, body)
        strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.scheduler.max_length, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await parse(request, Detokenize)
        if body.model is not None:
            engine.resolve(body.model)
        vocabulary = len(tokenizer)
        bad = next((i for i, t in enumerate(body.tokens) if not 0 <= t < vocabulary), None)
        if bad is not None:
            raise ClientError(400, f"tokens[{bad}] is {body.tokens[bad]}, not a token id of this model's tokenizer "
                                   f"(0 to {vocabulary - 1})")
        return {"prompt": await asyncio.to_thread(tokenizer.decode, body.tokens)}
