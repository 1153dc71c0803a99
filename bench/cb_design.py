"""Issue #33's third design candidate: transformers' own continuous batching (``generate_batch``,
``transformers/generation/continuous_batching/``) against lorakit's scheduler on the model engine
(``Scheduler(engine="model")``: the model's own modules over lorakit's row cache), same model,
prompts and greedy decoding, in one process.

transformers packs every request into one row of ``(1, total_tokens)`` with a paged cache; it has
no per-request adapter, so the comparison is on the base model alone (its best case: lorakit's
rows would each add their adapter's two small products). Each call decodes ``R`` E2E dev prompts
(plain format) for ``--new-tokens`` tokens from scratch (prefill included) on each side; the
cases alternate over ``--repeats`` rounds (``benchtools.interleave``); tokens/s = R x new tokens /
median call time. transformers' manager is kept across the calls of one R (``persistent_manager``,
as a server would), its cache sized for the work. Greedy tokens must agree (reported; the two paths sum in different orders).

    OMP_NUM_THREADS=2 python bench/cb_design.py [--quick] [--repeats 5] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from lorakit.benchtools import interleave, median_ratio, summarize, write_record
from lorakit.serving.scheduler import Sampling, Scheduler, Sequence
from lorakit.tasks.lm import load_causal_lm, prompt_ids, read_e2e

sys.path.insert(0, str(Path(__file__).parent))
from lm_step import hardware, model_folder  # noqa: E402

ROWS = (1, 8, 32)
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e"


def lorakit_scheduler(model, tokenizer, prompts: list[list[int]], new: int) -> list[list[int]]:
    scheduler = Scheduler(model, tokenizer, eos=set(), max_rows=len(prompts), max_length=512, engine="model",
                          compile=False)
    seqs = [Sequence(p, None, Sampling(max_tokens=new, temperature=0), lambda event: None) for p in prompts]
    for seq in seqs:
        scheduler.submit(seq)
    scheduler.run_until_done()
    return [s.tokens for s in seqs]


def transformers_cb(model, prompts: list[list[int]], new: int) -> list[list[int]]:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)
    # A cache sized for the work (left to itself it sizes by the free memory: GBs zeroed per call on a CPU):
    # one 256-token page per request, lorakit's prefill chunk (256 tokens) a step or the whole prompts
    cb = ContinuousBatchingConfig(num_blocks=2 * len(prompts) + 4, max_batch_tokens=max(256, sum(map(len, prompts))))
    out = model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb, progress_bar=False,
                               persistent_manager=True)  # (as a server keeps it: started once per R, see run)
    by_id = sorted(out.values(), key=lambda o: int(o.request_id.rsplit("_", 1)[-1]))  # "req_<i>"
    return [list(o.generated_tokens) for o in by_id]


def run(folder: str, repeats: int, new: int, rows: tuple[int, ...] = ROWS) -> dict:
    tokenizer, model = load_causal_lm(folder)
    model.eval()
    mrs = list(dict.fromkeys(mr for mr, _ in read_e2e("dev", DATA)))
    results = {}
    for R in rows:
        prompts = [prompt_ids(tokenizer, mr, "plain", "\n") for mr in (mrs * R)[:R]]
        with torch.inference_mode():
            ours, theirs = lorakit_scheduler(model, tokenizer, prompts, new), transformers_cb(model, prompts, new)
        agree = sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y)) / max(1, sum(map(len, ours)))
        load = os.getloadavg()[0]
        with torch.inference_mode():
            samples = interleave({"lorakit": lambda p=prompts: lorakit_scheduler(model, tokenizer, p, new),
                                  "transformers_cb": lambda p=prompts: transformers_cb(model, p, new)}, repeats=repeats)
        model.destroy_cached_continuous_batching_manager()
        results[str(R)] = {"token_agreement": agree, "generated": [len(t) for t in theirs][:4],
                           "load_average": [load, os.getloadavg()[0]],
                           "tokens_per_s": {n: R * new / v["median_s"] for n, v in summarize(samples).items()},
                           "cb_over_lorakit_time": median_ratio(samples, "transformers_cb", "lorakit"),
                           "samples_s": samples}
        print(f"R={R}: {results[str(R)]['tokens_per_s']} cb/lorakit time {results[str(R)]['cb_over_lorakit_time']:.3f}, "
              f"agreement {agree:.3f}", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama, 1 round, 4 new tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    repeats, new = (1, 4) if args.quick else (args.repeats, args.new_tokens)
    with model_folder(args.quick) as folder:
        results = run(folder, repeats, new)
    config = dict(model="tiny random Llama" if args.quick else "smollm2", repeats=repeats, new_tokens=new,
                  rows=list(ROWS), threads=torch.get_num_threads(), hardware=hardware())
    write_record("cb_design_quick" if args.quick else "cb_design", config, results)


if __name__ == "__main__":
    main()
