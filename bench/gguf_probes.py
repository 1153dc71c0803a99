"""The expected greedy tokens of ``lorakit export gguf`` checked in llama.cpp (#34 item 4): where the pass rule
of ``lorakit.export.agreement`` comes from (docs/RECEIPTS.md).

Per adapter (``--adapter NAME=FOLDER`` with a receipt, and ``random-STD``: SmolLM2-135M, r=8, alpha=16, q_proj
and v_proj, factors seed 2, std 0.02 as bench/receipt_tolerances.py, and 0.06) the GGUF is written with its probe record
(``probe_record``: 16 prompts of 8 receipt probe ids, 16 greedy tokens of lorakit's float32 model) and checked
with ``check_gguf`` in ``llama-server -t 1`` on each base GGUF: honest; the adapter dropped (its scale 0);
another adapter's tensors under this record (``wrong``); llama's q / k rows left unpermuted (an export bug).
Also lorakit's own figures: how many probes the adapter changes, and its logit margins.

    OMP_NUM_THREADS=1 python bench/gguf_probes.py --adapter e2e=RUN/seed0/adapter [--base f32=smollm2-f32.gguf] \\
        [--llama-server PATH]   # default: $LLAMA_SERVER, else bench/build_llama_server.sh's build
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch
from transformers import AutoConfig

import lorakit
from lorakit import export
from lorakit.benchtools import write_record
from lorakit.models import resolve_model
from lorakit.receipt import greedy_probes, read_receipt, special_ids
from lorakit.tasks import lm
from serve_gen import find_llama_server

MODEL = "smollm2"


def random_adapter(folder: Path, std: float, seed: int = 2) -> Path:
    """bench/receipt_tolerances.py's adapter (std 0.02), saved with its receipt."""
    model = lm.load_causal_lm(MODEL)[1].eval()
    lorakit.add_lora(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lorakit.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    lorakit.save_adapter(model, folder)
    (folder / "task.json").write_text(json.dumps({"task": "e2e", "model": MODEL}))
    return folder


def record_of(folder: str | Path) -> tuple[export.ProbeRecord, dict]:
    """The probe record (as ``lorakit export gguf`` makes it) and lorakit's own figures."""
    tokenizer, model = lm.load_causal_lm(MODEL)
    lorakit.load_adapter(model, folder)
    record = export.probe_record(model, read_receipt(folder), "default",
                                 special_ids(model.config) | set(tokenizer.all_special_ids))
    with lorakit.disable_adapters(model):
        base, _ = greedy_probes(model, None, record.prompt_ids, export.NEW_TOKENS, record.banned_ids)
    changed = [i for i in range(len(base)) if not torch.equal(base[i], record.greedy_ids[i])]
    first = [int((base[i] != record.greedy_ids[i]).nonzero()[0]) for i in changed]
    return record, {"probes": len(base), "adapter_changes": len(changed), "first_change": first,
                    "median_margin": float(record.margins.median()),
                    "margins_below": {t: int((record.margins < t).sum()) for t in (0.1, 0.25, 0.5, 1.0)},
                    "tokens": record.margins.numel()}


def exported(folder: str | Path, out: Path, record: export.ProbeRecord, permute: bool = True) -> Path:
    config = AutoConfig.from_pretrained(resolve_model(MODEL))
    if permute:
        return export.export_gguf(folder, out, config, record)
    with mock.patch.object(export, "permute_rows", lambda b, heads: b):
        return export.export_gguf(folder, out, config, record)


def summary(report: dict, record: export.ProbeRecord) -> dict:
    """The report's figures, and the share of equal next tokens among positions whose lorakit margin is >= t."""
    keys = ("equal", "equal_confident", "confident_positions", "positions", "same", "count", "largest_margin_differing",
            "passed")
    equal = torch.tensor(report["llama_tokens"]) == record.greedy_ids
    by_margin = {t: [int(equal[record.margins >= t].sum()), int((record.margins >= t).sum())]
                 for t in (0.0, 0.1, 0.25, 0.5, 1.0)}
    return {**{k: report[k] for k in keys}, "equal_by_margin": by_margin,
            "first_difference": [p["first_difference"] for p in report["probes"]],
            "margin": [None if p["margin"] is None else round(p["margin"], 3) for p in report["probes"]]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=FOLDER")
    parser.add_argument("--base", action="append", default=[], metavar="NAME=GGUF",
                        help="more base GGUFs beside the Q4_1 file lorakit's SmolLM2 folder was dequantized from")
    parser.add_argument("--random-std", type=float, nargs="*", default=[0.02, 0.06],
                        help="random adapters, std of their factors (default: 0.02, as bench/receipt_tolerances.py, "
                             "and 0.06)")
    parser.add_argument("--llama-server", help="llama.cpp's llama-server (default: $LLAMA_SERVER, else the build here)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    binary = find_llama_server(args.llama_server)
    if binary is None:
        sys.exit("no llama-server binary: run bench/build_llama_server.sh, or pass --llama-server")
    folder = Path(resolve_model(MODEL))
    bases = {"q4_1": folder / json.loads((folder / "gguf.json").read_text())["file"],
             **{k: Path(v) for k, v in (b.split("=", 1) for b in args.base)}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        adapters = {**dict(a.split("=", 1) for a in args.adapter),
                    **{f"random-{std:g}": random_adapter(work / f"random-{std:g}", std) for std in args.random_std}}
        records = {name: record_of(path) for name, path in adapters.items()}
        results: dict = {name: {"lorakit": records[name][1]} for name in adapters}
        for name, path in adapters.items():
            record = records[name][0]
            other = next(n for n in adapters if n != name)
            files = {"honest": exported(path, work / f"{name}.gguf", record),
                     "unpermuted": exported(path, work / f"{name}-unpermuted.gguf", record, permute=False),
                     "wrong": exported(adapters[other], work / f"{name}-wrong.gguf",
                                       dataclasses.replace(record, adapter_sha256=records[other][0].adapter_sha256))}
            for base, base_file in bases.items():
                cases = {case: summary(export.check_gguf(f, base_file, binary, threads=1), record)
                         for case, f in files.items()}
                cases["dropped"] = summary(export.check_gguf(files["honest"], base_file, binary, scale=0.0, threads=1),
                                           record)
                results[name][base] = cases
                for case, r in cases.items():
                    print(f"{name} on {base}, {case}: equal {r['equal']:.3f}, confident {r['equal_confident']:.3f} "
                          f"of {r['confident_positions']}, passed {r['passed']}, largest margin differing "
                          f"{r['largest_margin_differing']}; equal by margin {r['equal_by_margin']}; free runs same "
                          f"{r['same']}/{r['count']}, first differences {r['first_difference']}", flush=True)
            print(f"{name}: lorakit {results[name]['lorakit']}", flush=True)
    config = {"adapters": {k: str(v) for k, v in adapters.items()}, "bases": {k: str(v) for k, v in bases.items()},
              "llama_server": binary, "threads": 1, "prompt_length": export.PROMPT_LENGTH,
              "new_tokens": export.NEW_TOKENS, "near_tie": export.NEAR_TIE, "min_confident": export.MIN_CONFIDENT}
    print(f"wrote {write_record('gguf_probes', config, results)}")


if __name__ == "__main__":
    main()
