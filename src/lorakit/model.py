"""Model-level LoRA operations: attach, freeze, switch, disable, merge, unload.

All of them walk the model for lorakit's layer types (never parameter-name
substrings) and change it in place.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
import weakref
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from . import quant
from .architectures import MOE_PROJECTION_NAMES, PEFT_DEFAULT_TARGETS, embedding_modules, expert_weights, fused_slices, model_type
from .config import LoraConfig
from .layers import LoraLayer, LoraLinear, ModulesToSave, RowPlan, lora_class_for

__all__ = [
    "add_lora",
    "add_weighted_adapter",
    "trainable_parameters",
    "ParameterCount",
    "set_adapter",
    "adapter_per_row",
    "mark_trainable",
    "delete_adapter",
    "disable_adapters",
    "merge",
    "unmerge",
    "merge_and_unload",
    "lora_layers",
    "lora_parameters",
    "adapter_names",
    "active_adapters",
    "adapter_config",
    "default_target_modules",
    "frozen_parameter_names",
    "UntiedWeightsWarning",
    "QuantizedMergeWarning",
]

# Attention query/value projections by the names common model families give them.
_QUERY_VALUE_NAMES = (("query", "value"), ("q", "v"), ("q_proj", "v_proj"), ("q_lin", "v_lin"), ("c_attn",))
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")
# The classification heads of transformers' sequence classifiers; PEFT trains them whole
# (modules_to_save) for task_type SEQ_CLS and never puts LoRA on them.
_SEQ_CLS_HEADS = ("classifier", "score")


class UntiedWeightsWarning(UserWarning):
    """Merging gave a layer its own copy of a weight it shared (tied embeddings): the model
    grows by that matrix and its config no longer ties them."""


class QuantizedMergeWarning(UserWarning):
    """Merging into a quantized base (bitsandbytes) made its merged layers plain float layers holding
    ``dequant(W) + ΔW``: exact, and as large as that float dtype makes them."""


class ParameterCount(NamedTuple):
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """``(name, layer)`` for every LoRA layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def lora_parameters(model: nn.Module, adapter: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
    """The LoRA factors of ``adapter`` (all adapters if None), and DoRA adapters' magnitudes, with
    their state-dict names."""
    for name, layer in lora_layers(model):
        for which in ("lora_A", "lora_B", "lora_magnitude_vector"):
            for key, param in getattr(layer, which).items():
                if adapter is None or key == adapter:
                    yield f"{name}.{which}.{key}", param


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters attached to ``model``, in the order they were added."""
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """The adapters whose updates the model's forward adds, in the order they were added."""
    active = {name for _, layer in lora_layers(model) for name in layer.active}
    return tuple(name for name in adapter_names(model) if name in active)


def adapter_config(model: nn.Module, adapter: str) -> LoraConfig:
    """The configuration ``adapter`` was attached with (target modules resolved)."""
    for _, layer in lora_layers(model):
        if adapter in layer.configs:
            return layer.configs[adapter]
    raise ValueError(f"no adapter named {adapter!r}; the model has {adapter_names(model)}")


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameter counts (shared parameters counted once)."""
    params = {id(p): p for p in model.parameters()}.values()
    return ParameterCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def frozen_parameter_names(model: nn.Module) -> set[str]:
    """Every state-dict name of every frozen parameter, tied aliases included (``lm_head.weight``
    of a model whose output layer shares the input embedding): what training checkpoints leave out.
    Judged on the parameter itself, so an alias is frozen exactly when what it names is."""
    return {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


# ---- attaching ---------------------------------------------------------------------------


def _matches(name: str, patterns: Sequence[str] | str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _kind(module: nn.Module) -> type[LoraLayer] | None:
    return type(module) if isinstance(module, LoraLayer) else lora_class_for(module)


def _adaptable(model: nn.Module) -> dict[str, nn.Module]:
    """Modules lorakit can wrap (or has wrapped), by name; the root itself is excluded."""
    return {name: module for name, module in model.named_modules() if name and _kind(module) is not None}


def _leaf_names(names: Sequence[str]) -> str:
    return ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names}))


def default_target_modules(model: nn.Module) -> tuple[str, ...] | str:
    """What PEFT adapts by default for the model's family (``config.model_type``), else the
    model's attention query and value projections, whatever they are called."""
    kind = model_type(model)
    if kind in PEFT_DEFAULT_TARGETS:
        return PEFT_DEFAULT_TARGETS[kind]
    leaves = {name.rsplit(".", 1)[-1] for name in _adaptable(model)}
    for names in _QUERY_VALUE_NAMES:
        if set(names) <= leaves:
            return names
    raise ValueError(
        "could not find query/value projections in this model; pass target_modules "
        f"(module names found: {_leaf_names(list(_adaptable(model)))})"
    )


def _resolve_targets(model: nn.Module, config: LoraConfig) -> tuple[LoraConfig, dict[str, nn.Module]]:
    targets = config.target_modules
    if targets is None:
        targets = default_target_modules(model)
        config = dataclasses.replace(config, target_modules=targets)
    saved = [n for n, m in model.named_modules() if isinstance(m, ModulesToSave) or _matches(n, _saved_patterns(config))]
    candidates = {
        name: module
        for name, module in _adaptable(model).items()
        if not any(name == s or name.startswith(s + ".") for s in saved)
    }
    if targets == "all-linear":  # as PEFT: every linear layer but the output layer and a classification head
        _check_no_experts(model, "target_modules='all-linear'")
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        chosen = {n: m for n, m in candidates.items()
                  if _kind(m) is LoraLinear and m is not output and n.split(".", 1)[0] not in _SEQ_CLS_HEADS}
    else:
        _check_reachable(model, targets, saved)
        chosen = {n: m for n, m in candidates.items() if _matches(n, targets)}
    if not chosen:
        raise ValueError(
            f"target_modules={targets!r} matched no adaptable module; adaptable module names are: "
            f"{_leaf_names(list(candidates))}"
        )
    return config, chosen


def _check_no_experts(model: nn.Module, what: str, peft_does: str = "also adapts the router and the fused expert "
                      "weights") -> None:
    """Refuse where PEFT would also adapt a mixture-of-experts model's router and fused
    experts (its target_parameters), which lorakit cannot: never adapt less, silently."""
    experts = expert_weights(model, lambda m: _kind(m) is not None)
    if experts:
        leaves = ", ".join(sorted({re.sub(r"^.*\.\d+\.", "", n) for n in experts}))  # per-layer names
        raise ValueError(
            f"{what} on this mixture-of-experts model ({model_type(model)}): PEFT {peft_does} ({leaves}: "
            f"{len(experts)} tensors here) through target_parameters, which lorakit does not support (LoRA on fused "
            "expert tensors); name the modules to adapt instead, e.g. "
            "target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj'] for the attention only"
        )


def _check_reachable(model: nn.Module, targets: Sequence[str] | str, saved: list[str]) -> None:
    """Refuse a target that names weights lorakit cannot adapt and PEFT would: a module that owns
    a weight matrix but is no layer type lorakit wraps (a MoE router), or, on a mixture-of-experts
    model, a transformers-4 expert name (``w1``, ``gate_proj``) that PEFT maps to fused experts."""
    skip = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, LoraLayer)) + tuple(f"{s}." for s in saved)
    for name, module in model.named_modules():
        if (name and _kind(module) is None and _matches(name, targets) and not name.startswith(skip)
                and any(p.dim() >= 2 for p in module.parameters(recurse=False))):
            raise ValueError(f"target_modules={targets!r} matches {name!r} ({type(module).__name__}), a layer lorakit "
                             "cannot adapt: it adapts Linear, GPT-2's Conv1D, Embedding and Conv1d/Conv2d, not other "
                             "modules' weights (PEFT's target_parameters, e.g. a mixture-of-experts router)")
    if isinstance(targets, str) or not expert_weights(model, lambda m: _kind(m) is not None):
        return
    names = [n for n, _ in model.named_modules()]
    for t in targets:
        if t in MOE_PROJECTION_NAMES and not any(_matches(n, [t]) for n in names):
            _check_no_experts(model, f"target_modules entry {t!r} (a transformers-4 expert name)",
                              "maps it to the router or fused expert weights")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
    _ADAPTER_MODULES.clear()  # (of every model: ``model`` may be a part of another one walked before)


# Each model's LoRA layers and saved modules, walked once: adapter_per_row runs at every decode step of a
# server, and a walk of a 135M-parameter model's modules took 2.8 ms of a 70 ms step. Every change lorakit
# makes to which modules these are goes through _replace, which forgets them; a module swapped by hand
# behind lorakit's back is not seen (lorakit's own operations, add_lora for one, walk afresh).
_ADAPTER_MODULES: weakref.WeakKeyDictionary[nn.Module, tuple[nn.Module, ...]] = weakref.WeakKeyDictionary()


def _adapter_modules(model: nn.Module) -> tuple[nn.Module, ...]:
    """``model``'s LoRA layers and saved modules (remembered until :func:`_replace` changes some)."""
    found = _ADAPTER_MODULES.get(model)
    if found is None:
        found = _ADAPTER_MODULES[model] = tuple(m for m in model.modules() if isinstance(m, LoraLayer | ModulesToSave))
    return found


def _check_not_merged(model: nn.Module, action: str) -> None:
    if any(layer.merged for _, layer in lora_layers(model)):
        raise ValueError(f"cannot {action} while adapters are merged; call lorakit.unmerge(model) first")


def add_lora(model: nn.Module, config: LoraConfig, adapter: str = "default") -> nn.Module:
    """Attach a new LoRA adapter to ``model`` in place and return ``model``.

    Matching layers are replaced by LoRA wrappers (their weights untouched, ``B = 0``
    so outputs do not change). The first adapter of a model becomes active; later
    ones are activated with :func:`set_adapter`. Only active adapters' factors,
    ``modules_to_save`` copies and biases per ``config.bias`` stay trainable.
    """
    config = LoraConfig.coerce(config)  # a peft.LoraConfig or a dict of PEFT's keys also do
    if not isinstance(adapter, str) or not _ADAPTER_NAME.fullmatch(adapter):
        raise ValueError(f"adapter name must be letters, digits, '_' or '-', got {adapter!r}")
    existing = adapter_names(model)
    if adapter in existing:
        raise ValueError(f"the model already has an adapter named {adapter!r}; pick another name or delete it first")
    _check_not_merged(model, "add an adapter")
    quant.adopt_all(model)  # bitsandbytes layers compute what the adapter will be trained against (lorakit.quant)
    config, targets = _resolve_targets(model, config)
    unknown = [k for k in config.enable_lora if not any(_matches(n, [k]) for n in targets)]
    if unknown:
        raise ValueError(f"enable_lora keys {unknown} match none of the target modules {sorted(targets)}")
    active = active_adapters(model)
    try:  # all or nothing: a failure part-way leaves no trace of the adapter
        for name, module in targets.items():
            if not isinstance(module, LoraLayer):
                module = lora_class_for(module)(module)
                _replace(model, name, module)
            enable = next((mask for key, mask in config.enable_lora.items() if _matches(name, [key])), None)
            linear = enable is not None and isinstance(module, LoraLinear)
            slices = fused_slices(model, name, module.out_features) if linear else None
            module.add_adapter(adapter, config, enable, slices, path=name)
        _add_saved_modules(model, config, adapter)
    except BaseException:
        remove_adapter(model, adapter)
        raise
    set_adapter(model, active or adapter)
    return model


def _saved_patterns(config: LoraConfig) -> tuple[str, ...]:
    """``modules_to_save``, plus the classification heads for ``task_type="SEQ_CLS"`` (as PEFT)."""
    extra = _SEQ_CLS_HEADS if config.task_type == "SEQ_CLS" else ()
    return tuple(dict.fromkeys((*config.modules_to_save, *extra)))


def _add_saved_modules(model: nn.Module, config: LoraConfig, adapter: str) -> None:
    for pattern in _saved_patterns(config):
        found = [(n, m) for n, m in model.named_modules() if n and _matches(n, [pattern])]
        if not found and config.task_type == "SEQ_CLS" and pattern in _SEQ_CLS_HEADS:
            continue  # PEFT names both heads for every classifier; a model has one of them
        if not found:
            raise ValueError(f"modules_to_save entry {pattern!r} matches no module of the model")
        for name, module in found:
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module)
                _replace(model, name, module)
            module.add_adapter(adapter)


def add_weighted_adapter(model: nn.Module, weights: Mapping[str, float], adapter: str) -> nn.Module:
    """A new adapter whose update is exactly ``sum_i w_i ΔW_i`` (PEFT's ``combination_type="cat"``).

    Per layer, ``A = [A_1; A_2; ...]`` (rank ``sum_i r_i``) and ``B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]``
    with ``s_i`` each adapter's scaling, and scaling 1 (``alpha = r``; layers whose ranks differ
    get theirs through ``rank_pattern``). The adapters must cover the same layers and bring no
    saved modules (heads cannot be mixed), q/v slices nor DoRA magnitudes.
    """
    names = list(weights)
    unknown = [n for n in names if n not in adapter_names(model)]
    if not names or unknown:
        raise ValueError(f"weights must name adapters of the model, got {names} (unknown: {unknown}); "
                         f"the model has {adapter_names(model)}")
    if not all(isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) for w in weights.values()):
        raise ValueError(f"weights must be finite numbers, got {dict(weights)}")
    configs = [adapter_config(model, n) for n in names]
    if any(c.enable_lora for c in configs) or any(n in m.copies for m in model.modules()
                                                  if isinstance(m, ModulesToSave) for n in names):
        raise ValueError(f"adapters {names} have q/v slices or saved modules (heads), which cannot be combined")
    dora = [n for n, c in zip(names, configs) if c.use_dora]
    if dora:
        raise ValueError(f"adapters {dora} are DoRA adapters (use_dora), whose updates are no sums of B A: they cannot "
                         "be combined; merge them into the base (lorakit.merge) one at a time instead")
    layers = [(path, layer) for path, layer in lora_layers(model) if set(names) & set(layer.adapters)]
    for path, layer in layers:
        if not set(names) <= set(layer.adapters):
            raise ValueError(f"{path} has adapters {sorted(set(names) & set(layer.adapters))} only; "
                             f"every adapter in {names} must cover the same layers")
    r = sum(c.r for c in configs)
    ranks = {re.escape(path): sum(layer.ranks[n] for n in names) for path, layer in layers}
    ranks = {path: k for path, k in ranks.items() if k != r}  # rank_pattern / alpha_pattern: per-layer ranks
    add_lora(model, LoraConfig(r=r, alpha=float(r), target_modules=tuple(p for p, _ in layers), dropout=configs[0].dropout,
                               base_model_name_or_path=configs[0].base_model_name_or_path, task_type=configs[0].task_type,
                               rank_pattern=ranks, alpha_pattern={p: float(k) for p, k in ranks.items()}),
             adapter)
    with torch.no_grad():
        for _, layer in layers:
            layer.lora_A[adapter].copy_(torch.cat([layer.lora_A[n] for n in names], 0))
            layer.lora_B[adapter].copy_(torch.cat([weights[n] * layer.scaling(n) * layer.lora_B[n] for n in names], 1))
    return model


# ---- switching ---------------------------------------------------------------------------


def set_adapter(model: nn.Module, adapter: str | Sequence[str]) -> None:
    """Make ``adapter`` (or several, whose updates add up) the active one(s) and the
    only trainable LoRA factors."""
    if isinstance(adapter, Mapping):
        raise TypeError("set_adapter takes adapter names, not weights; for a weighted combination call "
                        "lorakit.add_weighted_adapter(model, {'a': 0.7, 'b': 0.3}, 'mix') and activate 'mix'")
    names = (adapter,) if isinstance(adapter, str) else tuple(adapter)
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown adapter(s) {unknown or names!r}; the model has {known}")
    if active_adapters(model) != names:
        _check_not_merged(model, "switch adapters")
    saved = [m for m in model.modules() if isinstance(m, ModulesToSave)]
    for module in saved:
        with_copy = [n for n in names if n in module.copies]
        if len(with_copy) > 1:
            raise ValueError(f"adapters {with_copy} each have their own copy of a saved module; activate one of them")
    for module in saved:
        module.active = next((n for n in names if n in module.copies), None)
    for _, layer in lora_layers(model):
        layer.active = tuple(n for n in names if n in layer.adapters)
    _mark_trainable(model, names)


@contextmanager
def adapter_per_row(model: nn.Module, adapters: Sequence[str | None], check_factors: bool = True) -> Iterator[nn.Module]:
    """Within the block, row ``i`` of every batch goes through adapter ``adapters[i]``
    (``None``: the base model), whatever ``set_adapter`` says (paper section 4.2)::

        with lorakit.adapter_per_row(model, ["mrpc", "rte", "mrpc", None]):
            logits = model(**batch).logits

    One batched multiply serves all adapters (ranks may differ); saved modules such as
    classifier heads run per adapter on their rows. Works in training: gradients reach
    the adapters used by some row (make them trainable with :func:`mark_trainable`).

    Without autograd, the adapters' stacked factors are kept between batches and checked for
    in-place changes to the factors a batch reads. ``check_factors=False`` skips that check, for
    a caller whose adapters are only added and removed (:func:`load_adapter`,
    :func:`remove_adapter`: both drop the stacks), never changed in place: a server (over 32
    adapters, ~3,800 version reads a step).
    """
    names = list(adapters)
    layers = [m for m in _adapter_modules(model) if isinstance(m, LoraLayer)]
    known = {n for layer in layers for n in layer.configs}
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; the model has {adapter_names(model)}")
    if any(layer.merged for layer in layers):
        _check_not_merged(model, "use per-row adapters")
    with _set_on_adapter_modules(model, "rows", RowPlan(names, check_factors)):
        yield model


def mark_trainable(model: nn.Module, adapters: Sequence[str]) -> None:
    """Make exactly these adapters' factors and saved-module copies trainable (several
    at once, for training them together with :func:`adapter_per_row`)."""
    unknown = [n for n in adapters if n not in adapter_names(model)]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; the model has {adapter_names(model)}")
    _mark_trainable(model, adapters)


def outside_saved_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()`` without what lies inside a :class:`ModulesToSave`."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, ModulesToSave):
            inside.append(name + ".")
        yield name, module


def _mark_trainable(model: nn.Module, active: Sequence[str]) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    biases = {adapter_config(model, n).bias for n in active}
    for _, module in outside_saved_modules(model):
        bias = module._parameters.get("bias")
        if bias is not None and ("all" in biases or ("lora_only" in biases and isinstance(module, LoraLayer))):
            bias.requires_grad_(True)
        if isinstance(module, LoraLayer):
            for n in set(active) & set(module.adapters):
                module.lora_A[n].requires_grad_(True)
                module.lora_B[n].requires_grad_(True)
                if n in module.lora_magnitude_vector:
                    module.lora_magnitude_vector[n].requires_grad_(True)
        elif isinstance(module, ModulesToSave):
            for n in set(active) & set(module.copies):
                module.copies[n].requires_grad_(True)


def delete_adapter(model: nn.Module, adapter: str) -> None:
    """Remove ``adapter``; layers left without adapters become plain modules again."""
    if adapter not in adapter_names(model):
        raise ValueError(f"no adapter named {adapter!r}; the model has {adapter_names(model)}")
    if adapter in active_adapters(model):
        raise ValueError(f"cannot delete the active adapter {adapter!r}; call set_adapter with another one first")
    remove_adapter(model, adapter)


def remove_adapter(model: nn.Module, adapter: str) -> None:
    """Remove ``adapter`` whatever its state (used to undo a failed load)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer) and adapter in module.adapters:
            module.remove_adapter(adapter)
            if not module.adapters:
                _replace(model, name, module.unwrap())
        elif isinstance(module, ModulesToSave) and adapter in module.copies:
            module.remove_adapter(adapter)
            if not module.copies:
                _replace(model, name, module.original)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: no LoRA branch, original weights, original saved modules."""
    with _set_on_adapter_modules(model, "disabled", True):
        yield model


@contextmanager
def _set_on_adapter_modules(model: nn.Module, attr: str, value) -> Iterator[None]:
    """Set ``attr`` on every LoRA layer and saved module for the block, then restore
    each one's previous value (so blocks nest)."""
    modules = _adapter_modules(model)
    before = [m.__dict__[attr] for m in modules]  # (plain attributes: nn.Module's __setattr__ is slow for them)
    for m in modules:
        m.__dict__[attr] = value
    try:
        yield
    finally:
        for m, state in zip(modules, before):
            m.__dict__[attr] = state


# ---- merging -----------------------------------------------------------------------------


def merge(model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Merge the active adapters into the base weights (idempotent, exact to unmerge).

    Over a quantized base (bitsandbytes 4 or 8 bits) a merged layer holds ``dequant(W) + ΔW``
    in ``dtype`` (default: its compute dtype), exactly the function the adapter was trained
    against, instead of its quantized weight; a :class:`QuantizedMergeWarning` says so.

    A LoRA layer whose weight another module shares (tied input and output embeddings,
    T5's shared embedding) gets its own merged copy, so the other module keeps the base
    weight and merged = unmerged; the model then holds one more matrix and its config says
    ``tie_word_embeddings=False``, so that a saved copy is not tied again on load. A
    warning says so; :func:`unmerge` ties them again.
    """
    _merge(model, keep_original=True, dtype=dtype)


def unmerge(model: nn.Module) -> None:
    """Restore the base weights exactly as they were before :func:`merge` (and re-tie
    the weights that merging untied)."""
    retie = any(layer.tied_weight is not None for _, layer in lora_layers(model))
    for _, layer in lora_layers(model):
        layer.unmerge()
    if retie and _embeddings_tied(model) is True:
        _set_tie_flag(model, True)


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Merge the active adapters and return ``model`` with only plain torch modules:
    LoRA wrappers become the layers they wrapped, saved modules their active copy.
    Shared weights are untied as in :func:`merge`; layers over a quantized base become
    ``nn.Linear`` layers of ``dtype`` as in :func:`merge` (the others stay quantized)."""
    _merge(model, keep_original=False, dtype=dtype)
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            _replace(model, name, module.unwrap())
        elif isinstance(module, ModulesToSave):
            _replace(model, name, module.current)
    if _embeddings_tied(model) is False and _set_tie_flag(model, False):  # a saved copy of the head (modules_to_save)
        warnings.warn("the output embedding no longer shares its weight with the input embedding; "
                      "config.tie_word_embeddings set to False so that a saved copy is not tied again on load",
                      UntiedWeightsWarning, stacklevel=2)
    return model


def _merge(model: nn.Module, keep_original: bool, dtype: torch.dtype | None = None) -> None:
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    untied, dequantized = [], []
    for name, layer in lora_layers(model):
        untie = counts[id(layer.weight)] > 1 and not layer.merged and bool(layer.active)
        (dequantized if layer.quantized and not layer.merged and layer.active else []).append(layer)
        layer.merge(keep_original, untie=untie, dtype=dtype)
        if untie:
            untied.append(name)
    if dequantized:
        kinds = sorted({str(layer.weight.dtype).removeprefix("torch.") for layer in dequantized})
        warnings.warn(f"merged {len(dequantized)} layers into a quantized base: each is now a {'/'.join(kinds)} layer "
                      "holding dequant(W) + ΔW, exactly the function the adapter was trained against, and as large as "
                      "that dtype makes it; re-quantizing it (lorakit merge --requantize) would round the merged "
                      "weights", QuantizedMergeWarning, stacklevel=3)
    if untied:
        flag = _embeddings_tied(model) is False and _set_tie_flag(model, False)
        warnings.warn(
            f"merging gave {', '.join(untied)} its own copy of a weight it shared with another module (tied "
            "embeddings), so that module keeps the base weight and merged = unmerged; the model holds one more "
            "matrix per untied layer" + ("; config.tie_word_embeddings set to False so that a saved copy is not "
                                         "tied again on load" if flag else ""), UntiedWeightsWarning, stacklevel=3)


def _embeddings_tied(model: nn.Module) -> bool | None:
    """Whether the input and output embeddings hold the same weight; None if the model
    has not both (not a transformers language model)."""
    embed, head = embedding_modules(model)
    return None if embed is None or head is None else embed.weight is head.weight


def _set_tie_flag(model: nn.Module, value: bool) -> bool:
    """Set ``tie_word_embeddings`` on the model's config (and its text config) where it
    says the opposite; True if any changed."""
    config = getattr(model, "config", None)
    configs = {id(c): c for c in (config, getattr(config, "get_text_config", lambda: None)()) if c is not None}
    changed = [c for c in configs.values() if getattr(c, "tie_word_embeddings", value) is not value]
    for c in changed:
        c.tie_word_embeddings = value
    return bool(changed)
