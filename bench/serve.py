"""Load test of ``lorakit serve`` on loopback: latency and rows/s as clients and adapters grow.

Two servers run as separate processes on the same base model (embedded MiniLM) with
``ADAPTERS`` r=8 query/value adapters (random factors, each with its own head): one
with cross-request batching (the default), one with ``--no-batching`` (one request per
forward pass). ``C`` concurrent clients (asyncio + httpx, in this process) each send
one request after another, ``rows`` MRPC dev sentence pairs per request, for
``seconds``. Cases, alternated in each round for every C:

- ``one``: every request names adapter a0 (batching server);
- ``spread``: request i names adapter a{i mod ADAPTERS} (batching server);
- ``spread_nobatch``: as ``spread``, against the server without batching.

Reported per case: rows/s, p50/p99 latency, failed requests (the target is 0); per C the
ratios spread/one and spread/spread_nobatch (medians over rounds of per-round ratios).

    python bench/serve.py [--quick] [--rounds 3] [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import lorakit
from lorakit import data
from lorakit.benchtools import write_record
from lorakit.tasks.glue import load_classifier

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"


def make_adapters(model: str, n: int, folder: Path) -> dict[str, str]:
    """``n`` MRPC-style adapters a0..a{n-1} with random factors and heads, saved in ``folder``."""
    _, base = load_classifier(model, data.get_task("mrpc"))
    config = lorakit.LoraConfig(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    return save_random_adapters(base, config, n, folder, {"task": "mrpc", "model": model})


def save_random_adapters(base, config, n: int, folder: Path, info: dict) -> dict[str, str]:
    """``n`` adapters a0..a{n-1} of ``config`` on ``base`` with random factors (seeded), each
    saved in ``folder`` with ``info`` as its task.json; name -> folder."""
    g = torch.Generator().manual_seed(0)
    paths = {}
    for i in range(n):
        lorakit.add_lora(base, config, adapter=f"a{i}")
        with torch.no_grad():
            for _, p in lorakit.lora_parameters(base, f"a{i}"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        paths[f"a{i}"] = str(lorakit.save_adapter(base, folder / f"a{i}", f"a{i}"))
        (folder / f"a{i}" / "task.json").write_text(json.dumps(info))
    return paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_processes(runs: list[tuple[list[str], str]], what: str, timeout: float = 300, env: dict | None = None):
    """Run each ``(cmd, health_url)`` of ``runs`` (in ``env``, default this process's) until the block ends, after
    every ``health_url`` answers 200 (else the log's end of the one that exited). All are started at once: their
    start-ups (never timed) overlap on the machine's cores instead of following one another."""
    import httpx

    logs = [tempfile.TemporaryFile("w+") for _ in runs]  # not pipes: nobody reads them while the servers run
    procs = []
    try:
        for (cmd, _), log in zip(runs, logs):
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env))
        deadline = time.time() + timeout
        for (_, health_url), proc, log in zip(runs, procs, logs):
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"{what} exited: {log.read()[-2000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(health_url, timeout=1).status_code == 200:
                        break
                if time.time() > deadline:
                    raise RuntimeError(f"{what} did not start in {timeout:.0f} s")
                time.sleep(0.2)
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        for log in logs:
            log.close()


@contextlib.contextmanager
def running_process(cmd: list[str], health_url: str, what: str, timeout: float = 300, env: dict | None = None):
    """Run ``cmd`` (in ``env``, default this process's) until the block ends, after ``health_url``
    answers 200 (else the log's end)."""
    with running_processes([(cmd, health_url)], what, timeout, env):
        yield


@contextlib.contextmanager
def servers(model: str, adapters: dict[str, str], *flag_sets: tuple[str, ...]):
    """A ``lorakit serve`` process on loopback per entry of ``flag_sets``, started together; yields their base URLs."""
    runs, urls = [], []
    for flags in flag_sets:
        port = _free_port()
        cmd = [sys.executable, "-m", "lorakit", "serve", "--model", model, "--port", str(port), *flags]
        for name, path in adapters.items():
            cmd += ["--adapter", f"{name}={path}"]
        urls.append(f"http://127.0.0.1:{port}")
        runs.append((cmd, f"{urls[-1]}/healthz"))
    with running_processes(runs, "server"):
        yield urls


@contextlib.contextmanager
def server(model: str, adapters: dict[str, str], *flags: str):
    """A ``lorakit serve`` process on loopback; yields its base URL."""
    with servers(model, adapters, flags) as (url,):
        yield url


async def load(url: str, clients: int, seconds: float, pairs: list[list[str]], rows: int,
               adapter_of) -> dict[str, float]:
    """``clients`` loops sending requests for ``seconds``; rows/s, latency percentiles, failures."""
    import httpx

    latencies: list[float] = []
    failed = 0
    counter = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        end = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal failed, counter
            while time.perf_counter() < end:
                i = counter
                counter += 1
                body = {"adapter": adapter_of(i), "inputs": [pairs[(i * rows + j) % len(pairs)] for j in range(rows)]}
                start = time.perf_counter()
                try:
                    reply = await client.post("/v1/classify", json=body)
                    ok = reply.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    failed += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    pick = (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]) if latencies else (lambda q: float("nan"))
    return {"rows_per_s": len(latencies) * rows / elapsed, "requests": len(latencies), "failed": failed,
            "p50_ms": 1000 * pick(0.50), "p99_ms": 1000 * pick(0.99)}


def run(model: str = "minilm", adapters: int = 32, concurrency: tuple[int, ...] = (1, 8, 32), rows: int = 1,
        seconds: float = 8.0, rounds: int = 3, precision: str = "fp32", name: str = "serve",
        out_dir: str = "bench/results") -> dict:
    pairs = [list(e.texts) for e in data.read_split(data.get_task("mrpc"), "dev", GLUE)]
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(model, adapters, Path(tmp))
        flags = ("--precision", precision)
        with servers(model, paths, flags, (*flags, "--no-batching")) as (batched, unbatched):
            cases = {"one": (batched, lambda i: "a0"),
                     "spread": (batched, lambda i: f"a{i % adapters}"),
                     "spread_nobatch": (unbatched, lambda i: f"a{i % adapters}")}
            samples: dict[int, dict[str, list[dict]]] = {c: {k: [] for k in cases} for c in concurrency}
            for c in concurrency:  # warm-up: first forwards of each shape are slow
                for url, adapter_of in cases.values():
                    asyncio.run(load(url, c, min(1.0, seconds), pairs, rows, adapter_of))
            for r in range(rounds):
                for c in concurrency:
                    names = list(cases)
                    for case in names[r % len(names):] + names[: r % len(names)]:
                        url, adapter_of = cases[case]
                        samples[c][case].append(asyncio.run(load(url, c, seconds, pairs, rows, adapter_of)))
    results = {}
    for c in concurrency:
        s = samples[c]
        per_case = {case: {"rows_per_s": statistics.median(x["rows_per_s"] for x in runs),
                           "p50_ms": statistics.median(x["p50_ms"] for x in runs),
                           "p99_ms": statistics.median(x["p99_ms"] for x in runs),
                           "failed": sum(x["failed"] for x in runs), "rounds": runs}
                    for case, runs in s.items()}
        ratio = lambda a, b: statistics.median(x["rows_per_s"] / y["rows_per_s"] for x, y in zip(s[a], s[b]))  # noqa: E731
        results[f"clients_{c}"] = {"cases": per_case, "ratios": {"spread/one": ratio("spread", "one"),
                                                                 "spread/spread_nobatch": ratio("spread", "spread_nobatch")}}
        print(f"{c} clients: " + ", ".join(f"{k} {v['rows_per_s']:.0f} rows/s p50 {v['p50_ms']:.0f} ms "
                                            f"p99 {v['p99_ms']:.0f} ms failed {v['failed']}" for k, v in per_case.items()),
              {k: round(v, 3) for k, v in results[f"clients_{c}"]["ratios"].items()}, flush=True)
    config = dict(model=model, adapters=adapters, concurrency=list(concurrency), rows_per_request=rows, seconds=seconds,
                  rounds=rounds, precision=precision, r=8, server_threads=os.environ.get("OMP_NUM_THREADS"))
    write_record(name, config, results, out_dir)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 adapters, 1 and 8 clients, 1 round of 2 s")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rows", type=int, default=1, help="sentence pairs per request (default: 1)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args(argv)
    suffix = "" if args.precision == "fp32" else f"_{args.precision}"
    if args.quick:
        run(adapters=8, concurrency=(1, 8), seconds=2, rounds=1, rows=args.rows, precision=args.precision,
            name="serve_quick" + suffix)
    else:
        run(rounds=args.rounds, seconds=args.seconds, rows=args.rows, precision=args.precision, name="serve" + suffix)


if __name__ == "__main__":
    sys.exit(main())
