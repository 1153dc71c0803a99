"""What differs between model families (issue #32), item by item: Gemma's scaled embedding,
tied input/output embeddings, mixture-of-experts models, the layouts of fused q/k/v
projections, and PEFT's per-family defaults and embedding weights in adapter files. The
matrix over every family is tests/test_architectures.py; these pin the details."""

from __future__ import annotations

import json

import pytest

from lorakit import LoraConfig

peft = pytest.importorskip("peft")


# ---- 2. tied input and output embeddings -----------------------------------------------------


def test_peft_ensure_weight_tying_is_refused_by_name():
    d = json.loads(LoraConfig(target_modules=["embed_tokens"]).to_json()) | {"ensure_weight_tying": True}
    with pytest.raises(ValueError, match=r"sets ensure_weight_tying=True \(PEFT then also puts a LoRA tied to"):
        LoraConfig.from_peft_dict(d)


# ---- 3 and 4. mixture-of-experts models ------------------------------------------------------


def test_peft_writes_an_empty_target_parameters_list_which_is_the_default():
    d = json.loads(LoraConfig(target_modules=["q_proj"]).to_json())
    assert LoraConfig.from_peft_dict(d | {"target_parameters": []}).target_modules == ("q_proj",)
    with pytest.raises(ValueError, match=r"sets target_parameters=\['experts.down_proj'\] \(LoRA on parameters"):
        LoraConfig.from_peft_dict(d | {"target_parameters": ["experts.down_proj"]})
