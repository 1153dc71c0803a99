"""Design comparison of issue #33: today's lean ``Decoder`` vs ``serving.ModelDecoder`` (the
model's own transformers modules with lorakit's row-cache attention), decoding speed.

SmolLM2-135M-Instruct (``--quick``: a tiny random Llama), 8 random r=4 alpha 32 q/v adapters,
``R`` rows (1, 8, 32) of E2E dev MRs in the plain format, row ``i`` through adapter
``a{i mod 8}`` (``lorakit.adapter_per_row``, as ``lorakit serve``). Each engine prefills the
rows into its own row cache once; one timed call then decodes ``--steps`` greedy tokens on
every row from that state (the same positions are rewritten each call, so every call does the
same work). Before timing, both engines' prefill logits must be close and their greedy tokens
over the decoded steps equal (else BenchmarkMismatch). Cases per R, alternated in each round
(``benchtools.interleave``): ``decoder``, ``model``. Dtypes: fp32; int8 (q8_0 weights) and q4_1 (q4_1
weights, the LM head q8_0 as GGUF files keep it) under fp32 activations (``lorakit.quant.linear.quantize_linears``:
#27's kernels, every CPU); bf16 only where the CPU has native bf16. The load average when each R starts and ends
is recorded (the machine may be shared).

Reported: tokens/s per case (R x steps / median call time), ``model / decoder`` time ratio
(median over rounds of the per-round ratio) per R and dtype, CPU flags.
``--profile``: one single-stream decode step of each engine under torch.profiler, the top
operators by self CPU time, written beside the record. ``--compile``: a third case, ``model compiled``
(``ModelDecoder(model, compile=True)``, compiled during the untimed prefill and checks), whose greedy tokens must
equal ``model``'s; reported as ``compiled_over_model_time``. ``--threads``: torch's intra-op threads.

    OMP_NUM_THREADS=2 python bench/engine_design.py [--quick] [--repeats 7] [--steps 8] [--profile] [--dtypes ...]
        [--compile] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

import lorakit
from lorakit.benchtools import BenchmarkMismatch, check_close, interleave, median_ratio, summarize, write_record
from lorakit.precision import native_bf16
from lorakit.serving import ModelDecoder
from lorakit.serving.decoder import Decoder
from lorakit.tasks.lm import load_causal_lm, prompt_ids, read_e2e

sys.path.insert(0, str(Path(__file__).parent))
from lm_step import hardware, model_folder  # noqa: E402

ENGINES = {"decoder": Decoder, "model": ModelDecoder}
ADAPTERS = 8
ROWS = (1, 8, 32)
DTYPES = ("fp32", "int8", "q4_1", "bf16")


def build(folder: str, dtype: str):
    """The model with ``ADAPTERS`` random q/v adapters, in ``dtype`` (fp32, bf16, int8 = fp32 + q8_0 weights,
    q4_1 = fp32 + q4_1 weights and a q8_0 LM head)."""
    tokenizer, model = load_causal_lm(folder)
    g = torch.Generator().manual_seed(0)
    for i in range(ADAPTERS):
        lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=32, target_modules=["q_proj", "v_proj"]), f"a{i}")
        with torch.no_grad():
            for _, p in lorakit.lora_parameters(model, f"a{i}"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    if dtype == "bf16":
        model.to(torch.bfloat16)
    if dtype in ("int8", "q4_1"):
        from lorakit.quant.linear import quantize_linears

        quantize_linears(model, "q8_0" if dtype == "int8" else "q4_1", "q8_0")  # (the LM head q8_0 under q4_1)
    return tokenizer, model.eval()


class Stream:
    """``rows`` sequences prefilled in one engine's cache; :meth:`decode` runs ``steps`` greedy steps from there."""

    def __init__(self, engine, model, prompts: list[list[int]]) -> None:
        self.engine, self.model = engine, model
        self.adapters = [f"a{i % ADAPTERS}" for i in range(len(prompts))]
        B, T = len(prompts), max(map(len, prompts))
        self.cache = engine.cache(B, 512)
        ids = torch.zeros(B, T, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        self.lengths = torch.tensor([len(p) for p in prompts])
        with lorakit.adapter_per_row(model, self.adapters):
            self.first = engine.forward(ids, self.cache, slice(0, B), torch.zeros(B, dtype=torch.long), self.lengths - 1)

    def decode(self, steps: int) -> list[list[int]]:
        tokens, out = self.first.argmax(-1), []
        B = len(tokens)
        for k in range(steps):
            out.append(tokens.tolist())
            with lorakit.adapter_per_row(self.model, self.adapters):  # per step, as the Scheduler does
                logits = self.engine.forward(tokens[:, None], self.cache, slice(0, B), self.lengths + k)
            tokens = logits.argmax(-1)
        return out


def compare(folder: str, dtype: str, prompts: list[list[int]], repeats: int, steps: int, compile: bool = False) -> dict:
    _, model = build(folder, dtype)
    engines = {name: make(model) for name, make in ENGINES.items()}
    if compile:
        engines["model compiled"] = ModelDecoder(model, compile=True)
    results = {}
    for rows in ROWS:
        batch = (prompts * rows)[:rows]
        streams = {name: Stream(e, model, batch) for name, e in engines.items()}
        exact = dtype != "bf16"  # float32 activations (bf16 sums in other orders)
        tol = dict(rtol=1e-4, atol=1e-3) if exact else dict(rtol=0.05, atol=0.1)
        check_close(streams["model"].first, streams["decoder"].first, f"{dtype} R={rows} prefill logits", **tol)
        tokens = {name: s.decode(steps) for name, s in streams.items()}
        agree = sum(a == b for x, y in zip(tokens["model"], tokens["decoder"]) for a, b in zip(x, y)) / (rows * steps)
        if exact and agree < 1:
            raise BenchmarkMismatch(f"{dtype} R={rows}: the engines' greedy tokens differ; refusing to report timings")
        if compile and tokens["model compiled"] != tokens["model"]:
            raise BenchmarkMismatch(f"{dtype} R={rows}: compiled greedy tokens differ from uncompiled ones")
        load = os.getloadavg()[0]
        samples = interleave({name: (lambda s=s: s.decode(steps)) for name, s in streams.items()}, repeats=repeats)
        results[str(rows)] = {
            "token_agreement": agree, "load_average": [load, os.getloadavg()[0]],
            "tokens_per_s": {n: rows * steps / v["median_s"] for n, v in summarize(samples).items()},
            "model_over_decoder_time": median_ratio(samples, "model", "decoder"),
            "samples_s": samples,
        }
        if compile:
            results[str(rows)]["compiled_over_model_time"] = median_ratio(samples, "model compiled", "model")
        print(f"{dtype:5} R={rows:2}: decoder {results[str(rows)]['tokens_per_s']['decoder']:7.1f} tok/s, "
              f"model {results[str(rows)]['tokens_per_s']['model']:7.1f} tok/s, "
              f"time ratio model/decoder {results[str(rows)]['model_over_decoder_time']:.3f}, agreement {agree:.3f}"
              + (f", compiled {results[str(rows)]['tokens_per_s']['model compiled']:7.1f} tok/s, compiled/model "
                 f"{results[str(rows)]['compiled_over_model_time']:.3f}" if compile else ""), flush=True)
    return results


def profile(folder: str, dtype: str, prompt: list[int], steps: int = 8) -> dict:
    """Where a single-stream decode step goes, per engine: wall time per step (perf_counter),
    torch operators' self time (torch.profiler: matrix products, attention, the rest), the
    remainder outside operators (Python, module calls, dispatch), and the Python functions
    with the most own time (cProfile, which inflates Python time: read it as shares)."""
    import cProfile
    import io
    import pstats
    import time

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    _, model = build(folder, dtype)
    out = {}
    for name, make in ENGINES.items():
        stream = Stream(make(model), model, [prompt])
        stream.decode(2)  # warm
        walls = []
        for _ in range(3):
            start = time.perf_counter()
            stream.decode(steps)
            walls.append((time.perf_counter() - start) / steps * 1e3)
        wall = min(walls)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            stream.decode(steps)
            profiled = (time.perf_counter() - start) / steps * 1e3
        ops = {e.key: e.self_cpu_time_total / steps / 1e3 for e in prof.key_averages()}
        # (a single row's adapter is two small aten::mm, counted here; mixed rows' are bmm / baddbmm)
        matmul = sum(v for k, v in ops.items() if k in ("aten::mm", "aten::addmm", "lorakit_quant::linear"))
        lora = ops.get("aten::bmm", 0.0) + ops.get("aten::baddbmm", 0.0)  # gathered factors (LoraLinear.add_rows)
        attention = sum(v for k, v in ops.items() if "attention" in k)
        calls = sum(e.count for e in prof.key_averages()) / steps
        python = cProfile.Profile()
        python.enable()
        stream.decode(steps)
        python.disable()
        text = io.StringIO()
        pstats.Stats(python, stream=text).sort_stats("tottime").print_stats(15)
        outside = profiled - sum(ops.values())
        out[name] = {"wall_ms": wall, "profiled_wall_ms": profiled, "ops_ms": sum(ops.values()), "matmul_ms": matmul,
                     "lora_bmm_ms": lora, "attention_ms": attention, "outside_ops_ms": outside,
                     "op_calls_per_step": calls,
                     "top_ops": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15),
                     "top_python": text.getvalue()}
        print(f"--- {name} {dtype}: {wall:.1f} ms/step wall ({profiled:.1f} profiled): torch ops {sum(ops.values()):.1f} "
              f"(weight matmuls {matmul:.1f}, LoRA bmm {lora:.1f}, attention {attention:.1f}), outside ops {outside:.1f}; "
              f"{calls:.0f} op calls/step", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny random Llama instead of SmolLM2")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=8, help="decode steps per timed call")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--dtypes", nargs="+", choices=DTYPES,
                    help="default: fp32, int8 and q4_1, and bf16 where the CPU has native bf16")
    ap.add_argument("--compile", action="store_true", help="also ModelDecoder(model, compile=True)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: OMP_NUM_THREADS's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = args.dtypes or ["fp32", "int8", "q4_1"] + (["bf16"] if native_bf16() else [])
    with model_folder(args.quick) as folder:
        tokenizer, _ = load_causal_lm(folder)
        prompts = [prompt_ids(tokenizer, mr, "plain") for mr, _ in read_e2e("dev")[:32]]
        results = {d: compare(folder, d, copy.deepcopy(prompts), args.repeats, args.steps, args.compile)
                   for d in dtypes}
        if args.profile:
            results["profile"] = {d: profile(folder, d, prompts[0]) for d in dtypes[:2]}
    name = ("engine_design_quick" if args.quick else "engine_design") + ("_compiled" if args.compile else "")
    config = {"model": "tiny-llama" if args.quick else "smollm2", "adapters": ADAPTERS, "rows": ROWS,
              "steps": args.steps, "repeats": args.repeats, "dtypes": dtypes, "hardware": hardware(),
              "threads": torch.get_num_threads(), "compile": args.compile}
    print("wrote", write_record(name, config, results))


if __name__ == "__main__":
    main()
