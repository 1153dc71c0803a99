"""Tiny models built from configs in memory, and the dtype tolerance table."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"


def without_java(path: str) -> str:
    """``path`` (a PATH) without the folders that hold ``java``. E2E scoring then skips METEOR and splits text with
    lorakit's Python PTB tokenizer (nlg_metrics) instead of starting the Java jars after every epoch and evaluation
    (seconds each): for tests that compare adapters, dev losses and outputs, never scores. The Java scorer is
    checked by test_nlg_metrics and test_lm."""
    return os.pathsep.join(d for d in path.split(os.pathsep) if not os.access(os.path.join(d, "java"), os.X_OK))

# torch.testing.assert_close's defaults, by dtype. Whole-model comparisons use
# MODEL_TOL: a few layers of float32 arithmetic in a different order drift by ~1e-6.
TOL = {
    torch.float32: dict(rtol=1.3e-6, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
    torch.float64: dict(rtol=1e-7, atol=1e-7),
}
MODEL_TOL = dict(rtol=1e-5, atol=1e-5)


def tiny_bert(seed: int = 0, hidden: int = 32):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=99, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, max_position_embeddings=64)
    return BertForSequenceClassification(cfg).eval()


def tiny_roberta(seed: int = 0):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=66)
    return RobertaForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


class ConvNet(nn.Module):
    """Conv2d (padded), Conv2d (strided), Conv1d and Linear, 8x8 RGB in, 5 logits out.

    No dilation: PEFT 0.21 builds its LoRA conv without the base layer's dilation, so
    as an oracle it only agrees on undilated convolutions (see docs/PEFT.md).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.seq = nn.Conv1d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (B, 8, 4, 4)
        h = torch.relu(self.seq(h.flatten(2)))  # (B, 6, 16)
        return self.head(h.mean(-1))


def conv_net(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet().eval()


def ids(batch: int = 3, length: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, 99, (batch, length), generator=g)
    return x


def randomize(model: nn.Module, seed: int = 2, std: float = 0.1) -> None:
    """Give every LoRA factor random values, so that the adapter changes the output."""
    import lorakit

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lorakit.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits
