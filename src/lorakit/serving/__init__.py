"""Serving: ``lorakit serve`` and its engines. Imports point down this list only:

    server.py          lorakit serve: picks the engine for the base, mounts its API on the shell, runs uvicorn
    openai.py          OpenAI's routes (completions, chat, models) over the generation engine
    openai_requests.py their request bodies and the sampling they ask for (400s naming the field)
    classify_api.py    /v1/classify: request batching over the classification engine
    http.py            the HTTP shell both APIs share: limits, timeouts, auth, error shapes, adapter routes
                       (lorakit's and vLLM's), /healthz, /health, /metrics
    tokens.py          chat messages to token ids; vLLM's /tokenize and /detokenize
    generation.py      the generation engine: a causal LM, its adapters, its scheduler
    scheduler.py       continuous batching: sequences of many adapters advanced together, a token per step
    sampling.py        how each next token is drawn from a row of logits
    prefix_cache.py    keys and values of prompt prefixes, reused by later prompts on the same adapter
    model_decoder.py   a decode step through the model's own transformers modules (every served family)
    decoder.py         lorakit's lean decode step (Llama-style, GPT-2) and the row KV cache
    classify.py        the classification engine: a base classifier, adapters with their heads
    metrics.py         Prometheus' text format; what both APIs count
    adapters.py        the checks of an adapter folder both engines load
    config.py          ServeConfig (the limits) and ClientError
"""

from .model_decoder import ModelDecoder

__all__ = ["ModelDecoder"]
