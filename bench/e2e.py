"""End to end: the ``make demo`` recipe run by ``lorakit train`` vs a plain PEFT +
transformers loop with the same hyperparameters (MiniLM, MRPC, LoRA r=8 alpha=16 on
query/value, dropout 0.1, batch 16, AdamW, warm-up 0.06 then linear decay, weight decay
0.1, clipping 1.0, seed 0). The PEFT loop is what a user writes from the HF examples:
inputs padded to max length 128 (``run_glue.py``'s default), a shuffled DataLoader.

Whole runs take minutes, so they run one after the other (not interleaved); the record
keeps per-epoch times of both, and the ratio of medians of epoch times besides the
wall-time ratio.

    python bench/e2e.py [--epochs 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch

from lorakit import data, train
from lorakit.benchtools import write_record
from lorakit.metrics import compute_metrics
from lorakit.tasks.glue import load_classifier


def peft_loop(cfg: train.TrainConfig, seed: int, data_dir=None) -> dict:
    import peft
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import get_linear_schedule_with_warmup

    task = data.get_task(cfg.task)
    torch.manual_seed(seed)
    tokenizer, model = load_classifier(cfg.model, task)
    model = peft.get_peft_model(model, peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout,
                                                       target_modules=["query", "value"], modules_to_save=["classifier"]))
    data_dir = data_dir or data.default_data_dir()

    def encode(split: str, limit: int | None) -> TensorDataset:
        examples = data.read_split(task, split, data_dir)[:limit]
        enc = tokenizer(*zip(*(e.texts for e in examples)), padding="max_length", truncation=True,
                        max_length=cfg.max_length, return_tensors="pt")
        return TensorDataset(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"],
                             torch.tensor([e.label for e in examples]))

    train_set, dev_set = encode("train", cfg.max_train_examples), encode("dev", cfg.max_eval_examples)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=cfg.lr)
    total = len(loader) * cfg.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    epochs = []
    for _ in range(cfg.epochs):
        start = time.perf_counter()
        model.train()
        for ids, mask, types, labels in loader:
            loss = model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        model.eval()
        preds = []
        with torch.no_grad():
            for ids, mask, types, _ in DataLoader(dev_set, batch_size=cfg.eval_batch_size):
                preds += model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.argmax(-1).tolist()
        metrics = compute_metrics(task.metrics, preds, dev_set.tensors[3].tolist())
        epochs.append({"seconds": time.perf_counter() - start, "dev": metrics})
    return {"epochs": epochs, "wall_seconds": sum(e["seconds"] for e in epochs),
            "best": max(epochs, key=lambda e: e["dev"][task.main_metric])["dev"]}


def lorakit_run(cfg: train.TrainConfig, seed: int) -> dict:
    summary = train.train(cfg, seed)
    task = data.get_task(cfg.task)
    epochs = [{"seconds": e["train_seconds"], "dev": e["dev"][task.dev_splits[0]]} for e in summary["epochs"]]
    return {"epochs": epochs, "wall_seconds": summary["wall_seconds"], "best": summary["best"][task.dev_splits[0]]}


def run(epochs: int, model: str = "minilm", max_train_examples: int | None = None, max_eval_examples: int | None = None,
        data_dir: str | None = None, name: str = "e2e", out_dir: str = "bench/results") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = train.resolve_config("demo", task="mrpc", model=model, epochs=epochs, out=tmp, progress=False, precision="fp32",
                                   max_train_examples=max_train_examples, max_eval_examples=max_eval_examples,
                                   data_dir=data_dir)
        ours = lorakit_run(cfg, 0)
    theirs = peft_loop(cfg, 0, data_dir)
    def epoch_median(run: dict) -> float:
        return statistics.median(e["seconds"] for e in run["epochs"])

    epoch_ratio = epoch_median(ours) / epoch_median(theirs)
    results = {"lorakit": ours, "peft_loop": theirs, "wall_ratio": ours["wall_seconds"] / theirs["wall_seconds"],
               "epoch_time_ratio": epoch_ratio}
    print(f"lorakit {ours['wall_seconds']:.0f}s best {ours['best']}; PEFT loop {theirs['wall_seconds']:.0f}s best "
          f"{theirs['best']}; wall ratio {results['wall_ratio']:.3f}", flush=True)
    write_record(name, dict(epochs=epochs, model=model, recipe={k: v for k, v in cfg.__dict__.items() if k != "out"}),
                 results, out_dir)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 epoch on 800 training examples")
    args = parser.parse_args(argv)
    if args.quick:
        run(1, max_train_examples=800, name="e2e_quick")
    else:
        run(args.epochs)


if __name__ == "__main__":
    sys.exit(main())
