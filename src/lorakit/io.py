"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are ``base_model.model.<module path>.<factor>``, where ``<factor>`` is
``lora_A.weight`` / ``lora_B.weight`` (``lora_embedding_A`` / ``lora_embedding_B``
for embeddings), and ``lora_magnitude_vector`` for DoRA adapters; trained biases are
``<path>.base_layer.bias`` inside LoRA layers and ``<path>.bias`` elsewhere; saved modules
keep their own state-dict keys.
Only safetensors is read or written: nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .architectures import embedding_modules
from .config import CONFIG_NAME, LoraConfig
from .layers import LoraLayer, ModulesToSave
from .model import (
    _SEQ_CLS_HEADS,
    active_adapters,
    adapter_config,
    add_lora,
    outside_saved_modules,
    remove_adapter,
    set_adapter,
)

__all__ = ["save_adapter", "load_adapter", "adapter_state_dict", "read_weights", "copy_strict", "atomic_write",
           "WEIGHTS_NAME", "PREFIX", "SaveVerificationError"]

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT's task type of a transformers model, by the Auto class whose mapping names its class
# (the bare models last: a few classes are in both)
_TASK_TYPES = (("CAUSAL_LM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
               ("SEQ_2_SEQ_LM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
               ("SEQ_CLS", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
               ("TOKEN_CLS", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
               ("QUESTION_ANS", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
               ("FEATURE_EXTRACTION", "MODEL_MAPPING_NAMES"))


def adapter_state_dict(model: nn.Module, adapter: str) -> dict[str, Tensor]:
    """The live tensors of ``adapter``, under PEFT's file keys (with ``PREFIX``)."""
    bias = adapter_config(model, adapter).bias
    out: dict[str, Tensor] = {}
    for name, module in outside_saved_modules(model):
        path = PREFIX + name
        if isinstance(module, LoraLayer) and adapter in module.adapters:
            key_a, key_b = module.file_keys
            out[f"{path}.{key_a}"] = module.lora_A[adapter]
            out[f"{path}.{key_b}"] = module.lora_B[adapter]
            if adapter in module.lora_magnitude_vector:
                out[f"{path}.lora_magnitude_vector"] = module.lora_magnitude_vector[adapter]
            if bias != "none" and getattr(module, "bias", None) is not None:
                out[f"{path}.base_layer.bias"] = module.bias
        elif isinstance(module, ModulesToSave) and adapter in module.copies:
            out.update({f"{path}.{k}": v for k, v in _state_tensors(module.copies[adapter]).items()})
        elif bias == "all" and module._parameters.get("bias") is not None:
            out[f"{path}.bias"] = module._parameters["bias"]
    return out


def _state_tensors(module: nn.Module) -> dict[str, Tensor]:
    """The live entries of ``module.state_dict()`` (parameters, persistent buffers), found
    without calling it: state-dict hooks (FSDP's) would act on the whole model."""
    out = dict(module.named_parameters(remove_duplicate=False))
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for name, buffer in sub._buffers.items():
            if buffer is not None and name not in sub._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buffer
    return out


def save_adapter(model: nn.Module, directory: str | Path, adapter: str | None = None, *, compact: bool = False,
                 receipt: bool = True) -> Path:
    """Write ``adapter`` (default: the active one) to ``directory`` in PEFT's format.

    An adapter on some output slices of fused projections (``enable_lora``, e.g. GPT-2's
    q and v in ``c_attn``) is written as PEFT's plain LoRA of the same function: rank
    ``k r`` for ``k`` enabled slices, ``B`` block-diagonal with zero rows on the other
    slices, alpha scaled so that the scaling is unchanged; ``compact=True`` keeps
    lorakit's own form instead (``B`` without the zero rows: half the bytes on GPT-2,
    readable by lorakit only). Both files are written to temporary names and renamed
    into place, so a crash never leaves a half-written adapter behind.

    The weights file is then read back and compared with the tensors written: a file that differs
    (a torn or partial write) raises :class:`SaveVerificationError` naming the tensors, instead of
    failing later at resume. With ``receipt`` (the default) ``receipt.safetensors`` is written beside
    them (:mod:`lorakit.receipt`: base fingerprint, checksum, reference outputs on fixed probes).
    """
    if adapter is None:
        active = active_adapters(model)
        if len(active) != 1:
            raise ValueError(f"name the adapter to save: the model has active adapters {list(active)}")
        adapter = active[0]
    config = _described(model, adapter)
    tensors = {k: v.detach().contiguous() for k, v in adapter_state_dict(model, adapter).items()}
    _refuse_shards(model, tensors, receipt)
    if config.enable_lora and not compact:
        config, tensors = _peft_form(model, adapter, config, tensors) or (config, tensors)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _read_back(directory / WEIGHTS_NAME, tensors)
    atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(config.to_json()))
    from . import receipt as receipts  # (lorakit.receipt builds on this module)

    if receipt:
        receipts.write_receipt(directory, receipts.make_receipt(model, adapter, tensors=tensors))
    else:
        (directory / receipts.RECEIPT_NAME).unlink(missing_ok=True)  # an old receipt would vouch for other tensors
    return directory


def _refuse_shards(model: nn.Module, tensors: dict[str, Tensor], receipt: bool) -> None:
    """A ValueError for an FSDP2-sharded model (DTensor parameters) that one process cannot save alone: its adapter
    tensors are shards, or its receipt needs every process (gathered weights, one forward of all)."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor import DTensor

    if any(isinstance(t, DTensor) for t in tensors.values()) or (
            receipt and any(isinstance(p, DTensor) for p in model.parameters())):
        raise ValueError("the model is FSDP-sharded: call lorakit.training.sharded_save.save_adapter_sharded(model, "
                         "directory, world) on every process (it gathers the adapter, checks each process's slice "
                         "and writes the receipt)")


class SaveVerificationError(OSError):
    """The adapter file read back after saving differs from the tensors that were written."""


def _read_back(path: Path, tensors: dict[str, Tensor]) -> None:
    """Compare the file at ``path`` with ``tensors``: the same keys, and every tensor equal (dtype, shape, values)."""
    try:
        found = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise SaveVerificationError(f"{path} cannot be read back after saving (torn write?): {e}") from None
    differ = sorted(k for k in tensors.keys() & found.keys() if found[k].dtype != tensors[k].dtype
                    or found[k].shape != tensors[k].shape or not torch.equal(found[k], tensors[k].cpu()))
    missing, extra = sorted(tensors.keys() - found.keys()), sorted(found.keys() - tensors.keys())
    problems = [f"{len(items)} {what}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
                for what, items in (("tensors differ", differ), ("tensors missing", missing),
                                    ("unexpected tensors", extra)) if items]
    if problems:
        raise SaveVerificationError(f"{path} read back after saving does not hold the tensors written (a torn or "
                                    f"partial write): {'; '.join(problems)}; save again")


def _peft_form(model: nn.Module, adapter: str, config: LoraConfig,
               tensors: dict[str, Tensor]) -> tuple[LoraConfig, dict[str, Tensor]] | None:
    """An ``enable_lora`` adapter as the plain LoRA PEFT reads: ``B`` as ``full_B`` ``(out, k r)``,
    ``r -> k r`` and alpha such that ``alpha' / r'`` (rsLoRA: ``/ sqrt(r')``) is the old scaling.
    Every adapted layer must then have the same ``k`` (PEFT's files have one rank): else None,
    with a warning (the compact form is written)."""
    layers = {PREFIX + name: m for name, m in outside_saved_modules(model)
              if isinstance(m, LoraLayer) and adapter in m.adapters}
    ks = {sum(m.enable[adapter]) if getattr(m, "enable", {}).get(adapter) else 1 for m in layers.values()}
    if len(ks) != 1:
        warnings.warn(f"adapter {adapter!r} adapts some layers on {max(ks)} output slices and others whole, which "
                      "PEFT's files (one rank) cannot hold: written in lorakit's compact form, which PEFT cannot load",
                      stacklevel=3)
        return None
    (k,) = ks
    for path, module in layers.items():
        if module.enable.get(adapter):
            tensors[f"{path}.{module.file_keys[1]}"] = module.full_B(adapter).detach().contiguous()
    factor = k ** 0.5 if config.use_rslora else k
    return dataclasses.replace(config, r=config.r * k, alpha=config.alpha * factor, enable_lora={},
                               rank_pattern={p: v * k for p, v in config.rank_pattern.items()},
                               alpha_pattern={p: v * factor for p, v in config.alpha_pattern.items()}), tensors


def _described(model: nn.Module, adapter: str) -> LoraConfig:
    """``adapter``'s config with what PEFT needs to load the file alone, taken from the model where
    the config leaves it unset (the model's own config object is not changed): the base's
    ``name_or_path`` (as ``PeftModel.save_pretrained``) and the task type of a transformers model."""
    config = adapter_config(model, adapter)
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    task = _task_type(model)
    if task == "SEQ_CLS" and not any(isinstance(m, ModulesToSave) and adapter in m.copies and n in _SEQ_CLS_HEADS
                                     for n, m in model.named_children()):
        task = None  # with SEQ_CLS, PEFT and lorakit load the head from the file: only if the adapter has it
    return dataclasses.replace(config, base_model_name_or_path=config.base_model_name_or_path or name or None,
                               task_type=config.task_type or task)


def _task_type(model: nn.Module) -> str | None:
    """PEFT's task type of a transformers model (``LlamaForCausalLM``: ``CAUSAL_LM``), else None."""
    if "transformers" not in sys.modules:  # then the model is no transformers model: no import for nothing
        return None
    from transformers.models.auto import modeling_auto

    classes = [cls.__name__ for cls in type(model).__mro__]
    for task, mapping in _TASK_TYPES:
        names: set[str] = set()
        for value in getattr(modeling_auto, mapping, {}).values():
            names.update((value,) if isinstance(value, str) else value)
        if any(c in names for c in classes):
            return task
    return None


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` to a temporary name beside ``path``, flush it to disk, rename it into
    place: ``path`` is the old file or the whole new one, even after a crash or power cut."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def read_weights(directory: str | Path) -> dict[str, Tensor]:
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        others = sorted(p.name for p in Path(directory).glob("adapter_model.*")) if Path(directory).is_dir() else []
        hint = f" (found {others}; lorakit reads safetensors only, never pickles)" if others else ""
        raise ValueError(f"no {WEIGHTS_NAME} in {str(directory)!r}{hint}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def load_adapter(model: nn.Module, directory: str | Path, adapter: str = "default", *,
                 resize_saved: bool = False) -> nn.Module:
    """Attach the adapter stored in ``directory`` (PEFT or lorakit) to ``model`` as ``adapter``.

    Loading is strict: if the file's tensors do not match the model's adapter
    exactly, one ``ValueError`` lists every missing and unexpected key and every
    shape mismatch, and the model is left as it was. With ``resize_saved``, the
    adapter's copies of saved modules take the file's shapes instead, so that
    adapters whose heads have different label counts (MRPC's 2, STS-B's 1) share one
    base model.
    """
    config = LoraConfig.load(directory)
    tensors = _with_prefix(read_weights(directory))
    broken = sorted(k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if broken:
        raise ValueError(f"the adapter in {str(directory)!r} holds NaN or infinite values in {len(broken)} tensor(s): "
                         f"{', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''}")
    _check_ranks(config, tensors, str(directory))
    active = active_adapters(model)
    try:
        add_lora(model, config, adapter)  # all or nothing itself
    except ValueError as e:
        raise ValueError(f"the adapter in {str(directory)!r} does not fit this model: {e}") from None
    try:
        if resize_saved:
            _resize_saved_copies(model, adapter, tensors)
        expected = {**adapter_state_dict(model, adapter), **_embedding_weights(model, tensors, str(directory))}
        copy_strict(expected, tensors, str(directory))
    except BaseException:
        if active:
            set_adapter(model, active)
        remove_adapter(model, adapter)
        raise
    return model


def _check_ranks(config: LoraConfig, tensors: dict[str, Tensor], source: str) -> None:
    """Before allocating factors of the config's ranks: each ``lora_A`` in the file has at least
    the rows its config gives its layer (``r``, or ``rank_pattern``'s), else a ValueError."""
    for key, t in tensors.items():
        for suffix in (".lora_A.weight", ".lora_embedding_A"):
            if key.endswith(suffix) and t.dim() >= 1:
                path = key[len(PREFIX):-len(suffix)]
                r = config.rank_alpha(path)[0]
                if r > t.shape[0]:
                    raise ValueError(f"the adapter in {source!r} has r={r} in its config for {path}, but its lora_A "
                                     f"has {t.shape[0]} rows")


def _embedding_weights(model: nn.Module, tensors: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """The model's input and output embedding weights that the file carries in full (PEFT's
    ``save_embedding_layers``, on by default when they are targeted or the vocabulary was
    resized): ``<path>.base_layer.weight`` in a LoRA layer, ``<path>.weight`` otherwise. PEFT
    loads them into the base model, and so does lorakit (tied weights change together)."""
    embeddings = [e for e in embedding_modules(model) if e is not None]
    out: dict[str, Tensor] = {}
    for name, module in outside_saved_modules(model):
        if name and any(module is e for e in embeddings):
            key = f"{PREFIX}{name}.{'base_layer.' if isinstance(module, LoraLayer) else ''}weight"
            if key in tensors and tensors[key].shape != module.weight.shape:
                raise ValueError(f"the adapter in {source!r} holds {name} with shape {tuple(tensors[key].shape)}, the "
                                 f"model's is {tuple(module.weight.shape)}: its vocabulary was resized; call "
                                 f"model.resize_token_embeddings({tensors[key].shape[0]}) before loading it")
            if key in tensors:
                out[key] = module.weight
    return out


def _resize_saved_copies(model: nn.Module, adapter: str, tensors: dict[str, Tensor]) -> None:
    """Give ``adapter``'s saved-module parameters the shapes their file tensors have."""
    for name, module in outside_saved_modules(model):
        if not (isinstance(module, ModulesToSave) and adapter in module.copies):
            continue
        for key, param in list(module.copies[adapter].named_parameters()):
            found = tensors.get(f"{PREFIX}{name}.{key}")
            if found is None or found.shape == param.shape:
                continue
            owner_name, _, attr = key.rpartition(".")
            owner = module.copies[adapter].get_submodule(owner_name)
            setattr(owner, attr, nn.Parameter(param.new_empty(found.shape), requires_grad=param.requires_grad))
            if isinstance(owner, nn.Linear):
                owner.out_features, owner.in_features = owner.weight.shape


def _with_prefix(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """File keys under ``PREFIX`` (some tools save them without it)."""
    if tensors and not any(k.startswith(PREFIX) for k in tensors):
        return {PREFIX + k: v for k, v in tensors.items()}
    return tensors


def copy_strict(expected: dict[str, Tensor], found: dict[str, Tensor], source: str) -> None:
    found = _with_prefix(found)
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    shapes = sorted(
        f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected.keys() & found.keys()
        if found[k].shape != expected[k].shape
    )
    problems = [
        f"{len(items)} {what}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
        for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if items
    ]
    if problems:
        raise ValueError(f"adapter in {source!r} does not match the model; " + "; ".join(problems))
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(found[key])
