"""How step time scales with rank and sequence length, and merged inference with the
number of adapters loaded (MiniLM, batch 16, dropout 0, fp32).

- rank r in {1, 2, 4, 8, 16, 64}: lorakit training step, sequence 128, interleaved;
- sequence length in {64, 128, 256, 512}: lorakit and PEFT training steps, r = 8;
- merged inference with 1, 8 and 64 adapters loaded (one active and merged) vs the base.

    python bench/scaling.py [--quick] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

import lorakit
from lorakit.benchtools import interleave, median_ratio, summarize, write_record

sys.path.insert(0, str(Path(__file__).parent))
from train_step import attach, base_model, make_batch, step_fn  # noqa: E402


def rank_sweep(kind: str, ranks: list[int], repeats: int, seq: int = 128) -> dict:
    base = base_model(kind, 0.0)
    data = make_batch(base, 16, seq)
    cases = {f"r={r}": step_fn(attach("lorakit", copy.deepcopy(base), r, 0.0), data, "fp32") for r in ranks}
    samples = interleave(cases, repeats=repeats)
    ref = "r=8" if "r=8" in cases else next(iter(cases))
    return {"cases": summarize(samples), "ratio_to_" + ref: {k: median_ratio(samples, k, ref) for k in cases}}


def length_sweep(kind: str, lengths: list[int], repeats: int) -> dict:
    base = base_model(kind, 0.0)
    models = {case: attach(case, copy.deepcopy(base), 8, 0.0) for case in ("lorakit", "peft")}
    out = {}
    for seq in lengths:
        data = make_batch(base, 16, seq)
        samples = interleave({case: step_fn(m, data, "fp32") for case, m in models.items()}, repeats=repeats)
        out[f"seq={seq}"] = {"cases": summarize(samples), "lorakit/peft": median_ratio(samples, "lorakit", "peft")}
    return out


def adapter_count_sweep(kind: str, counts: list[int], repeats: int) -> dict:
    base = base_model(kind, 0.0).eval()
    inputs = {k: v for k, v in make_batch(base, 16, 128).items() if k != "labels"}
    models = {"base": base}
    for n in counts:
        model = copy.deepcopy(base)
        for i in range(n):
            lorakit.add_lora(model, lorakit.LoraConfig(r=8, target_modules=["query", "value"]), adapter=f"a{i}")
        lorakit.merge(model)
        models[f"{n}_loaded_merged"] = model

    def forward(model):
        def run():
            with torch.inference_mode():
                model(**inputs)
        return run

    samples = interleave({k: forward(m) for k, m in models.items()}, repeats=repeats)
    return {"cases": summarize(samples), "ratio_to_base": {k: median_ratio(samples, k, "base") for k in models}}


def run(kind: str, ranks: list[int], lengths: list[int], counts: list[int], repeats: int,
        name: str = "scaling", out_dir: str = "bench/results") -> dict:
    results = {"rank": rank_sweep(kind, ranks, repeats), "length": length_sweep(kind, lengths, repeats),
               "adapters": adapter_count_sweep(kind, counts, repeats)}
    for part, res in results.items():
        print(part, {k: round(1000 * v["median_s"], 1) for k, v in res.get("cases", {}).items()} or
              {k: round(v["lorakit/peft"], 3) for k, v in res.items()}, flush=True)
    write_record(name, dict(model=kind, ranks=ranks, lengths=lengths, adapter_counts=counts, repeats=repeats), results, out_dir)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer points, 3 repeats")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.quick:
        run("minilm", [1, 8, 64], [64, 256], [1, 8], repeats=3, name="scaling_quick")
    else:
        run("minilm", [1, 2, 4, 8, 16, 64], [64, 128, 256, 512], [1, 8, 64], repeats=args.repeats)


if __name__ == "__main__":
    sys.exit(main())
