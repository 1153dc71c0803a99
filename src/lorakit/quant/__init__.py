"""Quantized base weights: frozen layers stored in 4 or 8 bits that LoRA adapts (QLoRA, Dettmers et al. 2023).

Today the bitsandbytes layers transformers loads with ``BitsAndBytesConfig``: ``Linear4bit`` (nf4 or
fp4 codes, one absmax per 64 weights, optionally itself quantized: double quantization) and
``Linear8bitLt`` (LLM.int8: int8 rows and a scale per row). :mod:`lorakit.quant.bnb` holds their
specifics; this module stays light and imports bitsandbytes only when a model holds its layers (then
it is imported already) or a quantized load is asked for.

A quantized base is a property of a layer: :func:`adopt` gives each bitsandbytes layer lorakit's
forward (the same parameters, state-dict keys and class, subclassed), which computes
``x dequant(W)^T + b`` in the layer's compute dtype from the true weights on every CPU kind, and a
``dequantize()`` method: the two things the LoRA wrapper asks of the weight it wraps.

Decoding (``lorakit serve / generate --quantize int8 | int4``, :data:`QUANTIZE`) uses lorakit's own
block-quantized layers instead: :mod:`lorakit.quant.linear` (GGUF's q8_0 / q4_1 layouts, C++ kernels
compiled at first use) and :mod:`lorakit.quant.gguf` (a GGUF's blocks read as they are). The two flags
never share a value: ``--quantize-base`` loads a bitsandbytes base for training, ``--quantize`` rounds a
float base for decoding.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["QUANTIZE_BASE", "QUANTIZE", "check_quantize", "require_kernels", "adopt", "adopt_all", "is_quantized",
           "require_bitsandbytes", "check_quantize_base", "load_kwargs", "base_quantization",
           "current_base_quantization", "output_error", "SKIPPED_HEADS"]

# --quantize-base values. bnb-int8 (bitsandbytes' LLM.int8 base, for training) is not lorakit serve's
# --quantize int8 (lorakit's own int8 decoding kernel): two things must not share one name.
QUANTIZE_BASE = ("nf4", "fp4", "bnb-int8")
# --quantize values (lorakit.quant.linear.SCHEMES): weight-only block formats for decoding a float base.
QUANTIZE = ("int8", "int4")
# Classification heads stay in full precision: lorakit trains them whole (modules_to_save).
SKIPPED_HEADS = ("classifier", "score")
INSTALL_HINT = "pip install 'lorakit[quant]'"


def require_bitsandbytes(what: str) -> None:
    """Raise one line naming the extra when bitsandbytes is not installed."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"{what} needs bitsandbytes: {INSTALL_HINT}")


def check_quantize_base(value: str | None) -> None:
    """``value`` is None or one of :data:`QUANTIZE_BASE` (``int8`` is refused for its two meanings)."""
    if value is None or value in QUANTIZE_BASE:
        return
    if value in QUANTIZE:
        raise ValueError(f"quantize_base {value!r} is a --quantize value (lorakit's decoding kernels); for a "
                         f"bitsandbytes base say one of {QUANTIZE_BASE} (bnb-int8: LLM.int8)")
    raise ValueError(f"quantize_base must be one of {QUANTIZE_BASE} (or none), got {value!r}")


def check_quantize(value: str | None) -> None:
    """``value`` is None or one of :data:`QUANTIZE`; a ``--quantize-base`` value is refused saying so."""
    if value is None or value in QUANTIZE:
        return
    if value in QUANTIZE_BASE:
        raise ValueError(f"quantize {value!r} is a --quantize-base value (a bitsandbytes base, for training); "
                         f"--quantize takes {' or '.join(QUANTIZE)} (lorakit's decoding kernels)")
    raise ValueError(f"quantize must be one of {QUANTIZE} (or none), got {value!r}")


def require_kernels(what: str) -> None:
    """Build (first use) and load lorakit's quantized kernels, or raise a one-line ValueError naming ``what``
    needed them and what to install (:func:`lorakit.quant.kernels.load`'s RuntimeError)."""
    from . import kernels

    try:
        kernels.load()
    except RuntimeError as e:
        raise ValueError(f"{what}: {' '.join(str(e).split())}") from None


def _bnb_loaded() -> bool:
    # No bitsandbytes layer can exist before bitsandbytes is imported: then there is nothing to adopt.
    return "bitsandbytes" in sys.modules


def is_quantized(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit or 8-bit linear layer (adopted or not)."""
    if not _bnb_loaded():
        return False
    from . import bnb

    return bnb.is_bnb_linear(module)


def adopt(module: nn.Module) -> nn.Module:
    """``module`` with lorakit's forward if it is a bitsandbytes linear layer (changed in place: its
    class becomes lorakit's subclass of the same bitsandbytes class); any other module as it is."""
    if not _bnb_loaded():
        return module
    from . import bnb

    return bnb.adopt(module)


def adopt_all(model: nn.Module) -> int:
    """:func:`adopt` every bitsandbytes linear layer of ``model``; returns how many were adopted now."""
    if not _bnb_loaded():
        return 0
    from . import bnb

    return bnb.adopt_all(model)


def load_kwargs(quantize_base: str | None, skip: tuple[str, ...] | None = None) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that load the base quantized (``{}`` for None): nf4 and fp4 with
    double quantization and float32 compute (``--precision bf16`` autocasts the products to bf16, as for
    a float base), ``bnb-int8`` as LLM.int8. ``skip``: modules kept in full precision (a classifier's head)."""
    check_quantize_base(quantize_base)
    if quantize_base is None:
        return {}
    require_bitsandbytes(f"--quantize-base {quantize_base}")
    from transformers import BitsAndBytesConfig

    extra = {} if skip is None else {"llm_int8_skip_modules": list(skip)}
    if quantize_base == "bnb-int8":
        config = BitsAndBytesConfig(load_in_8bit=True, **extra)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize_base, bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32, **extra)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"quantization_config": config, "device_map": device}


# lorakit serve loads its base inside lorakit.serving, which takes no quantization argument yet: the
# command sets it here for the duration of the call and the model loaders read it.
_SERVE_QUANTIZATION: contextvars.ContextVar[str | None] = contextvars.ContextVar("base_quantization", default=None)


@contextlib.contextmanager
def base_quantization(quantize_base: str | None) -> Iterator[None]:
    """Within the block, lorakit's model loaders load bases quantized as ``quantize_base`` unless told otherwise."""
    check_quantize_base(quantize_base)
    token = _SERVE_QUANTIZATION.set(quantize_base)
    try:
        yield
    finally:
        _SERVE_QUANTIZATION.reset(token)


def current_base_quantization() -> str | None:
    """The quantization :func:`base_quantization` set (None outside it)."""
    return _SERVE_QUANTIZATION.get()


@torch.no_grad()
def output_error(reference: nn.Module, candidate: nn.Module, vocab_size: int, rows: int = 8, length: int = 64,
                 seed: int = 0) -> dict[str, Any]:
    """How far ``candidate``'s outputs (logits) are from ``reference``'s on one batch of random token ids:
    relative RMS ``||c - r|| / ||r||``, the largest difference, and how often their top-1 agrees."""
    ids = torch.randint(0, vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed))
    ref = reference(input_ids=ids).logits.float()
    got = candidate(input_ids=ids).logits.float()
    return {"batch": f"{rows} x {length}", "relative_rms": float((got - ref).norm() / ref.norm()),
            "max_abs": float((got - ref).abs().max()),
            "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}
