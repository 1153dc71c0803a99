"""Peak memory of a training run: LoRA (lorakit, PEFT) vs full fine-tuning.

Each case runs in its own process (so high-water marks do not mix): load the model,
attach the method, run ``--steps`` training steps (batch 16 x 128, AdamW, dropout 0.1),
and report the process's peak RSS (``ru_maxrss``) and, on CUDA, the allocator's peak.
The paper's claim for GPT-3 175B: about 2/3 less VRAM with LoRA.

    python bench/memory.py [--quick] [--model roberta-base]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

CASES = ("lorakit", "lorakit_fast", "peft", "full")  # lorakit_fast: with fast dropout, as `lorakit train` runs


def child(case: str, model_kind: str, steps: int, batch: int, seq: int) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from train_step import attach, base_model, make_batch, step_fn

    base = base_model(model_kind, 0.1)
    data = make_batch(base, batch, seq)
    model = attach(case.removesuffix("_fast"), base, 8, 0.1)
    if case == "lorakit_fast":
        from lorakit.fastops import use_fast_dropout

        use_fast_dropout(model)
    step = step_fn(model, data, "fp32")
    for _ in range(steps):
        step()
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run(model_kind: str, steps: int = 3, batch: int = 16, seq: int = 128, name: str = "memory",
        out_dir: str = "bench/results", jobs: int = 1) -> dict:
    """``jobs``: cases run at once (each process's own peak is measured, so they need not take turns where the
    memory of ``jobs`` of them fits; the tests' tiny model: 2)."""
    from lorakit.benchtools import write_record

    results = {}
    for first in range(0, len(CASES), jobs):
        cases = CASES[first:first + jobs]
        procs = [subprocess.Popen([sys.executable, __file__, "--child", case, "--model", model_kind, "--steps", str(steps),
                                   "--batch", str(batch), "--seq", str(seq)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for case in cases]
        for case, proc in zip(cases, procs):  # (a child writes a line or two: the pipes never fill)
            out, err = proc.communicate()
            if proc.returncode:
                raise subprocess.CalledProcessError(proc.returncode, proc.args, out, err)
            results[case] = json.loads(out.strip().splitlines()[-1])
            print(f"{model_kind} {case}: peak RSS {results[case]['peak_rss_mb']:.0f} MB", flush=True)
    ratios = {f"{a}/full": results[a]["peak_rss_mb"] / results["full"]["peak_rss_mb"] for a in CASES[:-1]}
    write_record(name, dict(model=model_kind, steps=steps, batch=batch, seq=seq), {"cases": results, "ratios": ratios}, out_dir)
    print(f"ratios: {ratios}")
    return {"cases": results, "ratios": ratios}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="MiniLM, 2 steps")
    parser.add_argument("--model", default="roberta-base")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.model, args.steps, args.batch, args.seq)))
    elif args.quick:
        run("minilm", steps=2, name="memory_quick")
    else:
        run(args.model, steps=args.steps, batch=args.batch, seq=args.seq)


if __name__ == "__main__":
    sys.exit(main())
