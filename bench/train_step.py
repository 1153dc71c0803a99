"""Training step time: lorakit LoRA vs PEFT LoRA vs full fine-tuning.

One step = forward + backward + AdamW step, batch 16 x sequence 128 (random tokens),
r=8 alpha=16 on query/value, classifier head trained. Models: the embedded MiniLM and a
random-init RoBERTa-base (``RobertaConfig()``); with the models' dropout 0.1 and LoRA
dropout 0.1, and with all dropout 0; fp32 and bf16 autocast. The cases of each setting
are timed in alternation; before timing, lorakit's and PEFT's logits are checked equal.
``lorakit_fast`` is lorakit with fast dropout (what ``lorakit train`` runs when dropout
applies); ``trainer_bf16`` is that step under ``--precision bf16``, timed with the fp32 cases.

    python bench/train_step.py [--quick] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import tempfile
from contextlib import nullcontext

import torch

import lorakit
from lorakit.benchtools import check_close, interleave, median_ratio, summarize, write_record
from lorakit.fastops import use_fast_dropout
from lorakit.models import resolve_model

TARGETS = ["query", "value"]


def base_model(kind: str, dropout: float):
    """A sequence classifier: ``minilm`` (pretrained, embedded), ``roberta-base`` (random), ``tiny``."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig, RobertaConfig
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    drop = dict(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, num_labels=2)
    if kind == "minilm":
        path = resolve_model("minilm")
        return AutoModelForSequenceClassification.from_pretrained(path, config=AutoConfig.from_pretrained(path, **drop))
    if kind == "roberta-base":
        return AutoModelForSequenceClassification.from_config(RobertaConfig(**drop))
    if kind == "tiny":
        return AutoModelForSequenceClassification.from_config(
            BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, **drop))
    raise ValueError(f"unknown model {kind!r}")


def make_batch(model, batch: int, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    return {"input_ids": torch.randint(5, vocab, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch,), generator=g)}


def attach(case: str, base, r: int, lora_dropout: float):
    """``base`` (changed in place) with LoRA from lorakit or PEFT, or fully trainable. PEFT is imported for its case
    only: bench/memory.py runs each case in a process of its own, whose peak memory then holds no library it
    does not use (bench/results/memory*.json recorded before this counted PEFT's import in every case)."""
    if case == "lorakit":
        return lorakit.add_lora(base, lorakit.LoraConfig(r=r, alpha=2 * r, dropout=lora_dropout, target_modules=TARGETS,
                                                         modules_to_save=["classifier"]))
    if case == "peft":
        import peft

        return peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=lora_dropout,
                                                         target_modules=TARGETS, modules_to_save=["classifier"]))
    return base


def lora_pair(base, r: int, lora_dropout: float):
    """lorakit and PEFT models with identical, non-trivial factors (loaded from one file)."""
    import peft

    ours = attach("lorakit", copy.deepcopy(base), r, lora_dropout)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in lorakit.lora_parameters(ours):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    with tempfile.TemporaryDirectory() as tmp:
        lorakit.save_adapter(ours, tmp)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp, is_trainable=True)
    return ours, theirs


def step_fn(model, batch, precision: str):
    """A closure running one training step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext

    def step():
        model.train()
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def check_same_logits(ours, theirs, batch) -> None:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        check_close(ours(**inputs).logits, theirs(**inputs).logits, "lorakit vs PEFT logits")


def run(models: list[str], dropouts: list[float], precisions: list[str], repeats: int, batch: int = 16,
        seq: int = 128, r: int = 8, name: str = "train_step", out_dir: str = "bench/results") -> dict:
    results = {}
    for kind, dropout in itertools.product(models, dropouts):
        base = base_model(kind, dropout)
        data = make_batch(base, batch, seq)
        ours, theirs = lora_pair(base, r, dropout)
        check_same_logits(ours, theirs, data)
        full = copy.deepcopy(base)
        fast = None
        if dropout > 0:  # the fast path: lorakit with fast dropout in LoRA and in the model
            fast = copy.deepcopy(ours)
            use_fast_dropout(fast)
            check_same_logits(fast, theirs, data)
        for precision in precisions:
            cases = {"lorakit": step_fn(ours, data, precision), "peft": step_fn(theirs, data, precision),
                     "full": step_fn(full, data, precision)}
            if fast is not None:
                cases["lorakit_fast"] = step_fn(fast, data, precision)
            trainer = fast if fast is not None else ours  # what `lorakit train` runs
            if precision == "fp32":  # the --precision bf16 option against it, interleaved
                cases["trainer_bf16"] = step_fn(copy.deepcopy(trainer), data, "bf16")
            samples = interleave(cases, repeats=repeats)
            key = f"{kind}/dropout={dropout}/{precision}"
            results[key] = {"cases": summarize(samples),
                            "ratios": {"lorakit/peft": median_ratio(samples, "lorakit", "peft"),
                                       "lorakit/full": median_ratio(samples, "lorakit", "full"),
                                       "peft/full": median_ratio(samples, "peft", "full")}}
            if fast is not None:
                results[key]["ratios"]["lorakit_fast/peft"] = median_ratio(samples, "lorakit_fast", "peft")
                results[key]["ratios"]["lorakit_fast/full"] = median_ratio(samples, "lorakit_fast", "full")
            if "trainer_bf16" in cases:
                results[key]["ratios"]["trainer bf16/fp32"] = median_ratio(
                    samples, "trainer_bf16", "lorakit_fast" if fast is not None else "lorakit")
            ms = {k: f"{1000 * v['median_s']:.0f}" for k, v in results[key]["cases"].items()}
            ratios = {k: round(v, 3) for k, v in results[key]["ratios"].items()}
            print(f"{key}: ms/step {ms}, ratios {ratios}", flush=True)
    config = dict(models=models, dropouts=dropouts, precisions=precisions, repeats=repeats, batch=batch, seq=seq, r=r)
    write_record(name, config, results, out_dir)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="MiniLM only, fp32 only, 3 repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="minilm,roberta-base")
    args = parser.parse_args(argv)
    if args.quick:
        run(["minilm"], [0.1, 0.0], ["fp32"], repeats=3, name="train_step_quick")
    else:
        run(args.models.split(","), [0.1, 0.0], ["fp32", "bf16"], repeats=args.repeats)


if __name__ == "__main__":
    sys.exit(main())
