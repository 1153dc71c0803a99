"""Quality guard of quantized decoding (#27 item 4): int8 / int4 weights against fp32, per adapter, on E2E.

Formats (``lorakit.quant.linear.quantize_linears``, adapters kept in float32): ``int8`` = q8_0 layers and head;
``int4`` = q4_1 layers with a q8_0 LM head (GGUF's layout). The kernels' activations are ``$LORAKIT_QUANT_ACT``'s
(int8 blocks by default, or fp32; :mod:`lorakit.quant.kernels`), recorded as ``activations``.

- **Agreement**: the fp32 model's greedy completion (at most ``--max-new-tokens``, then its EOS if it stopped)
  of each of the first ``--max-examples`` unique E2E test MRs; then prompt + that completion through each model
  once (teacher-forced), and the share of completion positions where the model's top-1 token is the fp32
  token. ``fp32`` against its own completions is the floor of the measure (1.0 unless batched, left-padded
  generation and one unpadded forward round a near-tie differently).
- **BLEU** (unless ``--skip-bleu``): ``lorakit.tasks.lm.evaluate_e2e`` on the same MRs with the paper's
  decoding (beam 10, length penalty 0.9, no repeated 4-grams: what ``lorakit eval`` uses), all five metrics
  per format, and each format's BLEU minus fp32's in points (BLEU x 100). ``--bleu-adapters`` limits it.

Prompts are built as ``lorakit eval`` builds them (task.json: prompt_format, prompt_separator); the base model
is task.json's unless ``--model``. The record is rewritten after every adapter and format, so a long run that
stops early keeps what it measured.

    OMP_NUM_THREADS=1 python bench/quant_quality.py --adapter e2e-1500=RUN/seed0/adapter \\
        --adapter e2e-demo=RUN2/seed0/adapter [--max-examples 100] [--skip-bleu] [--bleu-adapters e2e-1500]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from lorakit.benchtools import write_record
from lorakit.generate import PAPER_DECODING, Decoding, generate_ids
from lorakit.io import load_adapter
from lorakit.tasks.lm import evaluate_e2e, group_references, load_causal_lm, prompt_ids, read_e2e

FORMATS = {"int8": ("q8_0", "q8_0"), "int4": ("q4_1", "q8_0")}  # name: (layers, LM head)


def load_adapted(adapter: str | Path, model: str | None = None) -> tuple[dict, object, nn.Module]:
    """(task.json, tokenizer, float32 causal LM with the adapter attached, in eval mode)."""
    info = json.loads((Path(adapter) / "task.json").read_text())
    if info.get("task") != "e2e":
        raise ValueError(f"{adapter}: task.json names task {info.get('task')!r}; this benchmark scores E2E adapters")
    tokenizer, lm = load_causal_lm(model or info["model"])  # a float32 base
    load_adapter(lm, adapter)
    return info, tokenizer, lm.eval()


def quantized(model: nn.Module, fmt: str) -> nn.Module:
    """A copy of ``model`` with its linear layers and head in ``FORMATS[fmt]`` (LoRA factors stay float32)."""
    from lorakit.quant.linear import quantize_linears

    layers, head = FORMATS[fmt]
    out = copy.deepcopy(model)
    quantize_linears(out, layers, head)
    return out.eval()


def greedy_completions(model: nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                       batch_size: int) -> list[list[int]]:
    """Each prompt's greedy completion, with the EOS that ended it (none when it ran to ``max_new_tokens``)."""
    ids = generate_ids(model, prompts, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                       decoding=Decoding(max_new_tokens=max_new_tokens), batch_size=batch_size)
    return [c + [tokenizer.eos_token_id] if len(c) < max_new_tokens else c for c in ids]


@torch.no_grad()
def agreement(model: nn.Module, prompts: list[list[int]], completions: list[list[int]]) -> dict:
    """Teacher-forced top-1 agreement: one forward of ``prompt + completion`` per MR; position ``t`` of the
    completion agrees when ``argmax logits[len(prompt) + t - 1] == completion[t]``."""
    matches = tokens = whole = 0
    for prompt, completion in zip(prompts, completions):
        ids = torch.tensor([prompt + completion])
        top1 = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].argmax(-1)  # (len(completion),)
        same = int((top1 == torch.tensor(completion)).sum())
        matches, tokens, whole = matches + same, tokens + len(completion), whole + (same == len(completion))
    return {"top1": matches / tokens, "matches": matches, "tokens": tokens, "mrs_all_agree": whole}


def bleu(model: nn.Module, tokenizer, info: dict, data_dir: str | None, max_examples: int, batch_size: int) -> dict:
    return evaluate_e2e(model, tokenizer, "test", data_dir=data_dir, prompt_format=info.get("prompt_format", "plain"),
                        decoding=PAPER_DECODING, batch_size=batch_size, max_examples=max_examples, progress=False,
                        prompt_separator=info.get("prompt_separator", "\n"))


def load_cases(path: str, model: str | None) -> tuple[dict, object, dict[str, nn.Module]]:
    """(task.json, tokenizer, {"fp32": the adapted model, "int8": ..., "int4": ...})."""
    info, tokenizer, fp32 = load_adapted(path, model)
    return info, tokenizer, {"fp32": fp32, **{fmt: quantized(fp32, fmt) for fmt in FORMATS}}


def measure_agreement(path: str, *, model: str | None, data_dir: str | None, max_examples: int, max_new_tokens: int,
                      batch_size: int) -> dict:
    """Each case's teacher-forced top-1 agreement with the fp32 model's greedy completions."""
    info, tokenizer, models = load_cases(path, model)
    mrs = group_references(read_e2e("test", data_dir))[0][:max_examples]
    prompts = [prompt_ids(tokenizer, mr, info.get("prompt_format", "plain"), info.get("prompt_separator", "\n"))
               for mr in mrs]
    start = time.perf_counter()
    completions = greedy_completions(models["fp32"], tokenizer, prompts, max_new_tokens, batch_size)
    result = {"path": str(path), "mrs": len(prompts), "greedy_s": time.perf_counter() - start, "agreement": {}}
    for name, m in models.items():
        result["agreement"][name] = agreement(m, prompts, completions)
    return result


def measure_bleu(path: str, result: dict, save, *, model: str | None, data_dir: str | None, max_examples: int,
                 batch_size: int) -> None:
    """Each case's E2E scores with the paper's decoding into ``result``, and BLEU - fp32's BLEU in points;
    ``save()`` after each case."""
    info, tokenizer, models = load_cases(path, model)
    result.update(bleu={}, bleu_s={}, bleu_diff_points={}, bleu_abs_diff_points={})
    for name, m in models.items():
        start = time.perf_counter()
        result["bleu"][name] = bleu(m, tokenizer, info, data_dir, max_examples, batch_size)
        result["bleu_s"][name] = time.perf_counter() - start
        if name != "fp32":
            diff = 100 * (result["bleu"][name]["BLEU"] - result["bleu"]["fp32"]["BLEU"])
            result["bleu_diff_points"][name], result["bleu_abs_diff_points"][name] = diff, abs(diff)
        save()


def parse_adapters(items: list[str]) -> dict[str, str]:
    adapters = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter expects NAME=FOLDER, got {item!r}")
        if not (Path(path) / "task.json").is_file():
            raise ValueError(f"--adapter {item}: {path} has no task.json; give an adapter folder written by lorakit train")
        adapters[name] = path
    return adapters


def run(adapters: dict[str, str], *, model: str | None = None, data_dir: str | None = None, max_examples: int = 100,
        max_new_tokens: int = 64, batch_size: int = 8, bleu_adapters: list[str] | None = None,
        name: str = "quant_quality", out_dir: str = "bench/results") -> dict:
    """Agreement for every adapter, then BLEU for ``bleu_adapters`` (None: all; []: none); writes the record."""
    unknown = sorted(set(bleu_adapters or []) - set(adapters))
    if unknown:
        raise ValueError(f"--bleu-adapters names {unknown}, which no --adapter gives; choose from {sorted(adapters)}")
    config = {"adapters": adapters, "model": model, "data_dir": data_dir, "max_examples": max_examples,
              "max_new_tokens": max_new_tokens, "batch_size": batch_size, "bleu_adapters": bleu_adapters,
              "formats": {k: {"layers": v[0], "head": v[1]} for k, v in FORMATS.items()},
              "bleu_decoding": dataclasses.asdict(PAPER_DECODING), "activations": os.environ.get("LORAKIT_QUANT_ACT") or "int8"}
    results: dict = {"adapters": {}}
    common = dict(model=model, data_dir=data_dir, max_examples=max_examples, batch_size=batch_size)
    for label, path in adapters.items():
        results["adapters"][label] = measure_agreement(path, max_new_tokens=max_new_tokens, **common)
        print(f"{label} agreement: {results['adapters'][label]['agreement']}", flush=True)
        write_record(name, config, results, out_dir)
    for label in adapters if bleu_adapters is None else bleu_adapters:
        measure_bleu(adapters[label], results["adapters"][label], lambda: write_record(name, config, results, out_dir),
                     **common)
        print(f"{label} BLEU: {results['adapters'][label]['bleu']}", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", action="append", required=True, metavar="NAME=FOLDER",
                        help="an E2E adapter folder (task.json); repeat for several")
    parser.add_argument("--model", help="base model (default: the adapter's task.json)")
    parser.add_argument("--data-dir", help="E2E csv folder (default: as lorakit eval finds it)")
    parser.add_argument("--max-examples", type=int, default=100, help="first N unique test MRs (default: 100)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate batch (default: 8)")
    parser.add_argument("--skip-bleu", action="store_true", help="agreement only")
    parser.add_argument("--bleu-adapters", nargs="+", metavar="NAME", help="BLEU for these adapters only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="quant_quality", help="record name (bench/results/NAME.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = run(parse_adapters(args.adapter), model=args.model, data_dir=args.data_dir,
                  max_examples=args.max_examples, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                  bleu_adapters=[] if args.skip_bleu else args.bleu_adapters, name=args.name)
    print(json.dumps({a: {k: r[k] for k in ("agreement", "bleu_diff_points") if k in r}
                      for a, r in results["adapters"].items()}, indent=2))


if __name__ == "__main__":
    main()
