"""Causal-LM training step on real E2E batches: ``lorakit train``'s step vs a PEFT user's step.

SmolLM2-135M-Instruct (Llama, 30 layers, vocabulary 49152), E2E training rows in the
plain prompt format (``mr``, newline, reference, EOS; loss on the completion only),
batches of 8 formed as ``lorakit train`` forms them (``data.length_grouped_batches``,
seed 0, epoch 0, demo preset: the first 8000 rows, max length 128), r=4 alpha=32 on
q_proj/v_proj, LoRA dropout 0.1, label smoothing 0.1, AdamW with a linear schedule,
gradient clipping at 1.0. One step = forward, backward, clip, AdamW, schedule. Cases:

- ``peft``: what a user writes: ``peft.get_peft_model(AutoModelForCausalLM..., LoraConfig(...,
  task_type="CAUSAL_LM"))``, the model's full logits ``(B, T, V)`` and
  ``F.cross_entropy(logits[:, :-1], labels[:, 1:], label_smoothing=0.1)`` (``-100`` on prompt
  and padding; labels are not passed to the model, so it computes no second, unsmoothed loss),
  torch dropout, fp32;
- ``lorakit``: the step of ``lorakit train --task e2e --preset demo``: the model from
  ``train._prepare`` (LoRA attached, fast dropout), the task's ``loss_module``
  (``CausalLMLoss``: LM head on completion positions only), its optimizer and schedule, fp32;
- ``lorakit_bf16``: the same under ``--precision bf16`` (only where ``precision.native_bf16()``).

Before timing, with dropout off and the same non-trivial factors in both (lorakit's random
A and B copied into PEFT's), lorakit and PEFT must give the same loss and the same gradient
of every LoRA factor. The cases are timed in alternation; round ``i`` runs batch ``i`` in
every case. ``--memory``: each case in its own process runs ``--memory-steps`` steps; its
peak RSS over the training steps (the high-water mark reset after loading and paging in the
weights) is reported, and its increase over the RSS before the first step.

    python bench/lm_step.py [--quick] [--repeats 8] [--memory]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import resource
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from lorakit import data, lora_layers, tasks
from lorakit.benchtools import check_close, interleave, median_ratio, summarize, write_record
from lorakit.models import resolve_model
from lorakit.precision import cpu_flags, native_bf16, precision_context
from lorakit.train import _optimizer, _prepare, resolve_config

TARGETS = ["q_proj", "v_proj"]
IGNORE = -100
# CPU features that decide the speed of fp32 / bf16 matmuls (recorded with every result).
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def hardware() -> dict:
    return {"cpu_flags": sorted(set(FLAGS) & cpu_flags()), "native_bf16": native_bf16()}


@contextmanager
def model_folder(quick: bool):
    """SmolLM2's folder, or (quick) a tiny random Llama saved with SmolLM2's tokenizer."""
    path = resolve_model("smollm2")
    if not quick:
        yield path
        return
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    with tempfile.TemporaryDirectory() as tmp:
        LlamaForCausalLM(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        yield tmp


def train_config(model: str, precision: str = "fp32", checkpointing: bool = False):
    return resolve_config("demo", task="e2e", model=model, prompt_format="plain", progress=False, precision=precision,
                          gradient_checkpointing=checkpointing)


def real_batches(model: str, n: int) -> list[dict[str, torch.Tensor]]:
    """The first ``n`` training batches of epoch 0, as ``lorakit train`` collates them."""
    cfg = train_config(model)
    task = tasks.create(cfg)
    from transformers import AutoTokenizer

    task.tokenizer = tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train, _ = task.read(tokenizer)
    order = data.length_grouped_batches(train.lengths, cfg.batch_size, seed=0, epoch=0)
    if len(order) < n:
        raise ValueError(f"{n} batches asked, the demo split has {len(order)}")
    return [task.collate(train, rows) for rows in order[:n]]


# ---- the two training steps ----------------------------------------------------------------


def lorakit_case(model: str, precision: str = "fp32", checkpointing: bool = False):
    """(model, loss module, optimizer, scheduler, grad clip) exactly as ``lorakit train`` builds them."""
    cfg = train_config(model, precision, checkpointing)
    task = tasks.create(cfg)
    _, lm = _prepare(cfg, task)
    adapted = {name.rsplit(".", 1)[-1] for name, _ in lora_layers(lm)}
    if adapted != set(TARGETS):
        raise ValueError(f"lorakit train adapted {sorted(adapted)}, the benchmark compares {TARGETS}")
    optimizer, scheduler = _optimizer(lm, cfg, total_steps=1000)
    return lm, task.loss_module(lm), optimizer, scheduler, cfg.grad_clip


class PeftLoss(torch.nn.Module):
    """A PEFT user's label-smoothed completion loss: full logits, shifted, ``-100`` ignored."""

    def __init__(self, model, label_smoothing: float) -> None:
        super().__init__()
        self.model, self.label_smoothing = model, label_smoothing

    def forward(self, input_ids, attention_mask, labels):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE,
                               label_smoothing=self.label_smoothing)


def peft_case(model: str):
    import peft
    from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup
    from transformers.utils import logging

    logging.set_verbosity_error()
    cfg = train_config(model)
    base = AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=torch.float32)
    lm = peft.get_peft_model(base, peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout,
                                                   target_modules=TARGETS, task_type="CAUSAL_LM"))
    params = [p for p in lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, 1000)
    return lm, PeftLoss(lm, cfg.label_smoothing), optimizer, scheduler, cfg.grad_clip


# lorakit's cases: (precision, gradient checkpointing); "lorakit_ckpt" is --gradient-checkpointing
LORAKIT_CASES = {"lorakit": ("fp32", False), "lorakit_bf16": ("bf16", False), "lorakit_ckpt": ("fp32", True)}


def build(case: str, model: str):
    return peft_case(model) if case == "peft" else lorakit_case(model, *LORAKIT_CASES[case])


def stepper(parts, batches: list[dict[str, torch.Tensor]], precision: str):
    """A closure running one training step on the next batch (as ``train._train_epoch`` does)."""
    _, loss_fn, optimizer, scheduler, clip = parts
    trainable = [p for p in loss_fn.parameters() if p.requires_grad]
    queue = itertools.cycle(batches)

    def step() -> None:
        loss_fn.train()
        with precision_context(precision):
            loss = loss_fn(**next(queue))
        value = loss.item()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(trainable, clip if clip > 0 else math.inf).item()
        if not (math.isfinite(value) and math.isfinite(norm)):
            raise FloatingPointError(f"loss {value}, gradient norm {norm}")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# ---- correctness before timing -------------------------------------------------------------


def share_factors(ours, theirs) -> None:
    """Random non-zero A and B in lorakit's layers, copied into PEFT's."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            peft_layer = theirs.base_model.model.get_submodule(name)
            for mine, other in ((layer.lora_A["default"], peft_layer.lora_A["default"].weight),
                                (layer.lora_B["default"], peft_layer.lora_B["default"].weight)):
                mine.copy_(torch.randn(mine.shape, generator=g) * 0.02)
                other.copy_(mine)


@torch.no_grad()
def eval_loss(loss_fn, batch, precision: str) -> torch.Tensor:
    loss_fn.eval()
    with precision_context(precision):
        return loss_fn(**batch)


def loss_and_grads(loss_fn, ours_layers: list[str], factors, batch, precision: str = "fp32"):
    """Loss with dropout off, and the gradients of the LoRA factors in ``ours_layers``' order."""
    loss_fn.eval()
    with precision_context(precision):
        loss = loss_fn(**batch)
    loss.backward()
    grads = torch.cat([g for name in ours_layers for g in factors(name)])
    loss_fn.zero_grad(set_to_none=True)
    return loss.detach(), grads


def check_same_step(ours_parts, theirs_parts, batch) -> dict:
    """lorakit and PEFT: the same loss and LoRA gradients (dropout off, same factors)."""
    ours, theirs = ours_parts[0], theirs_parts[0]
    share_factors(ours, theirs)
    layers = dict(lora_layers(ours))
    names = list(layers)

    def mine(name):
        return [layers[name].lora_A["default"].grad.flatten(), layers[name].lora_B["default"].grad.flatten()]

    def peft_grads(name):
        m = theirs.base_model.model.get_submodule(name)
        return [m.lora_A["default"].weight.grad.flatten(), m.lora_B["default"].weight.grad.flatten()]

    loss_a, grad_a = loss_and_grads(ours_parts[1], names, mine, batch)
    loss_b, grad_b = loss_and_grads(theirs_parts[1], names, peft_grads, batch)
    check_close(loss_a, loss_b, "lorakit vs PEFT loss (dropout off)", rtol=1e-5, atol=1e-5)
    # The LM head sums over a subset of positions in another order: fp32 rounding of 30 layers'
    # backward, measured against the largest gradient entry.
    scale = grad_b.abs().max().item()
    check_close(grad_a, grad_b, "lorakit vs PEFT LoRA gradients (dropout off)", rtol=1e-3, atol=1e-4 * scale)
    if scale == 0:
        raise AssertionError("the LoRA gradients are all zero: the check could not fail")
    return {"loss": loss_a.item(), "loss_abs_diff": (loss_a - loss_b).abs().item(),
            "grad_max_abs_diff": (grad_a - grad_b).abs().max().item(), "grad_max_abs": scale}


# ---- timing --------------------------------------------------------------------------------


def run(model_name: str, label: str, repeats: int, name: str, out_dir: str = "bench/results") -> dict:
    batches = real_batches(model_name, repeats + 1)
    torch.manual_seed(0)
    parts = {"peft": build("peft", model_name), "lorakit": build("lorakit", model_name)}
    check = check_same_step(parts["lorakit"], parts["peft"], batches[0])
    print(f"same loss and LoRA gradients: {check}", flush=True)
    precisions = {"peft": "fp32", "lorakit": "fp32", "lorakit_ckpt": "fp32"}
    parts["lorakit_ckpt"] = build("lorakit_ckpt", model_name)
    parts["lorakit_ckpt"][0].load_state_dict(parts["lorakit"][0].state_dict())
    check["ckpt_loss"] = eval_loss(parts["lorakit_ckpt"][1], batches[0], "fp32").item()
    if native_bf16():
        parts["lorakit_bf16"] = build("lorakit_bf16", model_name)
        parts["lorakit_bf16"][0].load_state_dict(parts["lorakit"][0].state_dict())
        bf16_loss = eval_loss(parts["lorakit_bf16"][1], batches[0], "bf16")
        # bf16 autocast rounds every matmul input to 8 bits of mantissa: a loose check that it trains the same model
        check_close(bf16_loss, torch.tensor(check["loss"]), "lorakit bf16 vs fp32 loss", rtol=3e-2, atol=0)
        check["bf16_loss"] = bf16_loss.item()
        precisions["lorakit_bf16"] = "bf16"
    samples = interleave({k: stepper(parts[k], batches, precisions[k]) for k in parts}, repeats=repeats)
    tokens = [int(b["attention_mask"].sum()) for b in batches[1:]]
    results = {"check": check, "cases": summarize(samples), "batch_shapes": [list(b["input_ids"].shape) for b in batches],
               "tokens_per_s": {k: sum(tokens) / sum(s) for k, s in samples.items()},
               "ratios": {"lorakit/peft": median_ratio(samples, "lorakit", "peft"),
                          "lorakit_ckpt/peft": median_ratio(samples, "lorakit_ckpt", "peft")}}
    if "lorakit_bf16" in samples:
        results["ratios"]["lorakit_bf16/peft"] = median_ratio(samples, "lorakit_bf16", "peft")
        results["ratios"]["lorakit_bf16/lorakit"] = median_ratio(samples, "lorakit_bf16", "lorakit")
    ms = {k: f"{1000 * v['median_s']:.0f}" for k, v in results["cases"].items()}
    tps = {k: f"{v:.0f}" for k, v in results["tokens_per_s"].items()}
    print(f"ms/step {ms}, tokens/s {tps}, ratios { {k: round(v, 3) for k, v in results['ratios'].items()} }")
    config = dict(model=label, task="e2e", preset="demo", prompt_format="plain", batch=8, r=4, alpha=32,
                  targets=TARGETS, lora_dropout=0.1, label_smoothing=0.1, repeats=repeats, **hardware())
    write_record(name, config, results, out_dir)
    return results


# ---- memory --------------------------------------------------------------------------------


def _status_mb(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def child(case: str, model_name: str, batches_file: str) -> dict:
    batches = torch.load(batches_file)
    parts = build(case, model_name)
    step = stepper(parts, batches, LORAKIT_CASES.get(case, ("fp32",))[0])
    with torch.no_grad():  # page in the weights (loaded memory-mapped): "loaded" then counts them
        for p in parts[0].parameters():
            p.sum()
    loaded = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark: training steps only from here
    for _ in batches:
        step()
    train_peak = _status_mb("VmHWM")
    return {"loaded_rss_mb": loaded, "train_peak_rss_mb": train_peak, "train_increase_mb": train_peak - loaded,
            "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_memory(model_name: str, label: str, steps: int, name: str, out_dir: str = "bench/results") -> dict:
    cases = ["peft", "lorakit", "lorakit_ckpt"] + (["lorakit_bf16"] if native_bf16() else [])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        batches = real_batches(model_name, steps)
        torch.save(batches, f"{tmp}/batches.pt")
        for case in cases:
            cmd = [sys.executable, __file__, "--child", case, "--model", model_name, "--batches", f"{tmp}/batches.pt"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{case} child failed:\n{done.stderr[-3000:]}")
            results[case] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{case}: {json.dumps({k: round(v) for k, v in results[case].items()})}", flush=True)
    ratios = {f"{c}/peft": results[c]["train_peak_rss_mb"] / results["peft"]["train_peak_rss_mb"] for c in cases[1:]}
    ratios.update({f"{c}/peft increase": results[c]["train_increase_mb"] / results["peft"]["train_increase_mb"]
                   for c in cases[1:]})
    print(f"ratios: { {k: round(v, 3) for k, v in ratios.items()} }")
    config = dict(model=label, task="e2e", preset="demo", prompt_format="plain", batch=8, steps=steps,
                  batch_shapes=[list(b["input_ids"].shape) for b in batches], **hardware())
    write_record(name, config, {"cases": results, "ratios": ratios}, out_dir)
    return {"cases": results, "ratios": ratios}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama, 3 repeats (2 memory steps)")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--memory", action="store_true", help="peak memory per case (child processes) instead of time")
    parser.add_argument("--memory-steps", type=int, default=4)
    parser.add_argument("--child", choices=("peft", *LORAKIT_CASES), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--batches", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.model, args.batches)))
        return
    suffix = "_quick" if args.quick else ""
    label = "tiny random Llama (hidden 64, 2 layers)" if args.quick else "smollm2"
    with model_folder(args.quick) as model:
        if args.memory:
            run_memory(model, label, 2 if args.quick else args.memory_steps, "lm_memory" + suffix)
        else:
            run(model, label, 3 if args.quick else args.repeats, "lm_step" + suffix)


if __name__ == "__main__":
    sys.exit(main())
