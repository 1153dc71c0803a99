"""Prefix caching in ``lorakit serve`` (issue #29, item 3): a shared system prompt prefilled once, not per request.

Two servers run as separate processes on SmolLM2-135M with the same ``A`` adapters (r=4 q/v, random factors; A = 1
and 32): one with the prefix cache (the default ``--prefix-cache-tokens``), one without (``--prefix-cache-tokens
0``). ``C`` closed-loop clients (asyncio + httpx, in this process; 32 by default) stream ``/v1/completions`` one
request after another for ``seconds``; client i names adapter a{i mod A}. Each prompt is SmolLM2's chat template
over a shared system prompt of about 300 tokens (``SYSTEM``) and a short user turn, an E2E dev MR (about 30
tokens); ``max_tokens`` new tokens, greedy, ``ignore_eos``. The cases (on, off) alternate within each round, rounds
rotate the order; the on server keeps its cache across rounds (the steady state of a server whose clients share a
system prompt).

Reported per A and case: tokens/s, time to first token p50/p99 (ms), per-token p50/p99, the on server's prefix-cache
hit rate (``/metrics``: hit tokens / prompt tokens looked up, within the measured rounds); ratios (medians over
rounds of per-round ratios): ``ttft_p50 off/on`` (target >= 3) and ``tokens/s on/off`` (target >= 1.5). Checked
first: the greedy completions of ``check`` prompts on both servers (each sent twice to the on server, the second
read from the cache), the number identical recorded.

    python bench/prefix_cache.py [--quick] [--seconds 20] [--rounds 3] [--clients 32] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
import torch

from llama_build import KEY_FLAGS
from lorakit.benchtools import write_record
from lorakit.models import resolve_model
from lorakit.precision import cpu_flags
from lorakit.tasks.lm import read_e2e
from serve import servers
from serve_gen import DATA, load, make_adapters

# About 300 tokens with SmolLM2's tokenizer (the record holds the exact count).
SYSTEM = (
    "You are the assistant of a city restaurant guide. Each user message describes one venue as a meaning "
    "representation: a list of attributes separated by commas, each a name with its value in square brackets. "
    "The attributes are name, eatType (restaurant, pub or coffee shop), food (the cuisine), priceRange (cheap, "
    "moderate, high, less than 20 pounds, 20 to 25 pounds or more than 30 pounds), customer rating (low, average, "
    "high, or a score out of 5), area (city centre or riverside), familyFriendly (yes or no) and near (another venue "
    "close by). Write one or two fluent English sentences that a guide book could print, and mention every attribute "
    "given, each exactly once. Never add an attribute that the message does not give, never guess a price, a rating "
    "or a location, and never recommend or criticise the venue beyond what its rating says. If a value is unusual, "
    "such as a rating of 1 out of 5 or a family-unfriendly coffee shop, state it plainly and politely. When the "
    "venue is near another one, name that venue too, so that a reader can find it. Do not greet the user, do not "
    "explain what you are doing, and do not ask questions: "
    "the answer is printed as it is, beside the venue's address, in the next edition of the guide.")


def prompts_of(model: str, system: str = SYSTEM) -> tuple[list[str], int]:
    """The chat-template prompts (``system`` + one E2E dev MR each, distinct) and the system part's token count."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    mrs = list(dict.fromkeys(mr for mr, _ in read_e2e("dev", DATA)))[:200]
    prompts = [tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": mr}],
                                             tokenize=False, add_generation_prompt=True) for mr in mrs]
    shared = tokenizer.apply_chat_template([{"role": "system", "content": system}], tokenize=False)
    return prompts, len(tokenizer(shared)["input_ids"])


def prefix_counts(url: str) -> tuple[float, float]:
    """The server's ``lorakit:prefix_cache_hits_total`` and ``lorakit:prefix_cache_queries_total``."""
    lines = httpx.get(f"{url}/metrics", timeout=30).text.splitlines()
    value = {line.split()[0]: float(line.split()[-1]) for line in lines if line and not line.startswith("#")}
    return value.get("lorakit:prefix_cache_hits_total", 0.0), value.get("lorakit:prefix_cache_queries_total", 0.0)


def same_completions(on: str, off: str, prompts: list[str], adapters: int, max_tokens: int) -> int:
    """How many of ``prompts`` (prompt i on adapter a{i mod adapters}) get the same greedy text from both servers, the
    on server's second answer read from its cache."""
    def text(url: str, i: int, prompt: str) -> str:
        body = {"model": f"a{i % adapters}", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
        r.raise_for_status()
        return r.json()["choices"][0]["text"]

    same = 0
    for i, prompt in enumerate(prompts):
        first, cached, plain = text(on, i, prompt), text(on, i, prompt), text(off, i, prompt)
        same += first == cached == plain
    return same


def run(model: str = "smollm2", adapter_counts: tuple[int, ...] = (1, 32), clients: int = 32, seconds: float = 20.0,
        rounds: int = 3, max_tokens: int = 32, precision: str = "auto", check: int = 8, system: str = SYSTEM,
        name: str = "prefix_cache", out_dir: str = "bench/results") -> dict:
    try:
        resolve_model(model)
    except ValueError as e:
        print(f"skipped: {e} (lorakit models install {model})")
        return {}
    prompts, system_tokens = prompts_of(model, system)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        paths = make_adapters(model, max(adapter_counts), Path(tmp))
        flags = ("--precision", precision, "--max-batch-rows", str(clients), "--max-new-tokens", str(max_tokens))
        cases = dict(zip(("on", "off"), stack.enter_context(servers(model, paths, flags,
                                                                    (*flags, "--prefix-cache-tokens", "0")))))
        identical = same_completions(cases["on"], cases["off"], prompts[:check], max(adapter_counts), max_tokens)
        print(f"greedy completions identical with and without the prefix cache: {identical}/{check}", flush=True)
        for url in cases.values():  # warm-up, 3 s (no longer than a measured load: the tests' 1 s)
            asyncio.run(load(url, 4, min(3.0, seconds), prompts, lambda i: {"model": "a0"}, max_tokens))
        samples: dict[int, dict[str, list[dict]]] = {a: {k: [] for k in cases} for a in adapter_counts}
        counts = {a: [0.0, 0.0] for a in adapter_counts}  # prefix-cache hits and queries in the measured rounds
        for r in range(rounds):
            for a in adapter_counts:
                for case in (["on", "off"] if r % 2 == 0 else ["off", "on"]):
                    before = prefix_counts(cases["on"])
                    fields = lambda i, a=a: {"model": f"a{i % a}"}  # noqa: E731
                    out = asyncio.run(load(cases[case], clients, seconds, prompts, fields, max_tokens))
                    samples[a][case].append(out)
                    if case == "on":
                        after = prefix_counts(cases["on"])
                        counts[a] = [counts[a][0] + after[0] - before[0], counts[a][1] + after[1] - before[1]]
                    print(f"round {r} adapters={a} {case}: {out}", flush=True)
    for a in adapter_counts:
        s = samples[a]
        per_case = {case: {**{k: statistics.median(x[k] for x in runs) for k in runs[0] if k not in ("failed", "resent")},
                           "failed": sum(x["failed"] for x in runs), "rounds": runs} for case, runs in s.items()}
        ratios = {"ttft_p50 off/on": statistics.median(y["ttft_p50_ms"] / x["ttft_p50_ms"] for x, y in zip(s["on"], s["off"])),
                  "tokens/s on/off": statistics.median(x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(s["on"], s["off"]))}
        hits, queries = counts[a]
        results[f"adapters_{a}"] = {"cases": per_case, "ratios": ratios, "hit_rate": hits / queries if queries else 0.0}
        print(f"{a} adapter(s), {clients} clients: " + "; ".join(
            f"{k} {v['tokens_per_s']:.0f} tok/s, TTFT p50 {v['ttft_p50_ms']:.0f} p99 {v['ttft_p99_ms']:.0f} ms, per token "
            f"p50 {v['per_token_p50_ms']:.1f} ms, failed {v['failed']}" for k, v in per_case.items())
            + f"; hit rate {results[f'adapters_{a}']['hit_rate']:.3f}; " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()),
            flush=True)
    results["identical_completions"] = identical
    config = dict(model=model, adapters=list(adapter_counts), clients=clients, seconds=seconds, rounds=rounds,
                  max_tokens=max_tokens, precision=precision, r=4, system_tokens=system_tokens, check=check,
                  threads=torch.get_num_threads(), cpu_flags=sorted(KEY_FLAGS & cpu_flags()))
    write_record(name, config, results, out_dir)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 clients, 1 and 8 adapters, 1 round of 5 s, 16 tokens")
    parser.add_argument("--seconds", type=float, default=20.0, help="per case and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--name", default="prefix_cache", help="record name (bench/results/NAME.json)")
    args = parser.parse_args(argv)
    if args.quick:
        run(adapter_counts=(1, 8), clients=8, seconds=5, rounds=1, max_tokens=16, precision=args.precision, check=2,
            name="prefix_cache_quick")
    else:
        run(clients=args.clients, seconds=args.seconds, rounds=args.rounds, max_tokens=args.max_tokens,
            precision=args.precision, name=args.name)


if __name__ == "__main__":
    sys.exit(main())
