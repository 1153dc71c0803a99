"""Checkpoint size: the adapter file against the full model (paper: GPT-3 350 GB -> 35 MB).

Adapter bytes are those of the ``adapter_model.safetensors`` lorakit writes; full-model
bytes the fp32 size of all parameters (what a full fine-tune must store per task).

    python bench/files.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

import lorakit
from lorakit.benchtools import write_record


def _models():
    from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel, RobertaConfig

    from lorakit.models import resolve_model

    yield "minilm r=8 q,v + head", AutoModelForSequenceClassification.from_pretrained(resolve_model("minilm"), num_labels=2), \
        lorakit.LoraConfig(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    yield "roberta-base r=8 q,v", AutoModelForSequenceClassification.from_config(RobertaConfig(num_labels=2)), \
        lorakit.LoraConfig(r=8, alpha=16, target_modules=["query", "value"])
    yield "gpt2-medium r=4 q,v slices", GPT2LMHeadModel(GPT2Config(n_embd=1024, n_layer=24, n_head=16)), \
        lorakit.LoraConfig(r=4, alpha=32, target_modules=["c_attn"], enable_lora={"c_attn": (True, False, True)})


def run(name: str = "files", out_dir: str = "bench/results") -> dict:
    results = {}
    for label, model, cfg in _models():
        full = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
        lorakit.add_lora(model, cfg)
        with tempfile.TemporaryDirectory() as tmp:
            lorakit.save_adapter(model, tmp)
            adapter = (Path(tmp) / "adapter_model.safetensors").stat().st_size
        results[label] = {"adapter_bytes": adapter, "full_model_bytes": full, "ratio": full / adapter,
                          "trainable_params": lorakit.trainable_parameters(model).trainable}
        print(f"{label}: adapter {adapter / 1e6:.2f} MB vs full {full / 1e6:.0f} MB ({full / adapter:,.0f}x smaller)", flush=True)
        del model
    write_record(name, {}, results, out_dir)
    return results


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(run() and None)
