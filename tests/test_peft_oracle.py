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


# ---- DoRA (use_dora) and per-layer ranks (rank_pattern / alpha_pattern) -------------------------


def _perturb_magnitudes(model) -> None:
    """Magnitudes away from the norms they start at (in a lorakit or a PEFT model): a trained DoRA adapter."""
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(0.7 + 0.6 * torch.rand(p.shape, generator=g))


@pytest.mark.parametrize("case", ["bert", "gpt2", "convnet"])
def test_dora_adapters_cross_load_both_ways_with_peft_outputs(case, tmp_path):
    """Linear, GPT-2's Conv1D, Embedding, Conv1d/Conv2d: PEFT's DoRA adapter gives lorakit the same outputs
    (unmerged and merged), and lorakit's gives PEFT the same outputs; the magnitudes are stored under PEFT's key."""
    make, inputs, kw = CASES[case]
    base, x = make(), inputs()
    kw = dict(kw, use_dora=True)
    theirs = peft.get_peft_model(clone(base), _peft_config(dict(kw, fan_in_fan_out=case == "gpt2")))
    _perturb_magnitudes(theirs)
    expected = output(theirs.eval(), x)
    assert not torch.allclose(expected, output(base, x))
    theirs.save_pretrained(tmp_path / "peft")
    ours = lorakit.load_adapter(clone(base), tmp_path / "peft").eval()
    torch.testing.assert_close(output(ours, x), expected, **MODEL_TOL)
    lorakit.merge(ours)
    torch.testing.assert_close(output(ours, x), expected, **MODEL_TOL)
    lorakit.unmerge(ours)

    model = lorakit.add_lora(clone(base), lorakit.LoraConfig(r=4, alpha=8, **kw))
    randomize(model)
    _perturb_magnitudes(model)
    mine = output(model, x)
    lorakit.save_adapter(model, tmp_path / "ours")
    keys = __import__("safetensors.torch").torch.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    back = peft.PeftModel.from_pretrained(clone(base), tmp_path / "ours").eval()
    torch.testing.assert_close(output(back, x), mine, **MODEL_TOL)


def test_dora_training_step_has_peft_loss_and_gradients_with_dropout(tmp_path):
    """In training mode with dropout 0.2 (PEFT recomputes W0 on the dropped input), the same masks give
    the same loss and the same gradients of every A, B and magnitude."""
    base, x = tiny_bert(), ids()
    theirs = peft.get_peft_model(clone(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                              use_dora=True, lora_dropout=0.2, init_lora_weights=False))
    _perturb_magnitudes(theirs)
    theirs.save_pretrained(tmp_path)
    ours = lorakit.load_adapter(clone(base), tmp_path)
    grads = []
    for model in (theirs.train(), ours.train()):
        torch.manual_seed(5)  # the same dropout masks, drawn in the same order
        loss = model(x).logits.square().sum()
        loss.backward()
        grads.append((loss.detach(), {n.replace("base_model.model.", "").replace(".weight", "").replace(".default", ""):
                                      p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, a), (loss_b, b) = grads
    assert sorted(a) == sorted(b) and any("magnitude" in k for k in a)
    torch.testing.assert_close(loss_b, loss_a, **MODEL_TOL)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6 * a[k].abs().max().item())


PATTERNS = dict(target_modules=["query", "value", "word_embeddings"],
                rank_pattern={"query": 2, "layer.1.attention.self.value": 6, "word_embeddings": 3},
                alpha_pattern={"value": 3, "^bert.encoder.layer.0.attention.self.query": 5.5})


@pytest.mark.parametrize("rslora", [False, True])
def test_rank_and_alpha_patterns_cross_load_both_ways(tmp_path, rslora):
    """PEFT's matching ((.*\\.)?key$, first key wins): the same rank per layer as PEFT, the same
    scaling, the same outputs both ways."""
    base, x = tiny_bert(), ids()
    theirs = peft.get_peft_model(clone(base), _peft_config(dict(PATTERNS, use_rslora=rslora)))
    theirs = theirs.eval()
    expected = output(theirs, x)
    theirs.save_pretrained(tmp_path / "peft")
    ours = lorakit.load_adapter(clone(base), tmp_path / "peft").eval()
    for name, layer in lorakit.lora_layers(ours):
        theirs_layer = theirs.base_model.model.get_submodule(name)
        assert layer.ranks["default"] == theirs_layer.r["default"]
        assert layer.scaling("default") == pytest.approx(theirs_layer.scaling["default"])
    assert {layer.ranks["default"] for _, layer in lorakit.lora_layers(ours)} == {2, 3, 4, 6}
    torch.testing.assert_close(output(ours, x), expected, **MODEL_TOL)

    model = lorakit.add_lora(clone(base), lorakit.LoraConfig(r=4, alpha=8, use_rslora=rslora, **PATTERNS))
    randomize(model)
    mine = output(model, x)
    lorakit.save_adapter(model, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(clone(base), tmp_path / "ours").eval()
    torch.testing.assert_close(output(back, x), mine, **MODEL_TOL)
    again = lorakit.load_adapter(clone(base), tmp_path / "ours").eval()
    torch.testing.assert_close(output(again, x), mine, **MODEL_TOL)
