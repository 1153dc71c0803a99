"""Mixed-adapter batches: throughput of one batch whose rows use different adapters.

A 64-row batch (sequence 64, random tokens) through the embedded MiniLM with r=8 LoRA
on query/value, inference. Cases, timed in alternation:

- ``single``: lorakit, one active adapter, the ordinary forward (the ceiling);
- ``rows_K``: lorakit ``adapter_per_row`` with the rows spread over K adapters;
- ``peft_single`` / ``peft_rows_K``: PEFT with the same adapters, ``adapter_names=``;
- ``rows_64_of_256``: lorakit with 256 adapters loaded, 64 used.

Before timing, lorakit's and PEFT's mixed-batch logits are checked equal.

    python bench/mixed.py [--quick] [--repeats 15]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

import lorakit
from lorakit.benchtools import check_close, interleave, median_ratio, summarize, write_record

sys.path.insert(0, str(Path(__file__).parent))
from train_step import base_model, make_batch  # noqa: E402

TARGETS = ["query", "value"]


def with_adapters(base, n: int):
    """``base`` copied, with ``n`` adapters a0..a{n-1} of random factors."""
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(n)
    for i in range(n):
        lorakit.add_lora(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=TARGETS), adapter=f"a{i}")
    with torch.no_grad():
        for _, p in lorakit.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def peft_copy(base, ours, n: int):
    """PEFT with lorakit's adapters a0..a{n-1}, loaded from PEFT-format files."""
    import peft

    with tempfile.TemporaryDirectory() as tmp:
        theirs = None
        for i in range(n):
            lorakit.set_adapter(ours, f"a{i}")
            lorakit.save_adapter(ours, f"{tmp}/a{i}")
            if theirs is None:
                theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/a{i}", adapter_name=f"a{i}")
            else:
                theirs.load_adapter(f"{tmp}/a{i}", adapter_name=f"a{i}")
    lorakit.set_adapter(ours, "a0")
    return theirs.eval()


def rows_over(k: int, rows: int) -> list[str]:
    return [f"a{i % k}" for i in range(rows)]


def run(spreads: list[int], repeats: int, rows: int = 64, seq: int = 64, loaded: int = 256,
        name: str = "mixed", out_dir: str = "bench/results", model: str = "minilm") -> dict:
    base = base_model(model, 0.0)
    data = make_batch(base, rows, seq)
    inputs = {k: v for k, v in data.items() if k != "labels"}
    most = max(spreads)
    ours = with_adapters(base, most)
    theirs = peft_copy(base, ours, most)
    many = with_adapters(base, loaded) if loaded > most else None

    def lorakit_rows(model, names):
        def forward():
            with torch.no_grad(), lorakit.adapter_per_row(model, names):
                return model(**inputs).logits
        return forward

    def peft_rows(names):
        return lambda: theirs(**inputs, adapter_names=names).logits

    with torch.no_grad():
        for k in spreads:
            check_close(lorakit_rows(ours, rows_over(k, rows))(), peft_rows(rows_over(k, rows))(),
                        f"lorakit vs PEFT mixed batch over {k} adapters")

    cases = {"single": lambda: ours(**inputs).logits, "peft_single": lambda: theirs(**inputs).logits}
    for k in spreads:
        cases[f"rows_{k}"] = lorakit_rows(ours, rows_over(k, rows))
        cases[f"peft_rows_{k}"] = peft_rows(rows_over(k, rows))
    if many is not None:
        cases[f"rows_{most}_of_{loaded}"] = lorakit_rows(many, rows_over(most, rows))
    with torch.no_grad():
        samples = interleave(cases, repeats=repeats)
    summary = summarize(samples)
    throughput = {case: rows / v["median_s"] for case, v in summary.items()}
    ratios = {}
    for k in spreads:
        ratios[f"rows_{k}/single"] = median_ratio(samples, "single", f"rows_{k}")  # throughput ratio
        ratios[f"rows_{k}/peft_rows_{k}"] = median_ratio(samples, f"peft_rows_{k}", f"rows_{k}")
        ratios[f"peft_rows_{k}/peft_single"] = median_ratio(samples, "peft_single", f"peft_rows_{k}")
    if many is not None:
        ratios[f"rows_{most}_of_{loaded}/single"] = median_ratio(samples, "single", f"rows_{most}_of_{loaded}")
    for case, t in throughput.items():
        print(f"{case}: {t:.0f} rows/s", flush=True)
    print({k: round(v, 3) for k, v in ratios.items()})
    results = {"cases": summary, "rows_per_second": throughput, "throughput_ratios": ratios}
    config = dict(model=model, spreads=spreads, repeats=repeats, rows=rows, seq=seq, loaded=loaded, r=8)
    write_record(name, config, results, out_dir)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 and 8 adapters, 3 repeats, nothing extra loaded")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    if args.quick:
        run([1, 8], repeats=3, loaded=0, name="mixed_quick")
    else:
        run([1, 8, 64], repeats=args.repeats)


if __name__ == "__main__":
    sys.exit(main())
