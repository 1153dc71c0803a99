"""Receipts: proof, carried in an adapter's folder, that what is served is what was trained (issue 34).

``receipt.safetensors`` beside PEFT's two files (PEFT ignores it) holds:

- a fingerprint of the base weight of every layer the adapter targets: ``sha256`` of the weight as stored
  (dtype, shape, bytes; a bitsandbytes or lorakit-quantized base: its quantized storage) and a sketch robust
  to quantization, ``S = W G`` with ``W: (out, n)`` dequantized to float32 and ``G: (n, 4)`` a fixed Gaussian
  (seed 0), plus ``||W||_F``; also ``S`` of the merged weight ``W + ΔW`` (a merged model is checked against it);
- ``sha256`` of the adapter's tensors as written (sorted keys; name, dtype, shape, bytes);
- reference outputs on fixed probes (seeded token ids unless the caller passes its own): per position the
  top-k log-probabilities (float32), their token ids (int32) and ``log(1 - sum of their probabilities)``.

:func:`compare` re-runs the probes and bounds ``KL(ref || new)`` from below by coarse-graining both
distributions to the k stored tokens plus one "rest" bin (data-processing inequality).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .io import adapter_state_dict, atomic_write
from .layers import LoraLayer
from .model import active_adapters, lora_layers, set_adapter

__all__ = ["Receipt", "make_receipt", "write_receipt", "read_receipt", "compare", "checksum", "greedy_probes",
           "special_ids", "RECEIPT_NAME", "TOLERANCES", "FORMAT_VERSION"]

RECEIPT_NAME = "receipt.safetensors"
FORMAT_VERSION = 1
PROBE_SEED, PROBE_SHAPE, TOP_K, SKETCH_COLUMNS = 0, (4, 32), 8, 4
# Pass / fail by the coarsest precision or quantization in which the two runs differ (docs/RECEIPTS.md):
# top1: least fraction of positions whose top-1 token agrees; max_abs: largest |Δ log-prob| over the stored
# top-k entries (None: not checked); kl: largest mean KL lower bound (nats per position). Loosest last.
# Chosen at about twice what an fp32 reference moved to on SmolLM2-135M (q_proj, v_proj; random-token probes,
# where distributions are flat and top-1 fragile): bf16 top-1 0.93, KL 0.0017; bnb-int8 0.90, 0.0052; q8_0 0.875,
# 0.0042; q4_1 0.945, 0.0034; nf4 0.45, 0.26; fp4 0.30, 0.59; another base: 0.0, 2.7. max |Δ| is checked at fp32
# only: on flat distributions a low-ranked top-k entry moves by up to 1.7 nats in bf16 (a merged bf16 copy).
TOLERANCES: dict[str, dict[str, float | None]] = {
    "fp32": {"top1": 1.0, "max_abs": 1e-3, "kl": 1e-6},
    "fp16": {"top1": 0.9, "max_abs": None, "kl": 5e-3},
    "bf16": {"top1": 0.85, "max_abs": None, "kl": 1e-2},
    "int8": {"top1": 0.75, "max_abs": None, "kl": 2e-2},
    "int4": {"top1": 0.75, "max_abs": None, "kl": 5e-2},
    "nf4": {"top1": 0.3, "max_abs": None, "kl": 0.5},
    "fp4": {"top1": 0.2, "max_abs": None, "kl": 1.0},
}
_KIND_KEY = {"bnb-int8": "int8", "q8_0": "int8", "nf4": "nf4", "fp4": "fp4", "q4_0": "int4", "q4_1": "int4"}
# Relative sketch error ||S_new - S_ref|| / ||S_ref|| under which a differently stored copy counts as the same
# base quantized (~ the relative weight error: ~0.01 for 8 bits, ~0.1 for 4; independent weights: ~1.4).
SKETCH_TOLERANCE = {"16-bit": 0.02, "int8": 0.05, "int4": 0.3, "nf4": 0.3, "fp4": 0.3, "merged": 1e-4}


@dataclasses.dataclass
class Receipt:
    """A receipt's tensors (probe outputs, sketches) and its JSON metadata."""

    tensors: dict[str, Tensor]
    metadata: dict[str, Any]


# ---- fingerprints ------------------------------------------------------------------------------------------


def _sha(parts: list[tuple[str, Tensor]]) -> str:
    """sha256 over ``name, dtype, shape, bytes`` of each tensor in the given order."""
    h = hashlib.sha256()
    for name, t in parts:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def checksum(tensors: dict[str, Tensor]) -> str:
    """sha256 of adapter tensors, sorted by key."""
    return _sha(sorted(tensors.items()))


def _quant_kind(module: nn.Module) -> str | None:
    """How ``module`` stores the weight it computes with: nf4 / fp4 / bnb-int8 / q8_0 / q4_1 ..., or None."""
    from . import quant

    if isinstance(module, LoraLayer):
        blocks = module.__dict__.get("int8_base")
        if blocks is not None and not module.merged:
            return blocks.fmt
        return _quant_kind(module._plain(module.original_weight)) if module.quantized else None
    if hasattr(module, "fmt") and hasattr(module, "q"):
        return module.fmt  # lorakit.quant.linear.QuantLinear
    if quant.is_quantized(module):
        from .quant.bnb import quantize_type

        return quantize_type(module)
    return None


def _stored_and_float(module: nn.Module) -> tuple[list[tuple[str, Tensor]], Tensor]:
    """The tensors the base weight is stored in, and that weight as float32 ``(out, n)``."""
    if isinstance(module, LoraLayer):
        quantized = module.__dict__.get("int8_base")
        if quantized is not None and not module.merged:
            return _quant_linear_parts(quantized)
        weight = module.original_weight
        if module.quantized:
            return _bnb_parts(module._plain(weight)), module._dequantized(weight)
        return [("weight", weight)], module.weight_rows(weight).float()
    if hasattr(module, "fmt") and hasattr(module, "q"):
        return _quant_linear_parts(module)
    if _quant_kind(module) is not None:
        return _bnb_parts(module), module.dequantize(torch.float32)
    weight = module.weight
    if type(module).__name__ == "Conv1D" or isinstance(module, nn.Embedding):
        return [("weight", weight)], weight.T.float()
    return [("weight", weight)], weight.flatten(1).float()


def _quant_linear_parts(module: nn.Module) -> tuple[list[tuple[str, Tensor]], Tensor]:
    parts = [(n, module._buffers[n]) for n in ("q", "d", "m") if module._buffers.get(n) is not None]
    return parts, module.dequantize().float()


def _bnb_parts(module: nn.Module) -> list[tuple[str, Tensor]]:
    parts = [("weight", module.weight.data)]
    scb = getattr(module, "SCB", None) if _quant_kind(module) == "bnb-int8" else None
    return parts + ([("SCB", scb)] if scb is not None else [])


def _gaussian(n: int, device: torch.device) -> Tensor:
    g = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randn(n, SKETCH_COLUMNS, generator=g).to(device)


def _sketch(rows: Tensor) -> Tensor:
    return (rows @ _gaussian(rows.shape[1], rows.device)).cpu()


def _fingerprint(module: nn.Module) -> tuple[dict[str, Any], Tensor, Tensor]:
    """The weight's record (sha256, dtype, shape, quantization, norm), its sketch, and the float32 rows."""
    stored, rows = _stored_and_float(module)
    info = {"sha256": _sha(stored), "dtype": str(stored[0][1].dtype).removeprefix("torch."),
            "shape": list(stored[0][1].shape), "quantization": _quant_kind(module) or "none",
            "norm": float(rows.norm())}
    return info, _sketch(rows), rows


def _fingerprints(model: nn.Module, adapter: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Every layer holding ``adapter``: its record, and the sketches of ``W`` and of ``W + ΔW``."""
    infos, tensors = {}, {}
    for name, layer in lora_layers(model):
        if adapter in layer.adapters:
            infos[name], tensors[f"base.{name}"], rows = _fingerprint(layer)
            delta = layer.weight_rows(layer.delta_weight(adapter)).float()
            tensors[f"merged.{name}"] = _sketch(rows + delta.to(rows.device))
    return infos, tensors


def _model_quantization(model: nn.Module) -> list[str]:
    return sorted({k for m in model.modules() if (k := _quant_kind(m)) is not None})


# ---- probes -------------------------------------------------------------------------------------------------


def special_ids(config: Any) -> set[int]:
    """The special token ids a model config names (bos, eos, pad, unk, sep, cls, mask; lists flattened)."""
    special = {getattr(config, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "unk", "sep", "cls", "mask")}
    return {i for s in special for i in (s if isinstance(s, list | tuple) else [s]) if isinstance(i, int)}


def _probe_ids(model: nn.Module) -> Tensor | None:
    """Seeded ids ``(4, 32)`` from ``[first non-special id, vocab)``, none of the config's special ids;
    None for a model without a vocabulary."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        return None
    special = special_ids(config)
    first = next(i for i in range(vocab) if i not in special)
    allowed = torch.tensor([i for i in range(first, vocab) if i not in special])
    length = min(PROBE_SHAPE[1], getattr(config, "max_position_embeddings", None) or PROBE_SHAPE[1])
    pick = torch.randint(len(allowed), (PROBE_SHAPE[0], length), generator=torch.Generator().manual_seed(PROBE_SEED))
    return allowed[pick]


@contextmanager
def _probing(model: nn.Module, adapter: str | None):
    """Eval mode, no autograd, ``adapter`` active; the model's mode and active adapters restored after."""
    modes = {m: m.training for m in model.modules()}
    before = active_adapters(model) if adapter is not None else ()
    if adapter is not None and before != (adapter,):
        set_adapter(model, adapter)
    try:
        with torch.no_grad():
            yield model.eval()
    finally:
        for m, mode in modes.items():
            m.training = mode
        if adapter is not None and before and before != (adapter,):
            set_adapter(model, before)


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _forward_dtype(model: nn.Module) -> str:
    device = _device(model)
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    else:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def _log_probs(model: nn.Module, ids: Tensor) -> Tensor:
    """``log_softmax`` of the model's logits on ``ids`` in float32, ``(positions, V)``."""
    ids = ids.to(_device(model))
    extra = {"decoder_input_ids": ids} if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else {}
    out = model(input_ids=ids, **extra)
    logits = out if isinstance(out, Tensor) else (out.logits if hasattr(out, "logits") else out[0])
    return torch.log_softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1]).cpu()


def greedy_probes(model: nn.Module, adapter: str | None, prompts: Tensor, new_tokens: int,
                  banned: list[int] | tuple[int, ...] = ()) -> tuple[Tensor, Tensor]:
    """Greedy continuations of ``prompts: (P, L)`` by ``model`` (eval mode, ``adapter`` active; None: as it is),
    ``new_tokens`` each, never a ``banned`` id (no stop at EOS): the tokens ``(P, N)`` and, per token, the logit
    margin over the runner-up ``(P, N)`` (float32; a small margin is a near tie that rounding can flip)."""
    ids = prompts.long().to(_device(model))
    # the KV cache: newer transformers (5.24 here) name it ``cache``, in and out; older ones ``past_key_values``
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    tokens, margins = [], []
    with _probing(model, adapter):
        out = model(input_ids=ids, use_cache=True)
        for step in range(new_tokens):
            logits = out.logits[:, -1].float()  # (P, V)
            logits[:, list(banned)] = -math.inf
            top = logits.topk(2, dim=-1)
            tokens.append(top.indices[:, 0])
            margins.append(top.values[:, 0] - top.values[:, 1])
            if step + 1 < new_tokens:
                out = model(input_ids=tokens[-1][:, None], use_cache=True, **{name: getattr(out, name)})
    return torch.stack(tokens, 1).cpu(), torch.stack(margins, 1).cpu()


def _top_k(log_probs: Tensor) -> dict[str, Tensor]:
    values, index = log_probs.topk(min(TOP_K, log_probs.shape[-1]), dim=-1)
    return {"probe.top_logprobs": values, "probe.top_ids": index.int(), "probe.rest": _log_rest(values)}


def _log_rest(values: Tensor) -> Tensor:
    """``log(1 - sum exp(values))`` per row, clamped at float32's smallest normal number."""
    rest = (1 - values.double().exp().sum(-1)).clamp_min(torch.finfo(torch.float32).tiny)
    return rest.log().float()


# ---- the receipt ---------------------------------------------------------------------------------------------


def _reference_outputs(model: nn.Module, adapter: str, ids: Tensor, explicit: bool) -> dict[str, Tensor]:
    """The probes' top-k outputs and ids; none, with a warning, for a model whose forward does not take token ids
    alone (speech, vision): the receipt then holds the fingerprint and checksum only."""
    try:
        with _probing(model, adapter):
            return {**_top_k(_log_probs(model, ids)), "probe.ids": ids}
    except (TypeError, ValueError, RuntimeError, IndexError) as e:
        if explicit:
            raise
        warnings.warn(f"the receipt of adapter {adapter!r} holds no reference outputs: the model's forward on token ids "
                      f"failed ({type(e).__name__}: {' '.join(str(e).split())[:200]})", stacklevel=4)
        return {}


def make_receipt(model: nn.Module, adapter: str, probe_text_ids: Tensor | None = None, *,
                 tensors: dict[str, Tensor] | None = None) -> Receipt:
    """The receipt of ``adapter`` on ``model`` as it is now. ``probe_text_ids``: the caller's own token ids
    ``(B, T)`` in place of the seeded probes (they are stored in the receipt). ``tensors``: the adapter's tensors
    as written, where they differ from :func:`lorakit.io.adapter_state_dict` (PEFT's form of ``enable_lora``)."""
    from . import __version__

    fingerprints, stored = _fingerprints(model, adapter)
    ids = _probe_ids(model) if probe_text_ids is None else torch.as_tensor(probe_text_ids).long().reshape(
        len(probe_text_ids), -1)
    if ids is not None:
        stored.update(_reference_outputs(model, adapter, ids, explicit=probe_text_ids is not None))
    ids = stored.get("probe.ids")
    probes = {"seed": PROBE_SEED, "shape": list(ids.shape)} if probe_text_ids is None and ids is not None else (
        "text" if ids is not None else "none")
    written = tensors if tensors is not None else adapter_state_dict(model, adapter)
    metadata = {"format_version": FORMAT_VERSION, "adapter": adapter, "lorakit_version": __version__,
                "base_model": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
                "probes": probes, "forward_dtype": _forward_dtype(model), "quantization": _model_quantization(model),
                "adapter_sha256": checksum(written), "fingerprints": fingerprints}
    return Receipt({k: v.detach().cpu().contiguous() for k, v in stored.items()}, metadata)


def write_receipt(directory: str | Path, receipt: Receipt) -> Path:
    path = Path(directory) / RECEIPT_NAME
    metadata = {"receipt": json.dumps(receipt.metadata, sort_keys=True)}
    atomic_write(path, lambda p: save_file(receipt.tensors, p, metadata=metadata))
    return path


def read_receipt(directory: str | Path) -> Receipt | None:
    """The receipt in ``directory``; None if it has none (an unverified adapter); a ValueError if unreadable."""
    path = Path(directory) / RECEIPT_NAME
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            metadata = json.loads((f.metadata() or {})["receipt"])
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path} is not a readable receipt (truncated or corrupt?): {type(e).__name__}: {e}; "
                         "save the adapter again to write a new one") from None
    return Receipt(tensors, metadata)


# ---- comparing -------------------------------------------------------------------------------------------------


def _module_status(name: str, info: dict, module: nn.Module | None, reference: Receipt, merged: bool) -> str:
    if module is None:
        return "missing"
    new_info, sketch, _ = _fingerprint(module)
    if not merged and new_info["sha256"] == info["sha256"]:
        return "equal"
    ref = reference.tensors[f"{'merged' if merged else 'base'}.{name}"]
    error = float((sketch - ref).norm() / ref.norm().clamp_min(1e-30))
    kinds = {info["quantization"], new_info["quantization"]} - {"none"}
    if merged and error <= SKETCH_TOLERANCE["merged"] and new_info["quantization"] == "none":
        return "equal"
    limit = max((SKETCH_TOLERANCE[_KIND_KEY.get(k, "fp4")] for k in kinds), default=0.0)
    if new_info["dtype"] != info["dtype"] and new_info["dtype"] in ("bfloat16", "float16", "float32"):
        limit = max(limit, SKETCH_TOLERANCE["16-bit"])  # the base (or the merged model) rounded to 16 bits
    return "same base, quantized" if error <= limit else "different"


def _compare_fingerprints(reference: Receipt, model: nn.Module, adapter: str | None) -> dict[str, Any]:
    modules = dict(model.named_modules())
    statuses = {}
    for name, info in reference.metadata["fingerprints"].items():
        module = modules.get(name)
        if adapter is not None and not (isinstance(module, LoraLayer) and adapter in module.adapters):
            module = None
        statuses[name] = _module_status(name, info, module, reference, merged=adapter is None)
    bad = sorted(n for n, s in statuses.items() if s in ("different", "missing"))
    verdict = "different" if bad else ("equal" if all(s == "equal" for s in statuses.values())
                                       else "same base, quantized")
    return {"status": verdict, "differ": bad, "missing": sorted(n for n, s in statuses.items() if s == "missing")}


def _agreement(reference: Receipt, log_probs: Tensor) -> dict[str, float]:
    ref_values, ref_ids = reference.tensors["probe.top_logprobs"].double(), reference.tensors["probe.top_ids"].long()
    new = log_probs.double()
    mine = new.gather(1, ref_ids)  # the new model's log-probs of the reference's top-k tokens
    p = torch.cat([ref_values.exp(), reference.tensors["probe.rest"].double().exp()[:, None]], 1)
    q_rest = (1 - mine.exp().sum(1)).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.cat([mine.exp(), q_rest[:, None]], 1).clamp_min(1e-300)
    kl = (p * (p.clamp_min(1e-300).log() - q.log())).sum(1).clamp_min(0)
    return {"top1_agreement": float((new.argmax(1) == ref_ids[:, 0]).double().mean()),
            "max_abs_logprob": float((mine - ref_values).abs().max()), "kl_bound": float(kl.mean()),
            "kl_bound_max": float(kl.max())}


def tolerance_key(reference: Receipt, model: nn.Module) -> str:
    """The key of :data:`TOLERANCES` for comparing ``model`` with ``reference``: the loosest of the precisions
    the two forwards ran in and of the quantizations in which they differ."""
    keys = [reference.metadata["forward_dtype"], _forward_dtype(model)]
    keys += [_KIND_KEY.get(k, "fp4") for k in set(reference.metadata["quantization"]) ^ set(_model_quantization(model))]
    order = list(TOLERANCES)
    return max(keys, key=lambda k: order.index(k) if k in order else len(order) - 1)


def _passes(figures: dict[str, float], tolerance: dict[str, float | None]) -> bool:
    checks = [figures["top1_agreement"] >= tolerance["top1"], figures["kl_bound"] <= tolerance["kl"]]
    if tolerance.get("max_abs") is not None:
        checks.append(figures["max_abs_logprob"] <= tolerance["max_abs"])
    return all(checks) and all(math.isfinite(v) for v in figures.values())


def compare(reference: Receipt, model: nn.Module, adapter: str | None,
            tolerances: dict[str, dict[str, float | None]] | None = None) -> dict[str, Any]:
    """Re-run ``reference``'s probes on ``model`` with ``adapter`` active (None: a merged model, no adapter)
    and compare: base fingerprint, top-1 agreement, max |Δ log-prob|, KL lower bound, pass / fail."""
    report: dict[str, Any] = {"fingerprint": _compare_fingerprints(reference, model, adapter)}
    key = tolerance_key(reference, model)
    tolerance = (tolerances or TOLERANCES)[key]
    report["tolerance"] = {"key": key, **tolerance}
    if "probe.ids" not in reference.tensors:
        report.update(probes="none", passed=report["fingerprint"]["status"] != "different")
        return report
    with _probing(model, adapter):
        figures = _agreement(reference, _log_probs(model, reference.tensors["probe.ids"]))
    report.update(figures, probes=reference.metadata["probes"])
    report["passed"] = _passes(figures, tolerance) and report["fingerprint"]["status"] != "different"
    return report
