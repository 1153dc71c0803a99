"""Models built on the meta device, then filled in place (issue #28): under ``--fsdp`` a causal LM
is built with no storage, sharded, and each process allocates and reads only its own shard of
every parameter, so no process ever holds the whole base (DDP's copy per process is what FSDP
saves).

- :func:`empty_causal_lm`: a transformers causal LM from its config, every parameter and buffer
  on the meta device (nothing allocated, nothing initialised).
- :class:`Checkpoint`: a model folder's safetensors tensors by name, read one at a time.
- :func:`materialise`: allocates what is still on the meta device on ``device`` (after
  ``fully_shard``: this process's shards only) and fills it module by module: parameters from the
  checkpoint, else (a folder with a config and no weights) by transformers' own init of that
  module, seeded by the module's name, so every process and every run draws the same weights;
  buffers (rotary ``inv_freq``, never in a checkpoint) recomputed by that same init. Tied
  parameters stay one tensor. Tensors already real are left alone: the LoRA factors, which are
  created on the CPU when attached to a meta base (``LoraLayer``), from the random state a
  loaded base would have left, so they equal the normal path's.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

__all__ = ["Checkpoint", "empty_causal_lm", "has_meta", "materialise", "weightless"]

_OTHER_WEIGHTS = ("pytorch_model*.bin", "*.pth", "tf_model.h5", "flax_model.msgpack")


class Checkpoint:
    """The tensors of ``folder``'s ``model.safetensors`` (or the files its
    ``model.safetensors.index.json`` names), one at a time."""

    def __init__(self, folder: str | Path) -> None:
        from safetensors import safe_open

        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            with safe_open(folder / "model.safetensors", "pt") as f:
                self.files = dict.fromkeys(f.keys(), folder / "model.safetensors")
        self._open: dict[Path, object] = {}

    @staticmethod
    def find(folder: str | Path) -> Checkpoint | None:
        """``folder``'s checkpoint; None for a folder with a config and no weights at all (random weights)."""
        folder = Path(folder)
        if _safetensors(folder):
            return Checkpoint(folder)
        other = _other_weights(folder)
        if other:
            raise ValueError(f"{folder}: building on the meta device (--fsdp) reads safetensors files, and this folder "
                             f"holds {other[0]}; save the model with save_pretrained(safe_serialization=True)")
        return None

    def names_for(self, model: nn.Module) -> dict[str, str]:
        """``{model's name: checkpoint key}``, through transformers' own renamings of checkpoint keys
        (legacy names, GPT-NeoX's ``embed_out``, the base model's prefix) as ``from_pretrained`` applies them."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
        expected = {name: True for name, _ in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]}
        prefix = getattr(model, "base_model_prefix", None) or None
        return {rename_source_key(key, renamings, [], prefix, expected)[0]: key for key in self.files}

    def get(self, name: str) -> torch.Tensor | None:
        path = self.files.get(name)
        if path is None:
            return None
        if path not in self._open:
            from safetensors import safe_open

            self._open[path] = safe_open(path, "pt")
        return self._open[path].get_tensor(name)


def _safetensors(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()


def _other_weights(folder: Path) -> list[str]:
    return [p.name for pattern in _OTHER_WEIGHTS for p in folder.glob(pattern)]


def weightless(path: str) -> bool:
    """Whether ``path`` is a model folder with no weight files (a config only: random weights)."""
    folder = Path(path)
    return folder.is_dir() and not _safetensors(folder) and not _other_weights(folder)


def empty_causal_lm(path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM of ``path``'s config on the meta device (in eval mode, as ``from_pretrained``
    returns it; tied weights tied)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def has_meta(model: nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` is on the meta device."""
    return any(t.is_meta for t in [*model.parameters(), *model.buffers()])


@torch.no_grad()
def materialise(model: nn.Module, device: torch.device | str, checkpoint: Checkpoint | None) -> None:
    """Allocate ``model``'s meta tensors on ``device`` (a DTensor: its local shard) and fill them,
    module by module, from ``checkpoint`` (None: seeded random init); see the module docstring.
    Every missing checkpoint tensor is named in one error."""
    pending = [(name, module) for name, module in model.named_modules() if _own_meta(module)]
    with _keep_identity():  # tied parameters are one Parameter in two modules: keep it one
        for _, module in pending:
            module.to_empty(device=device, recurse=False)
    aliases = _aliases(model)
    keys = checkpoint.names_for(model) if checkpoint is not None else {}
    done: set[int] = set()
    missing: list[str] = []
    for name, module in pending:
        params = {n: p for n, p in module._parameters.items() if p is not None and id(p) not in done}
        buffers = {n: b for n, b in module._buffers.items() if b is not None}
        if not params and not buffers:
            continue
        full = {n: torch.empty(p.shape, dtype=p.dtype) for n, p in params.items()}
        if checkpoint is None or buffers:  # transformers' init: the weights, or the buffers it recomputes
            _init_module(model, name, module, full, buffers)
        if checkpoint is not None:
            for n, p in params.items():
                key = next((keys[a] for a in aliases[id(p)] if a in keys), None)  # a tied one: any of its names
                found = checkpoint.get(key) if key is not None else None
                if found is None:
                    missing.append(_join(name, n))
                else:
                    full[n] = found
            for n, b in buffers.items():
                found = checkpoint.get(keys.get(_join(name, n), ""))
                if found is not None:
                    b.copy_(found)
        for n, p in params.items():
            _copy_shard(p, full[n])
            done.add(id(p))
    if missing:
        raise ValueError(f"the checkpoint has no tensor for {len(missing)} parameter(s) of the model: "
                         f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")


def _own_meta(module: nn.Module) -> bool:
    return any(t is not None and t.is_meta for t in [*module._parameters.values(), *module._buffers.values()])


@contextlib.contextmanager
def _keep_identity() -> Iterator[None]:
    """``Module._apply`` swaps tensors in place (the same Parameter object) instead of assigning
    new ones, which would untie tied weights; DTensors are always swapped."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name of each parameter (a tied one has several), in module order."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _join(module: str, tensor: str) -> str:
    return f"{module}.{tensor}" if module else tensor


def _init_module(model: nn.Module, name: str, module: nn.Module, full: dict[str, torch.Tensor],
                 buffers: dict[str, torch.Tensor]) -> None:
    """transformers' ``_init_weights`` of ``module`` on whole tensors: ``full`` (its parameters,
    filled in place) and ``buffers`` (real), through a stand-in of the module's own class (a LoRA
    layer's: the layer it wraps), from a generator seeded by the module's name."""
    from ..layers import LoraLayer

    source = module.base_template if isinstance(module, LoraLayer) else module
    stand = object.__new__(_plain_class(source))  # not copy.copy: an FSDP class's __new__ runs __init__
    stand.__dict__ = dict(source.__dict__)
    stand._parameters = {n: full.get(n) for n in module._parameters}
    stand._buffers = dict(buffers)
    stand._modules = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(name.encode()))
        model._init_weights(stand)


def _plain_class(module: nn.Module) -> type:
    """``module``'s class, before ``fully_shard`` swapped it for ``FSDP<class>``."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def _copy_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy ``full`` into ``param``: its own shard (FSDP2's ``Shard(0)`` chunk) for a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        full = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements,
                                 src_data_rank=None).to_local()
        param = param.to_local()
    param.copy_(full)
