"""Int8 weights for serving: the frozen base's linear layers stored as int8 with a scale per
output channel, activations in bf16 (``torch._weight_int8pack_mm``).

Decoding one token reads every weight once, so on a CPU its speed follows the bytes read:
int8 weights read a quarter of fp32's. LoRA layers compute their base product with an int8
copy of their weight too (the float weight stays, for merging and ``delta_weight``; a merged
layer uses it); embeddings stay as they are. Outputs differ from the unquantized model's by
the rounding of each weight to 1/127 of its row's largest magnitude; docs/BENCH.md measures
how often greedy completions stay identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import LoraLayer

__all__ = ["Int8Linear", "quantize_int8"]


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` as int8 rows times a bf16 scale per row."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        out = torch._weight_int8pack_mm(flat, self.weight, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: nn.Module) -> int:
    """Replace ``model``'s plain linear layers (``nn.Linear`` and GPT-2's ``Conv1D``) by
    :class:`Int8Linear` and give its LoRA linear layers an int8 copy of their weight, in
    place; returns how many layers. Attach the adapters first: a layer replaced here cannot
    take an adapter later (a LoRA layer can take more)."""
    from transformers.pytorch_utils import Conv1D

    from . import quant
    from .layers import LoraLinear

    if any(quant.is_quantized(m) or getattr(m, "quantized", False) is True for m in model.modules()):
        raise ValueError("the model's base is already quantized (bitsandbytes): lorakit's int8 serving kernel "
                         "needs float weights; serve a quantized base without --quantize")
    count = 0
    for module in list(model.modules()):
        if isinstance(module, LoraLinear) and module.__dict__.get("int8_base") is None:
            weight = module.weight.T if module.fan_in_fan_out else module.weight
            module.__dict__["int8_base"] = Int8Linear(weight, module.bias)  # not a submodule: no new state_dict keys
            count += 1
            continue
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoraLayer) or not isinstance(child, nn.Linear | Conv1D):
                continue
            weight = child.weight.T if isinstance(child, Conv1D) else child.weight
            setattr(module, child_name, Int8Linear(weight, child.bias))
            count += 1
    return count


def _reference(x: Tensor, layer: Int8Linear) -> Tensor:
    """What :class:`Int8Linear` computes, in float32 (tests)."""
    weight = layer.weight.float() * layer.scale.float()[:, None]
    return F.linear(x.float(), weight, None if layer.bias is None else layer.bias.float())
