"""Generation latency with a merged LoRA adapter vs the base model (the paper's Table 1 claim,
on real decoding: "no additional inference latency" once ``W = W0 + BA`` is merged).

SmolLM2-135M-Instruct, batch 1, greedy, exactly ``--new-tokens`` new tokens per prompt
(``stop_at_eos`` off, so every case does the same work), prompts = E2E dev MRs in the plain
format, through :func:`lorakit.generate.generate_ids`. Cases: ``base`` (the model alone);
``merged`` (r=4 alpha=32 on q_proj/v_proj with random non-zero factors, merged, layers still
wrapped); ``unloaded`` (the same merged and unwrapped to plain modules); ``unmerged`` (the
adapter applied as ``W0 x + s B A x``, for contrast). Before timing, every case decodes the
first ``CHECKED`` prompts: merged, unloaded and unmerged must give the same tokens, and the
adapter must change the model's logits. Rounds alternate the cases; round ``i`` decodes prompt
``i`` in each, and the timed outputs are checked again. Reported: median per-token latency
(call time / new tokens, prefill included), tokens/s, median ratios to ``base``.

    python bench/generation.py [--quick] [--repeats 12] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys

import torch

import lorakit
from lorakit.benchtools import BenchmarkMismatch, check_close, interleave, median_ratio, write_record
from lorakit.generate import Decoding, generate_ids
from lorakit.tasks.lm import group_references, load_causal_lm, prompt_ids, read_e2e

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from lm_step import hardware, model_folder  # noqa: E402

ADAPTER = lorakit.LoraConfig(r=4, alpha=32, target_modules=["q_proj", "v_proj"])
CHECKED = 3  # prompts decoded by every case before timing (the timed outputs are compared after)


def build_cases(base) -> dict:
    unmerged = lorakit.add_lora(copy.deepcopy(base), ADAPTER)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in lorakit.lora_parameters(unmerged):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    merged = copy.deepcopy(unmerged)
    lorakit.merge(merged)
    unloaded = lorakit.merge_and_unload(copy.deepcopy(unmerged))
    return {"base": base, "merged": merged, "unloaded": unloaded, "unmerged": unmerged}


def check_outputs(models: dict, prompts: list[list[int]], decode) -> dict:
    """Same tokens from merged, unloaded and unmerged on every prompt; the adapter changes the logits."""
    outputs = {k: [decode(m, p) for p in prompts] for k, m in models.items()}
    for case in ("merged", "unloaded"):
        if outputs[case] != outputs["unmerged"]:
            raise BenchmarkMismatch(f"{case} and unmerged generate different tokens; refusing to report timings")
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        base_logits, lora_logits = (models[k](ids).logits for k in ("base", "unmerged"))
        check_close(models["merged"](ids).logits, lora_logits, "merged vs unmerged logits", rtol=1e-4, atol=1e-4)
    if torch.allclose(base_logits, lora_logits, rtol=1e-4, atol=1e-4):
        raise AssertionError("the adapter does not change the logits: merged == base would be trivial")
    changed = sum(a != b for a, b in zip(outputs["unmerged"], outputs["base"]))
    return {"prompts": len(prompts), "outputs_differing_from_base": changed,
            "max_logit_change_vs_base": (lora_logits - base_logits).abs().max().item()}


def run(quick: bool, repeats: int, new_tokens: int, name: str, out_dir: str = "bench/results") -> dict:
    mrs, _ = group_references(read_e2e("dev"))
    with model_folder(quick) as folder:
        tokenizer, base = load_causal_lm(folder)
    torch.manual_seed(0)
    models = build_cases(base)
    prompts = [prompt_ids(tokenizer, mr, "plain") for mr in mrs[: repeats + 1]]
    decoding = Decoding(max_new_tokens=new_tokens, stop_at_eos=False)

    def decode(model, prompt):
        out = generate_ids(model, [prompt], pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                           decoding=decoding, batch_size=1)[0]
        assert len(out) == new_tokens, (len(out), new_tokens)
        return out

    check = check_outputs(models, prompts[:CHECKED], decode)
    print(f"checked: {check}", flush=True)
    timed: dict[str, list] = {k: [] for k in models}

    def case(key):
        queue = itertools.cycle(prompts)
        return lambda: timed[key].append(decode(models[key], next(queue)))

    samples = interleave({k: case(k) for k in models}, repeats=repeats)
    if not timed["merged"] == timed["unloaded"] == timed["unmerged"]:
        raise BenchmarkMismatch("the timed merged / unloaded / unmerged outputs differ")
    per_token = {k: [s / new_tokens for s in v] for k, v in samples.items()}
    results = {"check": check, "prompt_tokens": [len(p) for p in prompts],
               "cases": {k: {"median_ms_per_token": 1000 * statistics.median(v), "samples_s": samples[k],
                             "tokens_per_s": new_tokens / statistics.median(samples[k])} for k, v in per_token.items()},
               "ratios_to_base": {k: median_ratio(samples, k, "base") for k in models if k != "base"}}
    ms = {k: f"{v['median_ms_per_token']:.1f}" for k, v in results["cases"].items()}
    print(f"ms/token {ms}, ratios to base { {k: round(v, 4) for k, v in results['ratios_to_base'].items()} }")
    config = dict(model="tiny random Llama (hidden 64, 2 layers)" if quick else "smollm2", batch=1, decoding="greedy",
                  new_tokens=new_tokens, stop_at_eos=False, prompts="E2E dev MRs, plain format", r=4, alpha=32,
                  targets=list(ADAPTER.target_modules), repeats=repeats, **hardware())
    write_record(name, config, results, out_dir)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama, 3 repeats, 16 new tokens")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    if args.quick:
        run(True, 3, 16, "generation_quick")
    else:
        run(False, args.repeats, args.new_tokens, "generation")


if __name__ == "__main__":
    sys.exit(main())
