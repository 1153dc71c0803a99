"""Receipts: proof, carried in an adapter's folder, that what is served is what was trained (issue 34).

``receipt.safetensors`` beside PEFT's two files (PEFT ignores it) holds:

- a fingerprint of the base weight of every layer the adapter targets: ``sha256`` of the weight as stored
  (dtype, shape, bytes; a bitsandbytes or lorakit-quantized base: its quantized storage) and a sketch robust
  to quantization, ``S = W G`` with ``W: (out, n)`` dequantized to float32 and ``G: (n, 4)`` a fixed Gaussian
  (seed 0), plus ``||W||_F``; also ``S`` of the merged weight ``W + ΔW`` (a merged model is checked against it);
- ``sha256`` of the adapter's tensors as written (sorted keys; name, dtype, shape, bytes);
- reference outputs on fixed probes (for a causal LM, seeded start ids continued by the base model's own samples;
  for other models seeded random ids; or the caller's own ids): per position the top-k log-probabilities
  (float32), their token ids (int32) and ``log(1 - sum of their probabilities)``.

:func:`compare` re-runs the probes and bounds ``KL(ref || new)`` from below by coarse-graining both
distributions to the k stored tokens plus one "rest" bin (data-processing inequality).

Under FSDP2 (parameters sharded as DTensors) every process calls :func:`make_receipt` with the same arguments:
each targeted layer's weights are gathered whole, one layer at a time, so the fingerprint is the one a single
process computes, and the probes are one forward pass of all processes together; every process gets the same
receipt (:func:`lorakit.training.sharded_save.save_adapter_sharded` writes it from rank 0).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import warnings
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .distributed import swapped_parameters
from .io import adapter_state_dict, atomic_write
from .layers import LoraLayer
from .model import active_adapters, disable_adapters, lora_layers, set_adapter

__all__ = ["Receipt", "make_receipt", "write_receipt", "read_receipt", "compare", "checksum", "greedy_probes",
           "special_ids", "RECEIPT_NAME", "TOLERANCES", "RANDOM_PROBE_TOLERANCES", "tolerances_for", "FORMAT_VERSION",
           "override", "tolerance_key"]

RECEIPT_NAME = "receipt.safetensors"
FORMAT_VERSION = 1
PROBE_SEED, PROBE_SHAPE, PROBE_START, TOP_K, SKETCH_COLUMNS = 0, (4, 32), 4, 8, 4
# Pass / fail by the coarsest precision or quantization in which the two runs differ (docs/RECEIPTS.md):
# top1: least fraction of positions whose top-1 token agrees; max_abs: largest |Δ log-prob| over the stored
# top-k entries (None: not checked); kl: largest mean KL lower bound (nats per position). Loosest last.
# Chosen at about twice how far an fp32 reference moved on SmolLM2-135M (q_proj, v_proj; sampled probes; the worst
# of a random and a trained adapter; bench/receipt_tolerances.py): bf16 top-1 0.945, KL 0.0025; bnb-int8 0.92,
# 0.0036; q8_0 0.89, 0.012 (its int8 activations: 0.0018 in float32); q4_0 0.48, 0.43 (q4_1 holds this model's
# weights exactly: 0.93, 0.0057); nf4 0.52, 0.40; fp4 0.38, 0.65; another base 0.0, 4.8. max |Δ| is checked at
# fp32 only: a low-ranked top-k entry moves by up to 2.7 nats in q8_0. (int4 is looser than nf4: no model has both.)
TOLERANCES: dict[str, dict[str, float | None]] = {
    "fp32": {"top1": 1.0, "max_abs": 1e-3, "kl": 1e-6},
    "fp16": {"top1": 0.9, "max_abs": None, "kl": 5e-3},
    "bf16": {"top1": 0.89, "max_abs": None, "kl": 5e-3},
    "int8": {"top1": 0.8, "max_abs": None, "kl": 2e-2},
    "int4": {"top1": 0.3, "max_abs": None, "kl": 0.9},
    "nf4": {"top1": 0.3, "max_abs": None, "kl": 0.8},
    "fp4": {"top1": 0.2, "max_abs": None, "kl": 1.3},
}
# The same for receipts whose probes are random ids (before sampled probes; models that do not generate), from the
# same comparisons on random ids, whose flat distributions make top-1 fragile and KL small: bf16 0.93, 0.0017;
# bnb-int8 0.89, 0.0057; q8_0 0.875, 0.0042; q4_0 0.37, 0.30; nf4 0.44, 0.26; fp4 0.23, 0.59.
RANDOM_PROBE_TOLERANCES: dict[str, dict[str, float | None]] = {
    "fp32": {"top1": 1.0, "max_abs": 1e-3, "kl": 1e-6},
    "fp16": {"top1": 0.9, "max_abs": None, "kl": 5e-3},
    "bf16": {"top1": 0.85, "max_abs": None, "kl": 1e-2},
    "int8": {"top1": 0.75, "max_abs": None, "kl": 2e-2},
    "int4": {"top1": 0.2, "max_abs": None, "kl": 0.6},
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
            with _gathered(layer):
                infos[name], tensors[f"base.{name}"], rows = _fingerprint(layer)
                delta = layer.weight_rows(layer.delta_weight(adapter)).float()
            tensors[f"merged.{name}"] = _sketch(rows + delta.to(rows.device))
    return infos, tensors


def _whole(t: Tensor) -> Tensor:
    """A DTensor (FSDP2's shard) gathered whole: a collective, every process must call it; other tensors as they are."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(t, DTensor):
            return t.full_tensor()
    return t


def _gathered(module: nn.Module):
    """Within the block, the parameters of ``module`` and its submodules that are FSDP2 shards are whole
    (gathered; every process must enter), so the fingerprint hashes and sketches the whole weight, as one
    process does."""
    return swapped_parameters(module, lambda p: None if (w := _whole(p)) is p else nn.Parameter(w, requires_grad=False))


def _model_quantization(model: nn.Module) -> list[str]:
    return sorted({k for m in model.modules() if (k := _quant_kind(m)) is not None})


# ---- probes -------------------------------------------------------------------------------------------------


def special_ids(config: Any) -> set[int]:
    """The special token ids a model config names (bos, eos, pad, unk, sep, cls, mask; lists flattened)."""
    special = {getattr(config, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "unk", "sep", "cls", "mask")}
    return {i for s in special for i in (s if isinstance(s, list | tuple) else [s]) if isinstance(i, int)}


def _allowed_ids(config: Any, vocab: int) -> Tensor:
    """Ids from the first non-special id to the vocabulary's end, none of the config's special ids."""
    special = special_ids(config)
    first = next(i for i in range(vocab) if i not in special)
    return torch.tensor([i for i in range(first, vocab) if i not in special])


def _generates(model: nn.Module) -> bool:
    """A decoder-only model that predicts the next token (transformers' ``can_generate``, an output embedding)."""
    config = getattr(model, "config", None)
    can = getattr(model, "can_generate", None)
    heads = getattr(model, "get_output_embeddings", None)
    return (callable(can) and can() and callable(heads) and heads() is not None
            and not getattr(config, "is_encoder_decoder", False))


# Sampled probes by model, with the base they were sampled from: a training run's saves reuse them.
_SAMPLED: weakref.WeakKeyDictionary[nn.Module, tuple[str, Tensor]] = weakref.WeakKeyDictionary()


def _probe_ids(model: nn.Module, base: str = "") -> tuple[Tensor | None, str]:
    """The default probes ``(4, 32)`` and their kind; ``(None, "none")`` for a model without a vocabulary.

    One generator seeded :data:`PROBE_SEED` draws ids from :func:`_allowed_ids`: all 32 per row for a model
    that does not generate (``"random"``); for a causal LM the first :data:`PROBE_START` only, continued by the
    base model's own samples at temperature 1 (``"sampled"``, :func:`_sampled_ids`), so that the probes are
    typical text for that model, whose next-token distributions are not the flat ones of random ids. They depend
    on the base alone, so they are sampled once per model and ``base`` (a key of its weights and precision)."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        return None, "none"
    allowed = _allowed_ids(config, vocab)
    length = min(PROBE_SHAPE[1], getattr(config, "max_position_embeddings", None) or PROBE_SHAPE[1])
    g = torch.Generator().manual_seed(PROBE_SEED)
    if not _generates(model):
        return allowed[torch.randint(len(allowed), (PROBE_SHAPE[0], length), generator=g)], "random"
    cached = _SAMPLED.get(model)
    if cached is None or cached[0] != base:
        start = allowed[torch.randint(len(allowed), (PROBE_SHAPE[0], min(PROBE_START, length)), generator=g)]
        cached = _SAMPLED[model] = (base, _sampled_ids(model, start, length, allowed, g))
    return cached[1].clone(), "sampled"


def _sampled_ids(model: nn.Module, ids: Tensor, length: int, allowed: Tensor, generator: torch.Generator) -> Tensor:
    """``ids (B, s)`` continued to ``(B, length)`` by the base model (adapters disabled, eval mode, KV cache):
    each next id drawn by ``torch.multinomial`` from ``softmax(logits)`` over ``allowed`` (temperature 1,
    no top-k or top-p; greedy decoding would loop into trivially peaked distributions)."""
    keep, cache, step = None, {}, ids
    with _probing(model, None), disable_adapters(model):
        while ids.shape[1] < length:
            out = model(input_ids=step.to(_device(model)), use_cache=True, **cache)
            logits = out.logits[:, -1].float().cpu()  # (B, V)
            if keep is None:  # (the logits may be wider or narrower than the config's vocabulary)
                keep = torch.zeros(logits.shape[1], dtype=torch.bool)
                keep[allowed[allowed < len(keep)]] = True
            probs = logits.masked_fill(~keep, -math.inf).softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], 1)
            # the cache goes back in under its name (transformers 5.2x renames past_key_values, kept as an alias)
            name = next((k for k in ("cache", "past_key_values") if getattr(out, k, None) is not None), None)
            cache = {} if name is None else {name: getattr(out, name)}
            step = ids[:, -1:] if cache else ids  # a model without a cache reads the whole prefix again
    return ids


@contextmanager
def _probing(model: nn.Module, adapter: str | None):
    """Eval mode, no autograd, ``adapter`` active; the model's modes, active adapters and which parameters are
    trainable (``set_adapter`` marks the active ones) restored after."""
    modes = {m: m.training for m in model.modules()}
    trainable = {p: p.requires_grad for p in model.parameters()}
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
        for p, flag in trainable.items():
            p.requires_grad_(flag)


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


def _reference_outputs(model: nn.Module, adapter: str, text_ids: Tensor | None, base: str) -> tuple[dict[str, Tensor], Any]:
    """The probes' ids and top-k outputs, and the probes' record for the metadata (``"text"`` for the caller's
    ``text_ids``; ``"none"``). None, with a warning, for a model whose forward does not take token ids alone
    (speech, vision): the receipt then holds the fingerprint and checksum only."""
    try:
        ids, kind = (text_ids, "text") if text_ids is not None else _probe_ids(model, base)
        if ids is None:
            return {}, "none"
        with _probing(model, adapter):
            outputs = {**_top_k(_log_probs(model, ids)), "probe.ids": ids}
    except (TypeError, ValueError, RuntimeError, IndexError) as e:
        if text_ids is not None:
            raise
        warnings.warn(f"the receipt of adapter {adapter!r} holds no reference outputs: the model's forward on token ids "
                      f"failed ({type(e).__name__}: {' '.join(str(e).split())[:200]})", stacklevel=4)
        return {}, "none"
    return outputs, kind if kind == "text" else {"seed": PROBE_SEED, "shape": list(ids.shape), "kind": kind}


def make_receipt(model: nn.Module, adapter: str, probe_text_ids: Tensor | None = None, *,
                 tensors: dict[str, Tensor] | None = None) -> Receipt:
    """The receipt of ``adapter`` on ``model`` as it is now. ``probe_text_ids``: the caller's own token ids
    ``(B, T)`` in place of the default probes (they are stored in the receipt). ``tensors``: the adapter's tensors
    as written, where they differ from :func:`lorakit.io.adapter_state_dict` (PEFT's form of ``enable_lora``).
    Under FSDP2 every process calls it (module docstring)."""
    from . import __version__

    fingerprints, stored = _fingerprints(model, adapter)
    text_ids = None if probe_text_ids is None else torch.as_tensor(probe_text_ids).long().reshape(len(probe_text_ids), -1)
    precision = {"forward_dtype": _forward_dtype(model), "quantization": _model_quantization(model)}
    base = json.dumps([precision, sorted((n, f["sha256"]) for n, f in fingerprints.items())])
    outputs, probes = _reference_outputs(model, adapter, text_ids, base)
    stored.update(outputs)
    written = tensors if tensors is not None else {k: _whole(v) for k, v in adapter_state_dict(model, adapter).items()}
    metadata = {"format_version": FORMAT_VERSION, "adapter": adapter, "lorakit_version": __version__,
                "base_model": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
                "probes": probes, **precision, "adapter_sha256": checksum(written), "fingerprints": fingerprints}
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


def tolerance_key(reference: Receipt, model: nn.Module, merged: bool = False) -> str:
    """The key of :data:`TOLERANCES` for comparing ``model`` with ``reference``: the loosest of the precisions
    the two forwards ran in and of the quantizations in which they differ. A ``merged`` model holds
    ``dequant(W) + ΔW``, the trained function whatever the base's quantization was: its own quantizations
    count, as its merged weights were rounded anew (``lorakit merge --requantize``)."""
    keys = [reference.metadata["forward_dtype"], _forward_dtype(model)]
    theirs, mine = set(reference.metadata["quantization"]), set(_model_quantization(model))
    keys += [_KIND_KEY.get(k, "fp4") for k in (mine if merged else theirs ^ mine)]
    order = list(TOLERANCES)
    return max(keys, key=lambda k: order.index(k) if k in order else len(order) - 1)


def tolerances_for(reference: Receipt) -> dict[str, dict[str, float | None]]:
    """:data:`RANDOM_PROBE_TOLERANCES` for a receipt whose probes are random ids (a receipt without a probe kind
    predates sampled probes), else :data:`TOLERANCES` (sampled probes, the caller's text)."""
    probes = reference.metadata.get("probes")
    return RANDOM_PROBE_TOLERANCES if isinstance(probes, dict) and probes.get("kind", "random") == "random" else TOLERANCES


def _passes(figures: dict[str, float], tolerance: dict[str, float | None]) -> bool:
    checks = [figures["top1_agreement"] >= tolerance["top1"], figures["kl_bound"] <= tolerance["kl"]]
    if tolerance.get("max_abs") is not None:
        checks.append(figures["max_abs_logprob"] <= tolerance["max_abs"])
    return all(checks) and all(math.isfinite(v) for v in figures.values())


def override(tolerances: str | None, key: str,
             table: dict[str, dict[str, float | None]] | None = None) -> dict[str, dict[str, float | None]]:
    """``table`` (default :data:`TOLERANCES`) with ``"top1=0.99,kl=1e-3"`` (``name=value``, comma-separated;
    ``none`` turns a check off) applied to ``key``; a ValueError names what it cannot read."""
    table = TOLERANCES if table is None else table
    changed = dict(table[key])
    for item in tolerances.split(",") if tolerances else ():
        name, _, value = item.partition("=")
        if name.strip() not in changed:
            raise ValueError(f"a tolerance takes {', '.join(changed)} (name=value, comma-separated), got {item!r}")
        try:
            changed[name.strip()] = None if value.strip() == "none" else float(value)
        except ValueError:
            raise ValueError(f"tolerance {name}: expected a number or none, got {value!r}") from None
    return {**table, key: changed}


def compare(reference: Receipt, model: nn.Module, adapter: str | None,
            tolerances: dict[str, dict[str, float | None]] | None = None,
            log_probs: Tensor | None = None) -> dict[str, Any]:
    """Re-run ``reference``'s probes on ``model`` with ``adapter`` active (None: a merged model, no adapter)
    and compare: base fingerprint, top-1 agreement, max |Δ log-prob|, KL lower bound, pass / fail.
    ``log_probs``: the probes' log-probabilities ``(positions, V)`` as another engine computed them on
    ``model`` (the server's own rows, :mod:`lorakit.serving.verify`), in place of ``model``'s forward."""
    report: dict[str, Any] = {"fingerprint": _compare_fingerprints(reference, model, adapter)}
    key = tolerance_key(reference, model, merged=adapter is None)
    tolerance = (tolerances or tolerances_for(reference))[key]
    report["tolerance"] = {"key": key, **tolerance}
    if "probe.ids" not in reference.tensors:
        report.update(probes="none", passed=report["fingerprint"]["status"] != "different")
        return report
    if log_probs is None:
        with _probing(model, adapter):
            log_probs = _log_probs(model, reference.tensors["probe.ids"])
    figures = _agreement(reference, log_probs)
    report.update(figures, probes=reference.metadata["probes"])
    report["passed"] = _passes(figures, tolerance) and report["fingerprint"]["status"] != "different"
    return report
