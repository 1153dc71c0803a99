"""PEFT as a test oracle: same base weights and factors give the same outputs, and
adapter files cross-load both ways (lorakit -> PEFT, PEFT -> lorakit)."""

import pytest
import torch

import lorakit
from helpers import MODEL_TOL, clone, conv_net, ids, output, randomize, tiny_bert, tiny_gpt2, tiny_roberta

peft = pytest.importorskip("peft")

CASES = {
    # model factory, input factory, lorakit config kwargs
    "bert": (tiny_bert, ids, dict(target_modules=["query", "value", "word_embeddings"], modules_to_save=["classifier"])),
    "roberta": (tiny_roberta, ids, dict(target_modules=r".*\.(query|value|dense)", modules_to_save=["classifier"], bias="lora_only")),
    "gpt2": (tiny_gpt2, ids, dict(target_modules=["c_attn", "c_proj"], use_rslora=True)),
    "convnet": (conv_net, lambda: torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),
                dict(target_modules=["conv1", "conv2", "seq", "head"], bias="all")),
}


def _peft_config(kw):
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, **kw)


@pytest.mark.parametrize("case", CASES)
def test_lorakit_adapter_loads_in_peft_with_same_outputs(case, tmp_path):
    make, inputs, kw = CASES[case]
    base, x = make(), inputs()
    model = lorakit.add_lora(clone(base), lorakit.LoraConfig(r=4, alpha=8, **kw))
    randomize(model)
    if kw.get("bias", "none") != "none":
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad and n.endswith("bias"):
                    p.add_(0.5)
    ours = output(model, x)
    assert not torch.allclose(ours, output(base, x))
    lorakit.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(clone(base), tmp_path).eval()
    torch.testing.assert_close(output(theirs, x), ours, **MODEL_TOL)


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_in_lorakit_with_same_outputs(case, tmp_path):
    make, inputs, kw = CASES[case]
    base, x = make(), inputs()
    fan_in_fan_out = case == "gpt2"
    theirs = peft.get_peft_model(clone(base), _peft_config(dict(kw, fan_in_fan_out=fan_in_fan_out))).eval()
    expected = output(theirs, x)
    assert not torch.allclose(expected, output(base, x))
    theirs.save_pretrained(tmp_path)
    ours = lorakit.load_adapter(clone(base), tmp_path).eval()
    torch.testing.assert_close(output(ours, x), expected, **MODEL_TOL)
    lorakit.merge(ours)  # and merged, which PEFT never saw
    torch.testing.assert_close(output(ours, x), expected, **MODEL_TOL)


def test_a_peft_seq_cls_adapter_loads_with_its_head(tmp_path):
    base, x = tiny_bert(), ids()
    theirs = peft.get_peft_model(clone(base), _peft_config(dict(target_modules=["query", "value"], task_type="SEQ_CLS")))
    with torch.no_grad():
        theirs.base_model.model.classifier.modules_to_save["default"].weight.normal_()  # a trained head
    expected = output(theirs.eval(), x)
    theirs.save_pretrained(tmp_path)
    saved = __import__("json").loads((tmp_path / "adapter_config.json").read_text())
    assert set(saved["modules_to_save"]) == {"classifier", "score"}  # PEFT names both heads
    ours = lorakit.load_adapter(clone(base), tmp_path).eval()
    torch.testing.assert_close(output(ours, x), expected, **MODEL_TOL)


@pytest.mark.parametrize("rslora", [False, True])
def test_gpt2_q_v_slices_are_written_so_that_peft_loads_them(tmp_path, rslora):
    """The paper's GPT-2 setting (LoRA on the q and v slices of the fused c_attn) is saved as PEFT's plain
    rank-2r c_attn LoRA of the same function: B with zero k-rows, alpha scaled to keep the scaling."""
    base, x = tiny_gpt2(), ids()
    cfg = lorakit.LoraConfig(r=4, alpha=8, target_modules=["c_attn"], enable_lora={"c_attn": (True, False, True)},
                             use_rslora=rslora)
    model = lorakit.add_lora(clone(base), cfg)
    randomize(model)
    ours = output(model, x)
    assert not torch.allclose(ours, output(base, x))
    lorakit.save_adapter(model, tmp_path / "peft")
    saved = __import__("json").loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == (8 * 2 ** 0.5 if rslora else 16) and "enable_lora" not in saved
    theirs = peft.PeftModel.from_pretrained(clone(base), tmp_path / "peft").eval()
    torch.testing.assert_close(output(theirs, x), ours, **MODEL_TOL)
    again = lorakit.load_adapter(clone(base), tmp_path / "peft").eval()  # lorakit reads it back: same function
    torch.testing.assert_close(output(again, x), ours, **MODEL_TOL)
    lorakit.save_adapter(model, tmp_path / "compact", compact=True)  # lorakit's own form: half of B's bytes
    compact = lorakit.load_adapter(clone(base), tmp_path / "compact").eval()
    torch.testing.assert_close(output(compact, x), ours, **MODEL_TOL)
    assert (tmp_path / "compact" / "adapter_model.safetensors").stat().st_size < \
        (tmp_path / "peft" / "adapter_model.safetensors").stat().st_size
