"""Where receipt tolerances come from (docs/RECEIPTS.md): a receipt made on the fp32 base, compared with the same
adapter on a bf16 copy, bitsandbytes bases (nf4, fp4, int8), lorakit's decoding layers (q8_0, q4_1, q4_0; q8_0
with float32 activations), merged copies (fp32, bf16), another base of the same architecture and broken adapters
(lora_B zeroed, half of each lora_B zeroed; on the fp32 base and on q8_0; lora_B zeroed on q4_0): top-1
agreement (also over the positions where the reference's top-1 leads by 0.5 nats or more), KL lower bound (mean,
largest), max |Δ log-prob|, base fingerprint status. r=8 on q_proj and v_proj, two adapters: random factors
(seed 2, std 0.02) and one trained briefly on E2E (AdamW, lr 1e-3, batches of 4 rows of at most 48 tokens); each
with the default probes (4 seeded ids per row continued by the base's samples) and with those of older receipts
(4 x 32 random ids, seed 0; judged by RANDOM_PROBE_TOLERANCES).

    python bench/receipt_tolerances.py            # SmolLM2-135M (lorakit models install smollm2), E2E data
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import time

import torch

import lorakit
from lorakit import receipt
from lorakit.benchtools import write_record
from lorakit.quant.linear import quantize_linears, quantize_model
from lorakit.tasks import lm

FIGURES = ("top1_agreement", "kl_bound", "kl_bound_max", "max_abs_logprob", "passed")


def build(model: str, targets: list[str], factors: dict[str, torch.Tensor], quantize_base: str | None = None):
    m = lm.load_causal_lm(model, quantize_base)[1].eval()
    lorakit.add_lora(m, lorakit.LoraConfig(r=8, alpha=16, target_modules=targets))
    with torch.no_grad():
        for name, p in lorakit.lora_parameters(m):
            p.copy_(factors[name])
    return m


def random_factors(model: str, targets: list[str]) -> dict[str, torch.Tensor]:
    m = lm.load_causal_lm(model)[1]
    lorakit.add_lora(m, lorakit.LoraConfig(r=8, alpha=16, target_modules=targets))
    g = torch.Generator().manual_seed(2)
    return {name: torch.randn(p.shape, generator=g) * 0.02 for name, p in lorakit.lora_parameters(m)}


def trained_factors(model: str, targets: list[str], steps: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    """LoRA factors after ``steps`` AdamW steps on E2E training rows ``mr\\nref<eos>`` (seed 0), and the losses."""
    tokenizer, m = lm.load_causal_lm(model)
    torch.manual_seed(0)
    lorakit.add_lora(m, lorakit.LoraConfig(r=8, alpha=16, target_modules=targets))
    rows = lm.read_e2e("train")
    random.Random(0).shuffle(rows)
    opt = torch.optim.AdamW([p for _, p in lorakit.lora_parameters(m)], lr=1e-3)
    m.train()
    losses = []
    for step in range(steps):
        texts = [f"{mr}\n{ref}{tokenizer.eos_token}" for mr, ref in rows[4 * step: 4 * step + 4]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=48)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = m(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        print(f"step {step}: loss {losses[-1]:.3f}", flush=True)
    return {name: p.detach().clone() for name, p in lorakit.lora_parameters(m)}, losses


def random_ids(m) -> torch.Tensor:
    """The probes of receipts before sampled probes: 4 x 32 seeded random ids (seed 0)."""
    allowed = receipt._allowed_ids(m.config, m.config.vocab_size)
    return allowed[torch.randint(len(allowed), (4, 32), generator=torch.Generator().manual_seed(receipt.PROBE_SEED))]


def broken(m, half: bool):
    """``m`` with every lora_B zeroed (the adapter dropped), or the first half of each lora_B's rows."""
    with torch.no_grad():
        for name, p in lorakit.lora_parameters(m):
            if ".lora_B." in f".{name}.":
                p[: p.shape[0] // 2 if half else p.shape[0]] = 0
    return m


def copies(model: str, targets: list[str], factors: dict[str, torch.Tensor], reference_model):
    """(label, model, adapter) of every copy compared with the reference."""
    yield "bf16", copy.deepcopy(reference_model).to(torch.bfloat16), "default"
    for base in ("nf4", "fp4", "bnb-int8"):
        yield base, build(model, targets, factors, base), "default"
    for fmt, label in (("int8", "q8_0"), ("int4", "q4_1")):
        m = build(model, targets, factors)
        quantize_model(m, fmt)
        yield label, m, "default"
    m = build(model, targets, factors)  # SmolLM2's weights come from a q4_1 GGUF: q4_0 is a real 4-bit rounding
    quantize_linears(m, "q4_0", "q8_0")
    yield "q4_0", m, "default"
    os.environ["LORAKIT_QUANT_ACT"], m = "fp32", build(model, targets, factors)
    try:  # the kernels' activations in float32 instead of int8 (read when the layers are built)
        quantize_model(m, "int8")
    finally:
        del os.environ["LORAKIT_QUANT_ACT"]
    yield "q8_0, fp32 activations", m, "default"
    merged = lorakit.merge_and_unload(copy.deepcopy(reference_model))
    yield "merged fp32", merged, None
    yield "merged bf16", merged.to(torch.bfloat16), None
    other = build(model, targets, factors)
    torch.manual_seed(5)
    with torch.no_grad():  # the same architecture, other weights
        for name, p in other.named_parameters():
            if "lora" not in name:
                p.copy_(torch.randn_like(p) * p.std())
    yield "another base", other, "default"
    for half in (False, True):
        what = "half of each lora_B zeroed" if half else "lora_B zeroed"
        yield f"fp32, {what}", broken(copy.deepcopy(reference_model), half), "default"
        m = broken(build(model, targets, factors), half)
        quantize_model(m, "int8")
        yield f"q8_0, {what}", m, "default"
    m = broken(build(model, targets, factors), False)
    quantize_linears(m, "q4_0", "q8_0")
    yield "q4_0, lora_B zeroed", m, "default"


def decisive_top1(reference: receipt.Receipt, m, adapter: str | None, margin: float = 0.5) -> float:
    """Top-1 agreement over the positions where the reference's top-1 log-prob leads the second by ``margin``
    nats or more (a flip at a near-tie is rounding; one where the reference was decisive is not)."""
    top = reference.tensors["probe.top_logprobs"]
    decisive = top[:, 0] - top[:, 1] >= margin
    with receipt._probing(m, adapter):
        new = receipt._log_probs(m, reference.tensors["probe.ids"]).argmax(1)
    return float((new == reference.tensors["probe.top_ids"][:, 0].long())[decisive].double().mean())


def measure(model: str, targets: list[str], factors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Per copy and kind of probes, the comparison with a receipt of the fp32 reference; make_receipt's seconds."""
    reference_model = build(model, targets, factors)
    seconds = {}
    start = time.perf_counter()
    references = {"sampled": receipt.make_receipt(reference_model, "default")}
    seconds["first (samples the probes)"] = time.perf_counter() - start
    start = time.perf_counter()
    receipt.make_receipt(reference_model, "default")
    seconds["again (probes reused)"] = time.perf_counter() - start
    start = time.perf_counter()
    references["random"] = receipt.make_receipt(reference_model, "default", random_ids(reference_model))
    seconds["random ids"] = time.perf_counter() - start
    references["random"].metadata["probes"] = {"seed": receipt.PROBE_SEED, "shape": [4, 32]}  # as old receipts
    assert references["sampled"].metadata["probes"]["kind"] == "sampled"
    results: dict = {kind: {} for kind in references}
    for label, m, adapter in copies(model, targets, factors, reference_model):
        for kind, reference in references.items():
            r = receipt.compare(reference, m, adapter)
            results[kind][label] = {**{k: r[k] for k in FIGURES}, "top1_decisive": decisive_top1(reference, m, adapter),
                                    "fingerprint": r["fingerprint"]["status"], "tolerance": r["tolerance"]["key"]}
            print(kind, label, results[kind][label], flush=True)
    return results, seconds


def run(model: str = "smollm2", targets: tuple[str, ...] = ("q_proj", "v_proj"), steps: int = 30,
        out_dir: str = "bench/results") -> dict:
    factors, losses = trained_factors(model, list(targets), steps)
    results: dict = {"train_losses": losses, "adapters": {}, "make_receipt_s": {}}
    for name, f in (("random factors", random_factors(model, list(targets))), ("trained", factors)):
        results["adapters"][name], results["make_receipt_s"][name] = measure(model, list(targets), f)
    config = {"model": model, "targets": list(targets), "r": 8, "train_steps": steps, "train_batch": 4,
              "train_max_length": 48, "lr": 1e-3, "tolerances": receipt.TOLERANCES,
              "random_probe_tolerances": receipt.RANDOM_PROBE_TOLERANCES}
    write_record("receipt_tolerances", config, results, out_dir)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--steps", type=int, default=30, help="training steps of the trained adapter")
    args = ap.parse_args()
    run(args.model, tuple(args.targets.split(",")), args.steps)


if __name__ == "__main__":
    main()
