"""Inference latency in the style of the paper's Table 1: does LoRA add latency?

GPT-2 medium shape (``GPT2Config(n_embd=1024, n_layer=24, n_head=16)``, random init),
forward only, batch 1 and 16, sequence 128. Cases: the base model; lorakit with r=4 on
the q and v slices of ``c_attn`` merged (still wrapped) and unmerged; the same merged and
unloaded to plain modules; PEFT r=4 on ``c_attn``, unmerged; Houlsby adapters after
both sublayers. Merged outputs are checked equal to unmerged ones before timing.

    python bench/latency.py [--quick] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys

import torch

import lorakit
from lorakit.baselines import add_houlsby_adapters
from lorakit.benchtools import check_close, interleave, median_ratio, summarize, write_record


def gpt2(size: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=1024, n_layer=24, n_head=16) if size == "medium" else GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=500, n_positions=256, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def _randomize(model) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in lorakit.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def build_cases(base, adapter_dim: int):
    import peft

    qv = lorakit.LoraConfig(r=4, alpha=32, target_modules=["c_attn"], enable_lora={"c_attn": (True, False, True)})
    unmerged = lorakit.add_lora(copy.deepcopy(base), qv)
    _randomize(unmerged)
    merged = copy.deepcopy(unmerged)
    lorakit.merge(merged)
    unloaded = lorakit.merge_and_unload(copy.deepcopy(unmerged))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=32, target_modules=["c_attn"],
                                                                     fan_in_fan_out=True, init_lora_weights=False)).eval()
    adapters = copy.deepcopy(base)
    add_houlsby_adapters(adapters, adapter_dim)
    return {"base": base, "lorakit_merged": merged, "lorakit_unloaded": unloaded, "lorakit_unmerged": unmerged,
            "peft_unmerged": theirs, "adapter_houlsby": adapters}


def run(size: str, batches: list[int], repeats: int, seq: int = 128, adapter_dim: int = 16,
        name: str = "latency", out_dir: str = "bench/results") -> dict:
    models = build_cases(gpt2(size), adapter_dim)
    results = {}
    for batch in batches:
        ids = torch.randint(0, models["base"].config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            reference = models["lorakit_unmerged"](ids).logits
            for case in ("lorakit_merged", "lorakit_unloaded"):
                check_close(models[case](ids).logits, reference, f"{case} vs lorakit_unmerged", rtol=1e-3, atol=1e-3)

            def forward(model):
                return lambda: model(ids)

            # a 16 x 128 forward takes seconds: the rotated rounds absorb first-call effects, no warm-up round
            samples = interleave({k: forward(m) for k, m in models.items()}, repeats=repeats, warmup=1 if batch == 1 else 0)
        results[f"batch={batch}"] = {
            "cases": summarize(samples),
            "overhead_vs_base": {k: median_ratio(samples, k, "base") - 1 for k in models if k != "base"},
        }
        overhead = {k: f"{100 * v:+.1f}%" for k, v in results[f"batch={batch}"]["overhead_vs_base"].items()}
        print(f"batch {batch}: base {1000 * statistics.median(samples['base']):.0f} ms; overhead {overhead}", flush=True)
    write_record(name, dict(size=size, batches=batches, seq=seq, repeats=repeats, adapter_dim=adapter_dim, r=4), results, out_dir)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 1 only, 3 repeats")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.quick:
        run("medium", [1], repeats=3, name="latency_quick")
    else:
        run("medium", [1, 16], repeats=args.repeats)


if __name__ == "__main__":
    sys.exit(main())
