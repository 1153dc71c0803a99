"""A trained adapter's receipt checked by ``lorakit serve``'s own engine (issue 34): the adapter as the training
engine saved it, served at fp32, bf16, --quantize int8 and --quantize int4, each through the start-up check
(:mod:`lorakit.serving.verify`: the probes as scheduler rows, the per-row adapter path, the int8 / int4 layers).
Records per serve setting the check's figures, the tolerance it was held to, and the seconds the check took.

    python bench/serve_receipts.py --adapter runs/r34-e2e/seed0/adapter-sampled --adapter runs/r34-e2e/seed0/adapter

(Several ``--adapter`` folders: each is checked in turn, e.g. the same trained weights with a receipt of sampled
probes and one of random ids.)
"""

from __future__ import annotations

import argparse

from lorakit.benchtools import write_record
from lorakit.receipt import read_receipt
from lorakit.serving.adapters import base_of
from lorakit.serving.config import ServeConfig
from lorakit.serving.generation import GenerationEngine

SETTINGS = {"fp32": ("fp32", None), "bf16": ("bf16", None), "int8": ("fp32", "int8"), "int4": ("fp32", "int4")}


def check(model: str, adapter: str, precision: str, quantize: str | None) -> dict:
    engine = GenerationEngine(model, ServeConfig(verify_adapters="warn"), precision, quantize)
    engine.load("trained", adapter)
    engine.prepare()  # quantizes, then runs the start-up check
    return {**engine.adapters["trained"].receipt, "check_s": round(engine.check_s, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", action="append", required=True,
                        help="an adapter folder written by lorakit train (with its receipt); repeatable")
    parser.add_argument("--model", help="its base (default: the adapter's task.json)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    args = parser.parse_args()
    model = args.model or base_of(args.adapter[0])
    results = {}
    for adapter in args.adapter:
        probes = read_receipt(adapter).metadata["probes"]
        results[adapter] = {"probes": probes, "settings": {}}
        for name in args.settings.split(","):
            results[adapter]["settings"][name] = check(model, adapter, *SETTINGS[name])
            print(adapter, name, results[adapter]["settings"][name], flush=True)
    print("record:", write_record("serve_receipts", {"model": model, "adapters": args.adapter}, results))


if __name__ == "__main__":
    main()
