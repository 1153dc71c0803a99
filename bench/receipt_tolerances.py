"""Where receipt tolerances come from (docs/RECEIPTS.md): a receipt made on the fp32 base, compared with the same
adapter on a bf16 copy, bitsandbytes bases (nf4, fp4, int8), lorakit's decoding layers (q8_0, q4_1), merged
copies (fp32, bf16) and another base of the same architecture: top-1 agreement, mean KL lower bound, max |Δ log-prob|, base
fingerprint status. Random factors (seed 2, std 0.02), r=8, q_proj and v_proj.

    python bench/receipt_tolerances.py            # SmolLM2-135M (lorakit models install smollm2)
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import lorakit
from lorakit import receipt
from lorakit.benchtools import write_record
from lorakit.quant.linear import quantize_model
from lorakit.tasks import lm

FIGURES = ("top1_agreement", "kl_bound", "max_abs_logprob", "passed")


def build(model: str, targets: list[str], quantize_base: str | None = None):
    m = lm.load_causal_lm(model, quantize_base)[1].eval()
    lorakit.add_lora(m, lorakit.LoraConfig(r=8, alpha=16, target_modules=targets))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in lorakit.lora_parameters(m):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return m


def run(model: str = "smollm2", targets: tuple[str, ...] = ("q_proj", "v_proj"), out_dir: str = "bench/results") -> dict:
    reference_model = build(model, list(targets))
    start = time.perf_counter()
    reference = receipt.make_receipt(reference_model, "default")
    results: dict = {"make_receipt_s": time.perf_counter() - start, "copies": {}}

    def show(label: str, copy_model, adapter: str | None = "default") -> None:
        r = receipt.compare(reference, copy_model, adapter)
        results["copies"][label] = {**{k: r[k] for k in FIGURES}, "fingerprint": r["fingerprint"]["status"],
                                    "tolerance": r["tolerance"]["key"]}
        print(label, results["copies"][label], flush=True)

    show("bf16", copy.deepcopy(reference_model).to(torch.bfloat16))
    for base in ("nf4", "fp4", "bnb-int8"):
        show(base, build(model, list(targets), base))
    for fmt in ("int8", "int4"):
        m = build(model, list(targets))
        quantize_model(m, fmt)
        show(fmt, m)
    merged = lorakit.merge_and_unload(copy.deepcopy(reference_model))
    show("merged fp32", merged, None)
    show("merged bf16", merged.to(torch.bfloat16), None)
    other = build(model, list(targets))
    torch.manual_seed(5)
    with torch.no_grad():  # the same architecture, other weights
        for name, p in other.named_parameters():
            if "lora" not in name:
                p.copy_(torch.randn_like(p) * p.std())
    show("another base", other)
    write_record("receipt_tolerances", {"model": model, "targets": list(targets), "r": 8}, results, out_dir)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--targets", default="q_proj,v_proj")
    args = ap.parse_args()
    run(args.model, tuple(args.targets.split(",")))


if __name__ == "__main__":
    main()
