"""``lorakit train --packing`` against unpacked batches: row tokens per second of the training step.

SmolLM2-135M-Instruct, the E2E demo recipe (r=4 alpha=32 on q/v, LoRA dropout 0.1, label
smoothing 0.1, AdamW, gradient clipping at 1.0, fp32 unless ``--precision``), one model and
optimizer for every case. A step is the loop's own (``training.loop.accumulate``: collate,
forward, backward; then clip, AdamW, schedule) on batches formed as ``lorakit train`` forms them
(``data.length_grouped_batches``, seed 0, epoch 0). Data:

- ``e2e``: the demo's rows (the first 8,000 E2E training rows, plain prompts), ``--max-length``
  128, batch 8; unpacked, 93% of the tokens a step computes are rows (ERRATA #28);
- ``mixed``: rows of varied lengths: 1,600 E2E rows (about 60 tokens) and 400 long rows (an MR
  and all its references as one completion: 76 to 1,154 tokens, median 258, the 60 over 384
  truncated), ``--max-length`` 384, batch 4.

Cases, timed in alternation (a round runs every case once, in a rotated order, each on its next
batches; a case's round holds about as many rows in each case):

- ``packed``: ``--packing``: the rows packed (``training.packing.pack``), one step of
  ``--batch-size`` sequences (TRL's meaning of the batch size under packing);
- ``unpacked``: the rows, steps of ``--batch-size`` rows, as many as a packed batch holds rows;
- ``unpacked_matched``: the rows unpacked, one step of as many rows as a packed batch holds on
  average: it tells what packing gains by filling sequences from what a larger batch gains.

Tokens per second count row tokens (not padding). The ratios ``packed`` / ``unpacked`` and
``packed`` / ``unpacked_matched`` are medians over rounds of the per-round ratio of tokens per
second (and, beside them, ratios of all rounds' tokens over all their seconds). Before timing,
with dropout off, the loss of the first packed batch equals the loss of its rows unpacked.

``--layers N`` times SmolLM2's shape cut to N decoder layers (random weights) for a shorter run
on a slow or busy machine: each layer costs what it costs in the model; the output layer, on the
loss positions only, weighs more.

    python bench/packing.py [--quick] [--rounds 8] [--layers N] [--precision fp32]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager

import torch

from lorakit import data, tasks
from lorakit.benchtools import check_close, write_record
from lorakit.distributed import World
from lorakit.models import resolve_model
from lorakit.precision import cpu_flags, native_bf16, precision_context
from lorakit.tasks import Split, lm
from lorakit.train import _optimizer, _prepare, resolve_config
from lorakit.training import loop
from lorakit.training import packing as packer

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
DATASETS = {"e2e": dict(max_length=128, batch=8), "mixed": dict(max_length=384, batch=4)}


def hardware() -> dict:
    return {"cpu_flags": sorted(set(FLAGS) & cpu_flags()), "native_bf16": native_bf16()}


def rows(name: str, quick: bool) -> list[dict[str, str]]:
    """The ``e2e`` or ``mixed`` training rows (fewer with ``quick``)."""
    train = lm.read_e2e("train")
    if name == "e2e":
        return [{"prompt": mr, "completion": ref} for mr, ref in train[: 800 if quick else 8000]]
    mrs, refs = lm.group_references(train)
    short = [{"prompt": mr, "completion": ref} for mr, ref in train[: 160 if quick else 1600]]
    long = [{"prompt": mr, "completion": " ".join(group)} for mr, group in zip(mrs, refs)][: 40 if quick else 400]
    mixed = []
    for i, row in enumerate(long):  # a long row after every 4 short ones
        mixed += [*short[4 * i : 4 * i + 4], row]
    return mixed


def setup(model: str, precision: str):
    """(task, loss module, optimizer, scheduler, grad clip) as ``lorakit train --task e2e --preset demo`` builds them."""
    cfg = resolve_config("demo", task="e2e", model=model, prompt_format="plain", progress=False, precision=precision)
    task = tasks.create(cfg)
    tokenizer, net = _prepare(cfg, task)
    task.tokenizer = tokenizer
    optimizer, scheduler = _optimizer(net, cfg, total_steps=1000)
    return task, task.loss_module(net), optimizer, scheduler, cfg.grad_clip


def splits(task, source: list[dict[str, str]], max_length: int, batch: int) -> dict[str, tuple[Split, int, int]]:
    """Each case's split, batch size and steps per round (about as many row tokens in each case's round)."""
    encoded = [lm.encode(task.tokenizer, row, "plain", max_length) for row in source]
    split = Split([f for f in encoded if f is not None])
    packed = packer.pack(split, max_length, seed=0)
    matched = round(batch * len(split) / len(packed))  # rows in a packed batch, on average
    return {"unpacked": (split, batch, max(1, round(matched / batch))), "packed": (packed, batch, 1),
            "unpacked_matched": (split, matched, 1)}


def stepper(parts, split: Split, order: list[list[int]], precision: str, steps: int):
    """``steps`` training steps of the loop on the next batches of ``order``; returns their row tokens."""
    task, loss_fn, optimizer, scheduler, clip = parts
    trainable = [p for p in loss_fn.parameters() if p.requires_grad]
    queue = iter(order)

    def step() -> int:
        batch = next(queue)
        loss_fn.train()
        loop.accumulate(loss_fn, task, split, batch, len(batch), World(), precision)
        norm = torch.nn.utils.clip_grad_norm_(trainable, clip if clip > 0 else math.inf).item()
        if not math.isfinite(norm):
            raise FloatingPointError(f"gradient norm {norm}")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(split.lengths[i] for i in batch)

    return lambda: sum(step() for _ in range(steps))


def check_same_loss(parts, cases: dict[str, tuple[Split, int, int]], order: list[list[int]], precision: str) -> dict:
    """The first packed batch's loss equals its rows' unpacked loss (dropout off)."""
    task, loss_fn = parts[0], parts[1]
    split, packed = cases["unpacked"][0], cases["packed"][0]
    members = [i for s in order[0] for i in packed.targets[s]]
    loss_fn.eval()
    with torch.no_grad(), precision_context(precision):
        ours = loss_fn(**task.collate(packed, order[0]))
        theirs = loss_fn(**task.collate(split, members))
    check_close(ours, theirs, "packed vs unpacked loss (dropout off)", rtol=1e-5, atol=1e-6)
    return {"loss": theirs.item(), "abs_diff": (ours - theirs).abs().item(), "rows": len(members)}


def computed_share(split: Split, order: list[list[int]]) -> float:
    """Row tokens / tokens computed (padded to a multiple of 8) over the batches of ``order``."""
    real = sum(split.lengths[i] for b in order for i in b)
    return real / sum(data.padded_width(split.lengths[i] for i in b) * len(b) for b in order)


def measure(parts, cases: dict[str, tuple[Split, int, int]], rounds: int, precision: str) -> dict:
    """Rounds of every case in turn (rotated order); per case and round: seconds and row tokens."""
    orders = {k: data.length_grouped_batches(s.lengths, b, seed=0, epoch=0) for k, (s, b, _) in cases.items()}
    runs = {k: stepper(parts, s, orders[k], precision, n) for k, (s, _, n) in cases.items()}
    check = check_same_loss(parts, cases, orders["packed"], precision)
    print(f"  same loss packed and unpacked: {check}", flush=True)
    names = list(cases)
    for name in names:  # warm-up
        runs[name]()
    seconds: dict[str, list[float]] = {k: [] for k in names}
    tokens: dict[str, list[int]] = {k: [] for k in names}
    for i in range(rounds):
        for name in names[i % len(names):] + names[: i % len(names)]:
            start = time.perf_counter()
            tokens[name].append(runs[name]())
            seconds[name].append(time.perf_counter() - start)
    speed = {k: [t / s for t, s in zip(tokens[k], seconds[k])] for k in names}
    overall = {k: sum(tokens[k]) / sum(seconds[k]) for k in names}
    out = {"check": check, "rows": len(cases["unpacked"][0]), "sequences": len(cases["packed"][0]),
           "batch_sizes": {k: b for k, (_, b, _) in cases.items()},
           "steps_per_round": {k: n for k, (_, _, n) in cases.items()},
           "row_share_of_computed_tokens": {k: computed_share(cases[k][0], orders[k]) for k in names},
           "cases": {k: {"median_s": statistics.median(seconds[k]), "samples_s": seconds[k], "tokens": tokens[k],
                         "median_tokens_per_s": statistics.median(speed[k])} for k in names},
           "tokens_per_s": overall,
           # the median over rounds of the per-round ratio (benchtools' convention), and the ratio of the totals
           "ratios": {f"packed/{k} tokens/s": statistics.median(p / q for p, q in zip(speed["packed"], speed[k]))
                      for k in ("unpacked", "unpacked_matched")},
           "ratios_of_totals": {f"packed/{k} tokens/s": overall["packed"] / overall[k]
                                for k in ("unpacked", "unpacked_matched")}}
    print(f"  tokens/s { {k: round(v) for k, v in overall.items()} }, ratios (median of rounds) "
          f"{ {k: round(v, 3) for k, v in out['ratios'].items()} }", flush=True)
    return out


def run(model: str, label: str, rounds: int, precision: str, quick: bool, name: str,
        out_dir: str = "bench/results") -> dict:
    torch.manual_seed(0)
    parts = setup(model, precision)
    results = {}
    for key, recipe in DATASETS.items():
        cases = splits(parts[0], rows(key, quick), recipe["max_length"], recipe["batch"])
        print(f"{key}: {len(cases['unpacked'][0])} rows, {len(cases['packed'][0])} packed sequences of up to "
              f"{recipe['max_length']} tokens", flush=True)
        results[key] = measure(parts, cases, rounds, precision)
    config = dict(model=label, recipe="e2e demo (r=4 alpha=32 q/v, dropout 0.1, label smoothing 0.1)",
                  precision=precision, rounds=rounds, datasets=DATASETS, **hardware())
    write_record(name, config, results, out_dir)
    return results


@contextmanager
def model_folder(quick: bool, layers: int | None):
    """SmolLM2; with ``layers``, its shape cut to that many decoder layers, random weights; ``quick``: a tiny
    random Llama. Each with SmolLM2's tokenizer."""
    from lm_step import model_folder as smollm2_or_tiny

    if quick or layers is None:
        with smollm2_or_tiny(quick) as path:
            yield path
        return
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    path = resolve_model("smollm2")
    torch.manual_seed(0)
    model = LlamaForCausalLM(AutoConfig.from_pretrained(path, num_hidden_layers=layers))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(path).save_pretrained(tmp)
        yield tmp


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama, a tenth of the rows, 2 rounds")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--layers", type=int, help="SmolLM2-135M's shape with this many of its 30 decoder layers, "
                                                   "random weights (a shorter run; default: the model itself)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    args = parser.parse_args(argv)
    label = ("tiny random Llama (hidden 64, 2 layers)" if args.quick else "smollm2" if args.layers is None else
             f"SmolLM2-135M shape, {args.layers} of 30 layers, random weights")
    with model_folder(args.quick, args.layers) as model:
        run(model, label, 2 if args.quick else args.rounds, args.precision, args.quick,
            "packing" + ("_quick" if args.quick else ""))


if __name__ == "__main__":
    sys.exit(main())
