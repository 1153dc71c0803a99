"""The paper's baselines in the same harness (Table 2): full fine-tuning, BitFit
(Zaken et al., 2021: biases only) and Houlsby bottleneck adapters (Houlsby et al., 2019).
The task head always trains."""

from __future__ import annotations

import re
from typing import Literal

from torch import Tensor, nn

__all__ = ["Method", "METHODS", "HoulsbyAdapter", "add_houlsby_adapters", "freeze_for"]

Method = Literal["lora", "full", "bitfit", "adapter"]
METHODS: tuple[str, ...] = ("lora", "full", "bitfit", "adapter")

# Output projections of the attention and feed-forward sublayers, where Houlsby
# adapters go: BERT/RoBERTa, MPNet and GPT-2 names.
ADAPTER_SITES = r".*(attention\.output\.dense|attention\.attn\.o|layer\.\d+\.output\.dense|attn\.c_proj|mlp\.c_proj)"


class HoulsbyAdapter(nn.Module):
    """``h + W_up gelu(W_down h)`` with ``W_down: (dim, d)``, ``W_up: (d, dim)``;
    ``W_up = 0`` at initialisation, so the adapter starts as the identity."""

    def __init__(self, d: int, dim: int) -> None:
        super().__init__()
        self.down = nn.Linear(d, dim)
        self.up = nn.Linear(dim, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(nn.functional.gelu(self.down(h)))


def _apply_adapter(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    return module.houlsby(output)


def add_houlsby_adapters(model: nn.Module, dim: int, sites: str = ADAPTER_SITES) -> list[str]:
    """Insert an adapter after each sublayer output projection matching ``sites``
    (a full-match regex); returns the adapted module names. The adapter is a child
    ``houlsby`` of the projection, applied by a forward hook, so base keys keep their names."""
    if dim <= 0:
        raise ValueError(f"adapter dim must be positive, got {dim}")
    names = []
    for name, module in model.named_modules():
        if re.fullmatch(sites, name) and hasattr(module, "weight"):
            d = module.weight.shape[0] if isinstance(module, nn.Linear) else module.weight.shape[1]
            module.houlsby = HoulsbyAdapter(d, dim).to(module.weight.device)
            module.register_forward_hook(_apply_adapter)
            names.append(name)
    if not names:
        raise ValueError(f"no sublayer output projection matching {sites!r} found for adapters")
    return names


def freeze_for(model: nn.Module, method: str, head: str | None) -> None:
    """Set ``requires_grad`` for a baseline: ``full`` trains everything, ``bitfit`` biases
    and the head, ``adapter`` the adapters, layer norms (as Houlsby et al.) and the head
    (``head=None``: a model without a task head, e.g. a causal LM)."""
    for name, p in model.named_parameters():
        if method == "full":
            keep = True
        elif method == "bitfit":
            keep = name.endswith("bias")
        elif method == "adapter":
            keep = ".houlsby." in name or "LayerNorm" in name or "layer_norm" in name
        else:
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        p.requires_grad_(keep or (head is not None and name.startswith(head + ".")))
