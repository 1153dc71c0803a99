"""Export a LoRA adapter to llama.cpp: its LoRA adapter GGUF (``llama-server --lora adapter.gguf``).

The file holds, for each adapted linear layer ``W: (out, in)`` of the base, two float32 tensors under
llama.cpp's name for ``W`` (gguf's own name map, ``gguf.get_tensor_name_map``; e.g. ``model.layers.0.
self_attn.q_proj`` -> ``blk.0.attn_q.weight``): ``<name>.lora_a`` = ``A: (r, in)`` and ``<name>.lora_b`` =
``B: (out, r)``, PEFT's shapes as they are (GGUF lists dimensions innermost first, so llama.cpp sees
``ne = (in, r)`` and ``(r, out)``, the shapes its loader checks). Metadata: ``general.type = "adapter"``,
``general.architecture`` (the base's), ``adapter.type = "lora"``, ``adapter.lora.alpha``.

Scaling: llama.cpp computes ``h = W x + (alpha / r_t) B A x`` with the file's one ``alpha`` and each
tensor's rank ``r_t`` (``llama_adapter_lora_weight::get_scale``). The adapter's own scaling of a layer
(``alpha_t / r_t``, rsLoRA's ``alpha_t / sqrt(r_t)``, ``rank_pattern`` / ``alpha_pattern``) is folded
into ``B`` by ``scaling_t * r_t / alpha``, a factor of exactly 1 for a plain adapter.

Row order: llama.cpp's GGUF of a ``llama`` model has the query and key rows permuted (within each head
the two rotary halves interleaved: ``convert_hf_to_gguf.py``, ``LlamaModel.permute``; transformers
permutes them back on load), so ``B``'s rows of ``q_proj`` / ``k_proj`` are permuted the same way:
``(B A)`` permuted is ``(B permuted) A``. Other architectures' rows are as in transformers.

What llama.cpp cannot take is refused by name: embeddings and ``modules_to_save`` (whole trained
copies), DoRA, bias training, a LoRA on a module llama.cpp has no tensor for (a tied LM head).

A merged model GGUF: ``lorakit merge --adapter DIR --out merged`` then llama.cpp's
``python convert_hf_to_gguf.py merged --outfile merged.gguf --outtype f16`` (docs/BENCH.md).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import LoraConfig
from .io import read_weights

__all__ = ["ARCHITECTURES", "permute_rows", "gguf_adapter_tensors", "export_gguf"]

# transformers model_type -> (GGUF architecture, whether its q/k rows are permuted in llama.cpp's GGUF)
ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


def _architecture(model_config: Any) -> tuple[str, bool]:
    kind = getattr(model_config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise ValueError(f"llama.cpp export supports base models of type {sorted(ARCHITECTURES)}, got "
                         f"model_type={kind!r}")
    return ARCHITECTURES[kind]


def _refuse_unsupported(config: LoraConfig) -> None:
    for what, bad in (("use_dora", config.use_dora), ("modules_to_save", config.modules_to_save),
                      ("bias", config.bias != "none" and config.bias), ("enable_lora", config.enable_lora)):
        if bad:
            raise ValueError(f"llama.cpp's LoRA GGUF cannot hold {what}={bad!r}: export an adapter without it")


def _pairs(tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """``{module: {"A": A, "B": B}}`` from the adapter file's keys; any other key is refused by name."""
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"llama.cpp's LoRA GGUF holds only lora_A / lora_B of linear layers; the adapter has "
                             f"{key!r} (embeddings, modules_to_save and biases cannot be exported)")
        pairs.setdefault(match["module"], {})[match["which"]] = value
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"adapter file has only lora_{''.join(pair)} for {module!r}: expected lora_A and lora_B")
    return pairs


def _gguf_name(name_map: Any, module: str, model_config: Any) -> str:
    if module.split(".")[-1] == "lm_head" and getattr(model_config, "tie_word_embeddings", False):
        raise ValueError(f"cannot export the LoRA on {module!r}: the base ties its LM head to the input embedding, "
                         "and llama.cpp applies no adapter there")
    name = name_map.get_name(module)
    if name is None:
        raise ValueError(f"cannot export the LoRA on {module!r}: llama.cpp has no tensor for it")
    return name + ".weight"


def permute_rows(b: Tensor, heads: int) -> Tensor:
    """Rows ``(head, half, i)`` (transformers' order) -> ``(head, i, half)`` (llama.cpp's), ``b: (out, r)``."""
    return b.reshape(heads, 2, b.shape[0] // heads // 2, -1).transpose(1, 2).reshape(b.shape)


def gguf_adapter_tensors(tensors: dict[str, Tensor], config: LoraConfig,
                         model_config: Any) -> dict[str, np.ndarray]:
    """llama.cpp's tensors for an adapter (``tensors``: its file's, PEFT keys) on a base with ``model_config``
    (transformers' config): ``{"blk.N.attn_q.weight.lora_a": A (r, in), ...lora_b: B' (out, r)}`` in float32,
    ``B'`` = ``B`` scaled to llama.cpp's ``alpha / r`` and, for llama's q / k, row-permuted (module docstring)."""
    import gguf

    _refuse_unsupported(config)
    arch, permuted = _architecture(model_config)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], model_config.num_hidden_layers)
    heads = {"q_proj": model_config.num_attention_heads,
             "k_proj": getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads}
    out: dict[str, np.ndarray] = {}
    for module, pair in sorted(_pairs(tensors).items()):
        name = _gguf_name(name_map, module, model_config)
        a, b = pair["A"].float(), pair["B"].float()
        r, alpha = config.rank_alpha(module)
        b = b * (config.scaling_of(r, alpha) * a.shape[0] / config.alpha)  # llama.cpp scales by alpha / r_t
        leaf = module.split(".")[-1]
        if permuted and leaf in heads:
            b = permute_rows(b, heads[leaf])
        out[name + ".lora_a"] = a.contiguous().numpy()
        out[name + ".lora_b"] = b.contiguous().numpy()
    return out


def export_gguf(adapter: str | Path, out: str | Path, model_config: Any) -> Path:
    """Write the adapter folder ``adapter`` (PEFT / lorakit) as llama.cpp's LoRA adapter GGUF ``out``."""
    import gguf

    config = LoraConfig.load(adapter)
    with torch.no_grad():
        tensors = gguf_adapter_tensors(read_weights(adapter), config, model_config)
    arch, _ = _architecture(model_config)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config.alpha))
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
