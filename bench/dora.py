"""DoRA training step: lorakit LoRA vs lorakit DoRA vs PEFT LoRA vs PEFT DoRA (issue #26).

SmolLM2-135M's shape (Llama: hidden 576, 30 layers, intermediate 1536, 9 heads / 3 KV
heads, vocabulary 49152, tied embeddings) with random weights (seed 0), fp32, batches of
8 x 128 random tokens, the model's own causal-LM loss (``labels=input_ids``), r=8, alpha=16,
no dropout; adapters on q_proj/v_proj and on every linear layer (all-linear). One step =
forward, backward, AdamW step. The four cases train their own copy of the model and are
timed in alternation (``lorakit.benchtools.interleave``); ratios are medians over rounds.

Before timing, with the same non-trivial factors and magnitudes (a PEFT adapter with
``init_lora_weights=False`` and perturbed magnitudes, saved and loaded into lorakit), lorakit
and PEFT must give the same loss and the same gradients of every A, B and magnitude.
Targets: lorakit DoRA / lorakit LoRA <= 1.3 (PEFT's DoRA costs about 2x its LoRA: peft #1474).

    python bench/dora.py [--quick] [--repeats 5] [--layers 30] [--dropout 0.0]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile

import torch

import lorakit
from lorakit.benchtools import check_close, interleave, median_ratio, summarize, write_record

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1000, max_position_embeddings=256, tie_word_embeddings=True)
TARGETS = {"q_proj,v_proj": ["q_proj", "v_proj"], "all-linear": "all-linear"}
CASES = ("lorakit_lora", "lorakit_dora", "peft_lora", "peft_dora")


def base_model(shape: dict):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**shape)).float().train()


def peft_model(base, targets, dora: bool, dropout: float):
    """PEFT's model with non-trivial factors (``init_lora_weights=False``) and magnitudes."""
    import peft

    torch.manual_seed(1)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets, use_dora=dora, init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)  # a trained adapter's size of update, not a random one's
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.rand(p.shape, generator=torch.Generator().manual_seed(2)))
    return model


def lorakit_model(base, theirs):
    """The same adapter in lorakit: PEFT's file loaded into a copy of the base model."""
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        model = lorakit.load_adapter(copy.deepcopy(base), tmp)
    lorakit.mark_trainable(model, ["default"])
    return model.train()


def loss_of(model, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


def check_same(ours, theirs, batch: torch.Tensor, what: str) -> dict:
    """Same loss and gradients of every trainable tensor (dropout off)."""
    grads = []
    for model in (ours, theirs):
        model.eval()
        loss = loss_of(model, batch)
        loss.backward()
        named = {n.replace("base_model.model.", "").replace(".default.weight", "").replace(".weight", "")
                 .replace(".default", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}
        grads.append((loss.detach(), named))
        model.zero_grad(set_to_none=True)
        model.train()
    (loss_a, a), (loss_b, b) = grads
    if sorted(a) != sorted(b):
        raise AssertionError(f"{what}: trainable tensors differ: {sorted(set(a) ^ set(b))[:5]}")
    flat_a, flat_b = (torch.cat([g[k].flatten() for k in sorted(a)]) for g in (a, b))
    check_close(loss_a, loss_b, f"{what}: loss", rtol=1e-5, atol=1e-5)
    scale = flat_b.abs().max().item()
    check_close(flat_a, flat_b, f"{what}: gradients", rtol=1e-3, atol=1e-4 * scale)  # 30 layers of fp32 rounding
    return {"loss": loss_a.item(), "loss_abs_diff": (loss_a - loss_b).abs().item(),
            "grad_max_abs_diff": (flat_a - flat_b).abs().max().item(), "grad_max_abs": scale,
            "trainable_tensors": len(a)}


def stepper(model, batches: list[torch.Tensor]):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    state = {"i": 0}

    def step() -> None:
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        loss_of(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run_targets(base, targets, batches, repeats: int, dropout: float) -> dict:
    models, checks = {}, {}
    for variant in ("lora", "dora"):
        theirs = peft_model(base, targets, variant == "dora", dropout)
        ours = lorakit_model(base, theirs)
        checks[variant] = check_same(ours, theirs, batches[0], f"lorakit vs PEFT {variant}")
        models[f"lorakit_{variant}"], models[f"peft_{variant}"] = ours, theirs
    print(f"  same loss and gradients: {checks}", flush=True)
    samples = interleave({k: stepper(models[k], batches) for k in CASES}, repeats=repeats)
    ratios = {"lorakit_dora/lorakit_lora": median_ratio(samples, "lorakit_dora", "lorakit_lora"),
              "peft_dora/peft_lora": median_ratio(samples, "peft_dora", "peft_lora"),
              "lorakit_dora/peft_dora": median_ratio(samples, "lorakit_dora", "peft_dora"),
              "lorakit_lora/peft_lora": median_ratio(samples, "lorakit_lora", "peft_lora")}
    cases = summarize(samples)
    print(f"  ms/step { {k: round(1000 * v['median_s']) for k, v in cases.items()} }, "
          f"ratios { {k: round(v, 3) for k, v in ratios.items()} }", flush=True)
    return {"check": checks, "cases": cases, "ratios": ratios}


def run(shape: dict, repeats: int, dropout: float, name: str, label: str, out_dir: str = "bench/results") -> dict:
    base = base_model(shape)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, shape["vocab_size"], (8, 128), generator=g) for _ in range(repeats + 1)]
    results = {}
    for targets_label, targets in TARGETS.items():
        print(f"targets {targets_label}", flush=True)
        results[targets_label] = run_targets(base, targets, batches, repeats, dropout)
    config = dict(model=label, shape=shape, batch=[8, 128], r=8, alpha=16, lora_dropout=dropout, repeats=repeats,
                  dtype="float32", step="forward + backward + AdamW")
    print(f"wrote {write_record(name, config, results, out_dir)}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama (hidden 64, 2 layers), 3 repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than SmolLM2's 30 (same widths)")
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (PEFT then recomputes W0 x on it)")
    args = parser.parse_args(argv)
    shape = dict(TINY if args.quick else SMOLLM2)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    label = "tiny random Llama" if args.quick else "SmolLM2-135M shape, random weights"
    run(shape, 3 if args.quick else args.repeats, args.dropout, "dora_quick" if args.quick else "dora", label)


if __name__ == "__main__":
    sys.exit(main())
