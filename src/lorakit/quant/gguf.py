"""Block-quantized weights read from a GGUF file as they are: no dequantization, no requantization.

A GGUF tensor in ``Q8_0``, ``Q4_0`` or ``Q4_1`` is a row-major ``(out, in)`` matrix of blocks of 32 inputs,
the layouts of :mod:`lorakit.quant.blocks` (byte for byte: float16 ``d`` (and ``m``) then the codes, 4-bit
codes packed in the same nibble order), so each one loads into a :class:`~lorakit.quant.blocks.BlockWeight`
by slicing its bytes; ``Q4_0``'s ``x = d (q - 8)`` is ``d q + m`` with ``m = -8 d`` (exact in float16).

Names: GGUF's (``blk.0.attn_q``, ``token_embd``) are matched to the model's modules with gguf's own
name map (``gguf.get_tensor_name_map``, as transformers does when it loads a GGUF). A file without an
``output`` tensor ties the LM head to ``token_embd`` (as llama.cpp reads it). Row order: llama.cpp's
converter permutes the query and key rows of ``llama`` models (``convert_hf_to_gguf.py``, ``LlamaModel.
permute``: within each head, the two rotary halves interleaved) and transformers permutes them back on load
(``modeling_gguf_pytorch_utils.LlamaTensorProcessor``); the permutation moves whole rows, so it is undone
on ``q``, ``d`` and ``m`` alike. Other layers' rows are as in transformers.

``lorakit models install smollm2`` keeps the GGUF it came from in the installed folder and names it in
``gguf.json`` (:func:`record`, :func:`installed`), so ``--quantize int4`` reads its blocks from there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .blocks import BlockWeight

__all__ = ["RECORD", "ARCHITECTURES", "read_blocks", "record", "installed"]

RECORD = "gguf.json"  # in a model folder: {"file": "<name>.gguf"}, the GGUF its weights were dequantized from
# GGUF architectures whose linear layers are transformers' matrices (llama: after un-permuting q and k rows).
ARCHITECTURES = ("llama", "qwen2", "qwen3")
_FORMATS = {"Q8_0": ("q8_0", 34), "Q4_0": ("q4_0", 18), "Q4_1": ("q4_1", 20)}  # GGUF type -> (format, bytes per block)


def read_blocks(path: str | Path, model: nn.Module) -> dict[str, BlockWeight]:
    """The weights of ``model``'s linear layers that ``path`` stores in ``Q8_0`` / ``Q4_0`` / ``Q4_1``, by module
    name (``model.named_modules()``), in transformers' row order; layers stored otherwise (F32, F16, K-quants)
    or absent are left out. ValueError for an architecture outside :data:`ARCHITECTURES` or a shape that is
    not the layer's."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r}; lorakit reads the blocks of {ARCHITECTURES} GGUFs "
                         "(quantize the model's float weights instead: leave the GGUF out)")
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     int(_field(reader, f"{arch}.block_count")))
    tensors = {t.name: t for t in reader.tensors}
    heads = {".attn_q": int(_field(reader, f"{arch}.attention.head_count"))}
    heads[".attn_k"] = int(_field(reader, f"{arch}.attention.head_count_kv", heads[".attn_q"]))
    found = {}
    for name, module in model.named_modules():
        gguf_name = names.get_name(name) if _is_linear(module) else None
        tensor = tensors.get(f"{gguf_name}.weight")
        if gguf_name == "output" and tensor is None:  # tied: the LM head is the input embedding
            tensor = tensors.get("token_embd.weight")
        if tensor is None or tensor.tensor_type.name not in _FORMATS:
            continue
        weight = _block_weight(tensor)
        if arch == "llama" and gguf_name.endswith(tuple(heads)):
            weight = _unpermute(weight, heads[gguf_name[gguf_name.rindex("."):]])
        expected = (module.out_features, module.in_features)
        if weight.shape != expected:
            raise ValueError(f"{path}: {tensor.name} holds a {weight.shape[0]} x {weight.shape[1]} matrix but {name} is "
                             f"{expected[0]} x {expected[1]}; is this the GGUF of this model?")
        found[name] = weight
    return found


def _is_linear(module: nn.Module) -> bool:
    from ..layers import LoraLinear

    return isinstance(module, nn.Linear | LoraLinear)


def _field(reader, key: str, default=None):
    """A scalar or string field of the GGUF header (``default`` when absent)."""
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ValueError(f"the GGUF has no {key!r} field")
        return default
    value = field.parts[field.data[0]]
    return bytes(value).decode() if value.dtype == np.uint8 else value[0].item()


def _block_weight(tensor) -> BlockWeight:
    """A GGUF tensor's bytes ``(out, blocks * bytes per block)`` sliced into codes and factors."""
    fmt, size = _FORMATS[tensor.tensor_type.name]
    raw = torch.from_numpy(np.array(tensor.data, dtype=np.uint8))
    rows = raw.shape[0]
    raw = raw.reshape(rows, -1, size)  # (out, blocks, bytes)

    def half(start: int) -> Tensor:  # (out, blocks) float16
        return raw[..., start : start + 2].contiguous().view(torch.float16).reshape(rows, -1)

    if fmt == "q8_0":
        return BlockWeight(fmt, raw[..., 2:].contiguous().view(torch.int8).reshape(rows, -1), half(0), None)
    if fmt == "q4_1":
        return BlockWeight(fmt, raw[..., 4:].reshape(rows, -1), half(0), half(2))
    d = half(0)
    return BlockWeight(fmt, raw[..., 2:].reshape(rows, -1), d, d * -8)


def _unpermute(weight: BlockWeight, heads: int) -> BlockWeight:
    """Rows ``(head, i, half)`` (llama.cpp's order) -> ``(head, half, i)`` (transformers'), on each tensor."""

    def rows(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        return t.reshape(heads, t.shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(t.shape)

    return BlockWeight(weight.fmt, rows(weight.q), rows(weight.d), rows(weight.m))


def record(folder: str | Path, gguf_file: str | Path) -> None:
    """Note in ``folder`` (a model folder) that its weights are ``gguf_file``'s, a file inside it."""
    folder, gguf_file = Path(folder), Path(gguf_file)
    if gguf_file.parent.resolve() != folder.resolve():
        raise ValueError(f"the GGUF {gguf_file} must lie in the model folder {folder}")
    (folder / RECORD).write_text(json.dumps({"file": gguf_file.name}) + "\n")


def installed(folder: str | Path) -> Path | None:
    """The GGUF that :func:`record` noted in ``folder``, or None (no record; a hub id, not a folder)."""
    folder = Path(folder).expanduser()
    path = folder / RECORD
    if not path.is_file():
        return None
    gguf_file = folder / json.loads(path.read_text())["file"]
    if not gguf_file.is_file():
        raise ValueError(f"{path} names {gguf_file.name}, which is not in {folder}; reinstall the model")
    return gguf_file
