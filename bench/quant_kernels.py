"""Weight-only quantized linear kernels on SmolLM2-135M's shapes: which one to decode with, per CPU kind.

Candidates for ``y = x W^T`` (``x: (M, in)``, no bias):

- ``fp32``: ``F.linear`` on float32 weights; ``bf16``: on bfloat16 weights with bfloat16 activations.
- ``int8pack``: ``torch._weight_int8pack_mm`` (int8 rows, a scale per row), activations fp32 or bf16.
- ``int4pack``: ``torch._weight_int4pack_mm_for_cpu``, groups of 32 holding the q4_1 weights exactly with
  fp32 scales / zeros (``zero = m + 8 d``) under fp32 activations, rounded to bf16 under bf16 ones.
- ``fbgemm``: ``torch.ao.quantization.quantize_dynamic`` (engine x86): int8 rows, activations quantized
  per product too (its output error is reported).
- ``torch_ref``: lorakit's pure-torch q4_1 reference (dequantize to fp32, then ``F.linear``).
- ``q8_0`` / ``q4_1`` / ``q4_0`` ``@avx2`` / ``@avx512`` / ``@avx512vnni``: lorakit's C++ kernels
  (``lorakit.quant.kernels``) with float32 activations, and ``(int8 x)`` with int8 activation blocks (their
  default; checked against ``blocks.reference_linear(..., act="int8")``); under bf16 activations the conversion
  to fp32 and back is timed with them.
- ``compiled`` (``--compile``): ``torch.compile`` of the q4_1 dequantize + ``F.linear``, 1536 x 576 only.

Every candidate's output is checked before timing: lorakit's kernels against the reference of their own
format, the stock ones against the float product of the weights they hold. ``rel_err`` is each output's
relative RMS distance from the fp32 product of the unquantized weights (random N(0, 0.02^2) weights, N(0, 1)
activations). A single matrix of a few MB stays in the cache between calls, so ``decode_step`` also times
one decoding step's whole set: 30 layers x (q, k, v, o, gate, up, down) + the LM head, each matrix its own
tensor (0.54 GB in fp32), read from memory, at each of ``--step-rows`` rows (a batched step: 8 clients are 8
rows), each with 1 and 2 threads; the stock bf16 / int8pack / int4pack kernels at 1 row only. GB/s counts
weight bytes (codes + scales) read; the load average is recorded before and after each round.

``--model`` runs a real model (SmolLM2-135M) through transformers' ``generate`` in each format: greedy
agreement with the float model on E2E test MRs and ms per token (transformers' per-token work included).

    python bench/quant_kernels.py [--quick] [--threads 1 2] [--step-threads 1 2] [--rows 1 2 4 8 16 32 64]
        [--step-rows 1 2 4 8 16 32 64] [--repeats 5] [--compile] [--model FOLDER]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.benchtools import check_close, interleave, write_record
from lorakit.quant import blocks, kernels

HIDDEN, INTER, KV, LAYERS, VOCAB = 576, 1536, 192, 30, 49152
SHAPES = {"q/o 576x576": (HIDDEN, HIDDEN), "k/v 192x576": (KV, HIDDEN), "gate/up 1536x576": (INTER, HIDDEN),
          "down 576x1536": (HIDDEN, INTER), "lm_head 49152x576": (VOCAB, HIDDEN)}
LAYER = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)]


def _nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _int4pack(weight: blocks.BlockWeight, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """q4_1 blocks as torch's int4 CPU kernel holds them: ``w = (q - 8) * scale + zero`` per group of 32."""
    codes = blocks.unpack_nibbles(weight.q).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    d, m = weight.d.float(), weight.m.float()
    scales_zeros = torch.stack([d, m + 8 * d], dim=-1).transpose(0, 1).contiguous().to(dtype)  # (in/32, out, 2)
    return packed, scales_zeros


def _fbgemm(weight: Tensor) -> nn.Module:
    torch.backends.quantized.engine = "x86"
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data.copy_(weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(layer), {nn.Linear}, dtype=torch.qint8)


def candidates(weight: Tensor, x: Tensor, isas: list[str]) -> dict[str, tuple[Callable[[], Tensor], int, Tensor]]:
    """name -> (product, weight bytes read, output the product must match)."""
    xb, cases = x.bfloat16(), {}
    ref32 = F.linear(x, weight)
    cases["fp32"] = (lambda: F.linear(x, weight), _nbytes(weight), ref32)
    wb = weight.bfloat16()
    cases["bf16 (bf16 x)"] = (lambda: F.linear(xb, wb), _nbytes(wb), F.linear(xb.float(), wb.float()))
    scale = weight.abs().amax(1).clamp(min=1e-12) / 127
    w8 = torch.round(weight / scale[:, None]).to(torch.int8)
    want8 = F.linear(x, w8.float() * scale[:, None])
    cases["int8pack"] = (lambda: torch._weight_int8pack_mm(x, w8, scale), _nbytes(w8, scale), want8)
    sb = scale.bfloat16()
    cases["int8pack (bf16 x)"] = (lambda: torch._weight_int8pack_mm(xb, w8, sb), _nbytes(w8, sb),
                                  F.linear(xb.float(), w8.float() * sb.float()[:, None]))
    q41 = blocks.quantize(weight, "q4_1")
    want41 = blocks.reference_linear(x, q41)
    p32, sz32 = _int4pack(q41, torch.float32)
    cases["int4pack"] = (lambda: torch._weight_int4pack_mm_for_cpu(x, p32, 32, sz32), _nbytes(p32, sz32), want41)
    pb, szb = _int4pack(q41, torch.bfloat16)
    cases["int4pack (bf16 x)"] = (lambda: torch._weight_int4pack_mm_for_cpu(xb, pb, 32, szb), _nbytes(pb, szb),
                                  torch._weight_int4pack_mm_for_cpu(xb.float(), p32, 32, szb.float()))
    fb = _fbgemm(weight)
    cases["fbgemm dynamic int8"] = (lambda: fb(x), _nbytes(w8, scale), ref32)
    cases["torch_ref q4_1"] = (lambda: blocks.reference_linear(x, q41), q41.nbytes(), want41)
    for fmt in blocks.FORMATS:
        q = blocks.quantize(weight, fmt)
        want = blocks.reference_linear(x, q)
        want8 = blocks.reference_linear(x, q, act="int8")
        for isa in isas:
            cases[f"{fmt}@{isa}"] = (lambda q=q, isa=isa: kernels.linear(x, q, isa=isa, act="fp32"), q.nbytes(), want)
            cases[f"{fmt}@{isa} (int8 x)"] = (lambda q=q, isa=isa: kernels.linear(x, q, isa=isa, act="int8"), q.nbytes(),
                                              want8)
        if fmt != "q4_0":
            cases[f"{fmt}@{isas[-1]} (bf16 x)"] = (lambda q=q: kernels.linear(xb.float(), q, act="fp32").bfloat16(), q.nbytes(),
                                                   blocks.reference_linear(xb.float(), q))
    return cases


def _tolerance(name: str) -> float:
    if "fbgemm" in name:
        return 0.05  # activations quantized too: compared with fp32 loosely, its error reported below
    return 2e-2 if "bf16" in name else 1e-4


def _rel(got: Tensor, ref: Tensor) -> float:
    return float((got.float() - ref).norm() / ref.norm())


def time_matrices(args, isas: list[str]) -> list[dict]:
    rows = []
    for shape_name, (out, inp) in SHAPES.items():
        if args.quick and out > 2000:
            continue
        weight = torch.randn(out, inp, generator=torch.Generator().manual_seed(0)) * 0.02
        for m in args.rows:
            inner = max(1, 20_000_000 // (out * inp * m))
            x = torch.randn(m, inp, generator=torch.Generator().manual_seed(1))
            cases = candidates(weight, x, isas)
            ref32 = cases["fp32"][2]
            errors = {}
            for name, (fn, _, want) in cases.items():
                got = fn()
                check_close(got.float(), want, name, rtol=_tolerance(name), atol=_tolerance(name) * want.abs().max().item())
                errors[name] = _rel(got, ref32)
            for threads in args.threads:
                torch.set_num_threads(threads)
                loops = {name: (lambda fn=fn: [fn() for _ in range(inner)]) for name, (fn, _, _) in cases.items()}
                samples = interleave(loops, repeats=args.repeats)
                for name, (_, nbytes, _) in cases.items():
                    ms = statistics.median(samples[name]) / inner * 1e3
                    rows.append({"shape": shape_name, "rows": m, "threads": threads, "case": name, "ms": ms,
                                 "weight_gb_s": nbytes / ms / 1e6, "rel_err": errors[name],
                                 "vs_fp32": statistics.median(a / b for a, b in zip(samples[name], samples["fp32"]))})
                here = [r for r in rows if (r["shape"], r["rows"], r["threads"]) == (shape_name, m, threads)]
                print(f"{shape_name} M={m} t={threads} " + "  ".join(f"{r['case']}={r['ms']:.3f}" for r in here), flush=True)
    return rows


def time_decode_step(args, isas: list[str]) -> dict:
    """Every matrix of one decoding step at each of ``args.step_rows`` rows, each matrix stored once per candidate."""
    layers = 2 if args.quick else LAYERS
    shapes = LAYER * layers + [(VOCAB, HIDDEN)]
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(o, i, generator=gen) * 0.02 for o, i in shapes]
    stored, nbytes, one_row_only = {}, {}, set()

    def add(name: str, mats: list, product: Callable, bf16: bool = False, weight_bytes: int | None = None) -> None:
        stored[name] = (mats, product, bf16)
        nbytes[name] = weight_bytes or sum(t.nbytes() if isinstance(t, blocks.BlockWeight) else _nbytes(*t)
                                           if isinstance(t, tuple) else _nbytes(t) for t in mats)

    add("fp32", weights, F.linear)
    add("bf16 (bf16 x)", [w.bfloat16() for w in weights], F.linear, bf16=True)
    q8 = []
    for w in weights:
        s = (w.abs().amax(1) / 127).bfloat16()
        q8.append((torch.round(w / s.float()[:, None]).to(torch.int8), s))
    add("int8pack (bf16 x)", q8, lambda x, t: torch._weight_int8pack_mm(x, *t), bf16=True)
    add("int4pack (bf16 x)", [_int4pack(blocks.quantize(w, "q4_1"), torch.bfloat16) for w in weights],
        lambda x, t: torch._weight_int4pack_mm_for_cpu(x, t[0], 32, t[1]), bf16=True)
    one_row_only.update(("bf16 (bf16 x)", "int8pack (bf16 x)", "int4pack (bf16 x)"))
    add("fbgemm dynamic int8", [_fbgemm(w) for w in weights], lambda x, f: f(x),
        weight_bytes=sum(w.numel() + 4 * w.shape[0] for w in weights))
    for fmt in blocks.FORMATS:
        qs = [blocks.quantize(w, fmt) for w in weights]
        for isa in isas:
            add(f"{fmt}@{isa}", qs, lambda x, q, isa=isa: kernels.linear(x, q, isa=isa, act="fp32"))
            add(f"{fmt}@{isa} (int8 x)", qs, lambda x, q, isa=isa: kernels.linear(x, q, isa=isa, act="int8"))
    del weights
    result = {"layers": layers, "matrices": len(shapes), "cases": {}}
    for rows in args.step_rows:
        xs = {n: torch.randn(rows, n, generator=gen) for n in sorted({i for _, i in shapes})}
        steps = {}
        for name, (mats, product, bf16) in stored.items():
            if rows > 1 and name in one_row_only:
                continue
            x = {n: v.bfloat16() for n, v in xs.items()} if bf16 else xs
            steps[name] = lambda mats=mats, product=product, x=x: [product(x[s[1]], m) for m, s in zip(mats, shapes)]
        for threads in args.step_threads:
            torch.set_num_threads(threads)
            load = os.getloadavg()[0]
            samples = interleave(steps, repeats=args.repeats)
            load = (load, os.getloadavg()[0])
            for name, s in samples.items():
                ms = statistics.median(s) * 1e3
                result["cases"][f"{name} rows={rows} t={threads}"] = {
                    "case": name, "rows": rows, "threads": threads, "ms": ms, "weight_bytes": nbytes[name],
                    "weight_gb_s": nbytes[name] / ms / 1e6, "load": load,
                    "vs_fp32": statistics.median(a / b for a, b in zip(s, samples["fp32"]))}
                print(f"decode step rows={rows} t={threads} {name:22} {ms:8.2f} ms  {nbytes[name] / ms / 1e6:6.1f} GB/s "
                      f"load {load[0]:.1f}-{load[1]:.1f}", flush=True)
    return result


def time_compiled(args) -> dict:
    """torch.compile of q4_1 dequantize + F.linear, 1536 x 576, batch 1: compile time and per-product time."""
    weight = torch.randn(INTER, HIDDEN, generator=torch.Generator().manual_seed(0)) * 0.02
    x = torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(1))
    q = blocks.quantize(weight, "q4_1")
    compiled = torch.compile(lambda x, q_, d, m: blocks.reference_linear(x, blocks.BlockWeight("q4_1", q_, d, m)))
    start = time.perf_counter()
    check_close(compiled(x, q.q, q.d, q.m), blocks.reference_linear(x, q), "compiled q4_1")
    compile_s = time.perf_counter() - start
    torch.set_num_threads(1)
    loops = {"fp32": lambda: [F.linear(x, weight) for _ in range(20)],
             "compiled q4_1": lambda: [compiled(x, q.q, q.d, q.m) for _ in range(20)],
             "q4_1 kernel": lambda: [kernels.linear(x, q) for _ in range(20)]}
    samples = interleave(loops, repeats=args.repeats)
    return {"compile_s": compile_s, "threads": 1, **{k: statistics.median(v) / 20 * 1e3 for k, v in samples.items()}}


def time_model(args) -> dict:
    """SmolLM2 through transformers' ``generate`` (batch 1, greedy, fp32 activations), its linear layers and LM
    head in each format (``quantize_linears``): ms per token and agreement with the float model on E2E test
    MRs: top-1 given the float model's tokens (teacher-forced) and identical free-running greedy tokens."""
    import copy
    import csv
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.quant.linear import quantize_linears

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    rows = list(csv.DictReader(open(Path(args.e2e) / "testset.csv")))[:: 630 // args.prompts][: args.prompts]
    prompts = [tokenizer(f"Describe the restaurant: {r['MR']}\nDescription:", return_tensors="pt").input_ids for r in rows]
    models = {"fp32": base}
    for fmt, head in [("q8_0", None), ("q4_0", None), ("q4_1", None), ("q4_1", "q8_0")]:
        name = fmt if head is None else f"{fmt} + {head} head"
        models[name] = copy.deepcopy(base)
        quantize_linears(models[name], fmt, head_fmt=head)
    new = args.new_tokens
    gen = {"do_sample": False, "max_new_tokens": new, "min_new_tokens": new, "pad_token_id": tokenizer.eos_token_id}
    result = {"model": args.model, "prompts": len(prompts), "new_tokens": new, "threads": 1, "cases": {}}
    with torch.no_grad():
        want = [base.generate(p, **gen) for p in prompts]
        for name, model in models.items():
            got = [model.generate(p, **gen) for p in prompts]
            forced = [model(input_ids=w).logits[0, len(p[0]) - 1:-1].argmax(-1) == w[0, len(p[0]):]
                      for p, w in zip(prompts, want)]
            same = sum(int((g == w).sum()) - len(p[0]) for g, w, p in zip(got, want, prompts))
            result["cases"][name] = {"teacher_forced_top1": float(torch.cat(forced).float().mean()),
                                     "identical_tokens": same / (new * len(prompts))}
        samples = interleave({name: (lambda m=m: m.generate(prompts[0], **gen)) for name, m in models.items()},
                             repeats=args.repeats)
    for name, s in samples.items():
        result["cases"][name]["ms_per_token"] = statistics.median(s) / new * 1e3
        print(f"model {name:5} {result['cases'][name]}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 2 layers in the decode step")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="threads for the single matrices")
    parser.add_argument("--step-threads", type=int, nargs="+", default=[1, 2], help="threads for the decode step")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="rows of x, single matrices")
    parser.add_argument("--step-rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="rows of x, decode step")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd dequantize + matmul")
    parser.add_argument("--skip-matrices", action="store_true")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--model", help="also run this causal LM folder (SmolLM2-135M) through generate in each format")
    parser.add_argument("--e2e", default="../shared/data/e2e", help="E2E data folder (testset.csv) for --model's prompts")
    parser.add_argument("--name", help="record name (default: kernels, or kernels_quick with --quick)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    kernels.load()
    isas = [isa for isa in kernels.ISAS if kernels.ISAS[isa] <= kernels.ISAS[kernels.cpu_isa()]]
    results = {"isas": isas}
    if not args.skip_matrices:
        results["matrices"] = time_matrices(args, isas)
    if not args.skip_step:
        results["decode_step"] = time_decode_step(args, isas)
    if args.model:
        results["model"] = time_model(args)
    if args.compile:
        results["compiled"] = time_compiled(args)
        print(results["compiled"])
    name = args.name or ("kernels_quick" if args.quick else "kernels")
    config = {k: v for k, v in vars(args).items()} | {"shapes": SHAPES, "weights": "N(0, 0.02^2)", "activations": "N(0, 1)"}
    print(write_record(name, config, results))


if __name__ == "__main__":
    main()
