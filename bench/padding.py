"""A long training process: batches padded to their longest row, or rounded up to a multiple of 8.

Each variant trains LoRA (r=8, alpha 16, query/value, fast dropout, ``--precision auto``) on
MRPC for several epochs in its own process, one thread each, the variants side by side so
they share the machine's conditions; each epoch ends with a dev pass (batch 64). Per epoch
the record has the seconds, the resident memory and glibc's heap statistics (bytes in use,
bytes free inside the heap, free chunks); the ratio of the epoch times (multiple / longest)
is a median over epochs.

    python bench/padding.py [--quick] [--epochs 6] [--model minilm]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import lorakit
from lorakit import data
from lorakit.benchtools import write_record
from lorakit.fastops import use_fast_dropout
from lorakit.precision import precision_context, resolve_precision
from lorakit.tasks import glue


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def memory() -> dict[str, float]:
    """Resident MB, and glibc's heap in use / free (MB) and free chunks where glibc has mallinfo2."""
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    out = {"rss_mb": round(rss)}
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return out
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return out | {"heap_in_use_mb": info.uordblks >> 20, "heap_free_mb": info.fordblks >> 20, "free_chunks": info.ordblks}


def worker(model_name: str, multiple: int, epochs: int, max_examples: int | None) -> None:
    """Train and print one JSON line per epoch."""
    torch.manual_seed(0)
    task = data.get_task("mrpc")
    tokenizer, model = glue.load_classifier(model_name, task, "cls")
    model = lorakit.add_lora(model, lorakit.LoraConfig(r=8, alpha=16, dropout=0.1, target_modules=["query", "value"],
                                                       modules_to_save=["classifier"]))
    use_fast_dropout(model)
    where = data.default_data_dir()
    train = glue.tokenize(tokenizer, data.read_split(task, "train", where)[:max_examples], 512)
    dev = glue.tokenize(tokenizer, data.read_split(task, "dev", where)[:max_examples], 512)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=4e-4)
    precision = resolve_precision("auto")
    pad = tokenizer.pad_token_id or 0

    def batch(split, rows):
        return data.collate([split.features[i] for i in rows], [split.targets[i] for i in rows], pad, False, multiple)

    for epoch in range(epochs):
        start, tokens = time.perf_counter(), 0
        model.train()
        for rows in data.length_grouped_batches(train.lengths, 16, seed=0, epoch=epoch):
            inputs = batch(train, rows)
            tokens += inputs["input_ids"].numel()
            with precision_context(precision):
                loss = model(**inputs).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad(), precision_context(precision):
            for rows in data.sequential_batches(len(dev), 64, dev.lengths):
                inputs = batch(dev, rows)
                inputs.pop("labels")
                model(**inputs)
        print(json.dumps({"epoch": epoch + 1, "seconds": round(time.perf_counter() - start, 2),
                          "padded_tokens": tokens, "precision": precision, **memory()}), flush=True)


def run(model_name: str, epochs: int, max_examples: int | None, multiples: list[int], name: str,
        out_dir: str = "bench/results") -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, __file__, "--model", model_name, "--epochs", str(epochs)]
    if max_examples:
        base += ["--max-examples", str(max_examples)]
    procs = {m: subprocess.Popen(base + ["--worker", str(m)], stdout=subprocess.PIPE, text=True, env=env)
             for m in multiples}
    epochs_of = {}
    for m, proc in procs.items():
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"the worker padding to a multiple of {m} failed (exit {proc.returncode})")
        epochs_of[m] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    first, *others = multiples
    results = {f"multiple={m}": {"epochs": epochs_of[m],
                                 "median_epoch_s": statistics.median(e["seconds"] for e in epochs_of[m])}
               for m in multiples}
    for m in others:
        pairs = list(zip(epochs_of[m], epochs_of[first]))
        results[f"multiple={m}"] |= {
            f"epoch time / multiple={first}": round(statistics.median(a["seconds"] / b["seconds"] for a, b in pairs), 3),
            f"last-epoch rss / multiple={first}": round(pairs[-1][0]["rss_mb"] / pairs[-1][1]["rss_mb"], 3),
            f"padded tokens / multiple={first}": round(pairs[0][0]["padded_tokens"] / pairs[0][1]["padded_tokens"], 3)}
    for m in multiples:
        last = epochs_of[m][-1]
        print(f"multiple {m}: epoch s {[e['seconds'] for e in epochs_of[m]]}, rss MB "
              f"{[e['rss_mb'] for e in epochs_of[m]]}, last epoch {last}", flush=True)
    config = dict(model=model_name, epochs=epochs, max_examples=max_examples, multiples=multiples, batch=16,
                  threads_per_variant=1)
    write_record(name, config, results, out_dir)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 epochs of 400 examples")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--max-examples", type=int)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.model, args.worker, args.epochs, args.max_examples)
    elif args.quick:
        run(args.model, 2, 400, [1, data.PAD_MULTIPLE], "padding_quick")
    else:
        run(args.model, args.epochs, args.max_examples, [1, data.PAD_MULTIPLE], "padding")


if __name__ == "__main__":
    sys.exit(main())
