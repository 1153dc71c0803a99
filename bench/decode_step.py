"""Single-stream decoding against the weight-bandwidth floor (#27 item 3): how far per-token work around the
matrix products keeps ``lorakit serve`` from the speed at which memory can deliver the weights.

SmolLM2-135M-Instruct (``--quick``: a tiny random Llama) with 8 random r=4 alpha 32 q/v adapters; one E2E dev MR
prefilled, then greedy tokens decoded one at a time as the Scheduler decodes them (``serving.ModelDecoder``,
``lorakit.adapter_per_row`` at every step, adapter ``a0``). Weight formats: ``fp32``; ``q8_0`` and ``q4_1``
(``lorakit.quant.linear.quantize_linears``, the LM head in q8_0 under q4_1 as GGUF files keep it; skipped where the
kernels cannot be built) with the kernels' int8 activations, and ``q8_0 fp32-x`` / ``q4_1 fp32-x`` with float32
ones (``LORAKIT_QUANT_ACT=fp32``); ``bf16`` where the CPU has native bf16. ``<format> unfused`` (asked by
``--formats``): q/k/v and gate/up each their own product, as before :func:`lorakit.quant.linear.fuse_siblings`.

Floor: the bytes one token reads of the weights — every linear layer's weights in its format (codes and scales),
the LM head, the norms, one embedding row and the used adapter's factors — over a bandwidth measured in the same
rounds: a matrix-vector product over a float32 matrix of ``--bandwidth-mb`` MB (more than the last-level cache;
bandwidth = matrix bytes / time) and a copy of a buffer that size (read + written bytes / time). The floor takes
the faster. Each round times every case once, in turn (``benchtools.interleave``); ``over_floor`` is the median
over rounds of (ms per token / floor ms) with that round's bandwidth. ``cpu_ms``: thread CPU time per token (the
work done, less moved by other processes on a shared machine than wall time). The key-value cache read per token
is reported beside the weights (not in the floor). Before timing, each format's prefill logits must equal the
model's own forward (``model(ids)`` under ``adapter_per_row``).

``--threads``: torch's intra-op threads (default: ``OMP_NUM_THREADS``'s). ``--compile``: each format also as
``<format> compiled`` (``ModelDecoder(model, compile=True)``: the forward under ``torch.compile``) in the same
rounds, its first prefill and decode steps (the compilation) timed apart as ``compile_s``; its greedy tokens
must equal the eager ones.

    OMP_NUM_THREADS=1 python bench/decode_step.py [--quick] [--repeats 7] [--steps 16] [--bandwidth-mb 256]
        [--threads 2] [--compile] [--formats q4_1 ...]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch
from torch import nn

import lorakit
from lorakit.benchtools import BenchmarkMismatch, check_close, interleave, write_record
from lorakit.layers import LoraLinear
from lorakit.precision import native_bf16
from lorakit.serving import ModelDecoder
from lorakit.tasks.lm import load_causal_lm, prompt_ids, read_e2e

sys.path.insert(0, str(Path(__file__).parent))
from lm_step import hardware, model_folder  # noqa: E402

ADAPTERS = 8
ADAPTER = "a0"  # the stream's adapter


def build(model: nn.Module, fmt: str) -> nn.Module:
    """A copy of ``model`` (adapters attached) with its weights in ``fmt``."""
    model = copy.deepcopy(model)
    if fmt == "bf16":
        model.to(torch.bfloat16)
    elif fmt != "fp32":
        from lorakit.quant import linear

        weights, *options = fmt.split()  # "q4_1": the kernels' default (int8 activations); "q4_1 fp32-x": float;
        unfused = mock.patch.object(linear, "fuse_siblings", lambda m: 0) if "unfused" in options else nullcontext()
        with mock.patch.dict(os.environ, {"LORAKIT_QUANT_ACT": "fp32" if "fp32-x" in options else "int8"}), unfused:
            linear.quantize_linears(model, weights, "q8_0")  # ("unfused": q/k/v and gate/up apart, one product each)
    return model.eval()


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of weights one decoding step of one row reads, by kind."""
    from lorakit.quant.linear import QuantLinear

    out = {"linear": 0, "adapter": 0, "embedding_row": 0, "other": 0}
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, LoraLinear):
            base = module.__dict__.get("int8_base")
            out["linear"] += _nbytes(base.q, base.d, base.m, base.bias) if base is not None else \
                _nbytes(module.weight, module.bias)
            out["adapter"] += _nbytes(module.lora_A[ADAPTER], module.lora_B[ADAPTER]) if ADAPTER in module.lora_A else 0
            seen.update(id(p) for p in module.parameters())
        elif isinstance(module, QuantLinear):
            out["linear"] += _nbytes(module.q, module.d, module.m, module.bias)
        elif isinstance(module, nn.Linear):
            out["linear"] += _nbytes(module.weight, module.bias)
            seen.update(id(p) for p in module.parameters())
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            out["embedding_row"] += module.weight[0].numel() * module.weight.element_size()
            seen.add(id(module.weight))
    out["other"] = sum(_nbytes(p) for p in model.parameters() if id(p) not in seen)  # norms
    return out


def bandwidth_cases(mb: int) -> tuple[dict, dict[str, int]]:
    """Callables that stream ``mb`` MB: a float32 matrix-vector product and a copy; the bytes each moves."""
    cols = 4096
    matrix = torch.randn(mb * 2**20 // (4 * cols), cols)
    x, src = torch.randn(cols), torch.randn(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    return ({"gemv": lambda: torch.mv(matrix, x), "memcpy": lambda: dst.copy_(src)},
            {"gemv": _nbytes(matrix), "memcpy": 2 * _nbytes(src)})


class Stream:
    """One prefilled row of one format; :meth:`decode` runs ``steps`` greedy steps from the same state."""

    def __init__(self, model: nn.Module, prompt: list[int], compile: bool = False) -> None:
        start = time.perf_counter()
        self.model, self.engine = model, ModelDecoder(model, compile=compile)
        self.cache = self.engine.cache(1, 512)
        ids = torch.tensor([prompt])
        with lorakit.adapter_per_row(model, [ADAPTER]), torch.inference_mode():
            self.first = self.engine.forward(ids, self.cache, slice(0, 1), torch.zeros(1, dtype=torch.long))
            low = next(model.parameters()).dtype == torch.bfloat16  # (bf16 sums in other orders)
            check_close(self.first, model(ids).logits[:, -1].float(), f"{next(model.parameters()).dtype} prefill",
                        **(dict(rtol=0.05, atol=0.1) if low else dict(rtol=1e-3, atol=1e-3)))
        self.length, self.cpu_s = len(prompt), []
        self.tokens = self.decode(3)  # (compiled: the decode graphs)
        self.compile_s = time.perf_counter() - start if compile else None

    def decode(self, steps: int) -> list[int]:
        start, token, out = time.thread_time(), self.first.argmax(-1), []
        for k in range(steps):
            out.append(int(token))
            with lorakit.adapter_per_row(self.model, [ADAPTER]):
                token = self.engine.forward(token[:, None], self.cache, slice(0, 1),
                                            torch.tensor([self.length + k])).argmax(-1)
        self.cpu_s.append(time.thread_time() - start)
        return out


def kv_bytes(stream: Stream, steps: int) -> int:
    """Keys and values the median step reads (every layer, the positions before it)."""
    cache = stream.cache
    per_position = sum(t[0, :, 0].numel() * t.element_size() for t in (*cache.k, *cache.v))
    return per_position * (stream.length + steps // 2)


def formats() -> list[str]:
    out = ["fp32"]
    try:
        from lorakit.quant import kernels

        kernels.load()
        out += ["q8_0", "q4_1", "q8_0 fp32-x", "q4_1 fp32-x"]
    except RuntimeError as e:  # no compiler: the quantized formats cannot run here
        print(f"skipping q8_0 and q4_1: {e}", flush=True)
    return out + (["bf16"] if native_bf16() else [])


def run(folder: str, repeats: int, steps: int, mb: int, fmts: list[str], compile: bool = False) -> dict:
    tokenizer, model = load_causal_lm(folder)
    g = torch.Generator().manual_seed(0)
    for i in range(ADAPTERS):
        lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=32, target_modules=["q_proj", "v_proj"]), f"a{i}")
        with torch.no_grad():
            for _, p in lorakit.lora_parameters(model, f"a{i}"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    prompt = prompt_ids(tokenizer, read_e2e("dev")[0][0], "plain")
    streams = {fmt: Stream(build(model, fmt), prompt) for fmt in fmts}
    if compile:
        for fmt in fmts:
            streams[f"{fmt} compiled"] = compiled = Stream(streams[fmt].model, prompt, compile=True)
            if compiled.tokens != streams[fmt].tokens:
                raise BenchmarkMismatch(f"{fmt}: compiled greedy tokens {compiled.tokens} != eager {streams[fmt].tokens}")
    del model
    cases = {fmt: (lambda s=s: s.decode(steps)) for fmt, s in streams.items()}
    moves, moved = bandwidth_cases(mb)
    load_before = os.getloadavg()
    samples = interleave({**cases, **moves}, repeats=repeats)
    load_after = os.getloadavg()
    bandwidth = [max(moved[k] / samples[k][i] for k in moves) for i in range(repeats)]  # bytes/s per round
    results = {"bandwidth_gb_s": {k: statistics.median(moved[k] / t for t in samples[k]) / 1e9 for k in moves},
               "load_average": {"before": load_before, "after": load_after}, "formats": {}, "samples_s": samples}
    for fmt, stream in streams.items():
        need = weight_bytes(stream.model)
        total = sum(need.values())
        per_token = [t / steps for t in samples[fmt]]
        results["formats"][fmt] = {
            "ms_per_token": statistics.median(per_token) * 1e3,
            "cpu_ms_per_token": statistics.median(stream.cpu_s[-repeats:]) * 1e3 / steps,
            "weight_bytes": need, "weight_mb": total / 2**20,
            "floor_ms": statistics.median(total / b for b in bandwidth) * 1e3,
            "over_floor": statistics.median(t * b / total for t, b in zip(per_token, bandwidth)),
            "kv_cache_mb": kv_bytes(stream, steps) / 2**20,
            "compile_s": stream.compile_s,
        }
        f = results["formats"][fmt]
        print(f"{fmt:14}: {f['ms_per_token']:6.1f} ms/token (cpu {f['cpu_ms_per_token']:.1f}), weights {f['weight_mb']:.0f} "
              f"MB, floor {f['floor_ms']:.1f} ms, {f['over_floor']:.2f}x the floor", flush=True)
    print("bandwidth GB/s:", {k: round(v, 1) for k, v in results["bandwidth_gb_s"].items()},
          "load average before/after:", load_before[0], load_after[0], flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny random Llama instead of SmolLM2")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=16, help="tokens per timed call")
    ap.add_argument("--bandwidth-mb", type=int, default=256)
    ap.add_argument("--formats", nargs="+", help="default: fp32, q8_0 and q4_1 where the kernels build, bf16 if native")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: OMP_NUM_THREADS's)")
    ap.add_argument("--compile", action="store_true", help="also each format compiled (ModelDecoder compile=True)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fmts = args.formats or formats()
    with model_folder(args.quick) as folder:
        results = run(folder, args.repeats, args.steps, args.bandwidth_mb, fmts, args.compile)
    threads = torch.get_num_threads()
    name = ("decode_step_quick" if args.quick else "decode_step") + (f"_{threads}threads" if threads != 1 else "")
    config = {"model": "tiny-llama" if args.quick else "smollm2", "adapters": ADAPTERS, "rows": 1, "steps": args.steps,
              "repeats": args.repeats, "bandwidth_mb": args.bandwidth_mb, "formats": fmts, "hardware": hardware(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "threads": torch.get_num_threads(),
              "compile": args.compile}
    print("wrote", write_record(name, config, results))


if __name__ == "__main__":
    main()
