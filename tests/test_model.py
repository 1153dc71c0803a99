"""Model-level operations on tiny Hugging Face models built in memory."""

import pytest
import torch
from torch import nn

import lorakit
from helpers import MODEL_TOL, TOL, ids, output, randomize, tiny_bert, tiny_gpt2, tiny_roberta
from lorakit import LoraConfig
from lorakit.layers import LoraLayer, ModulesToSave

QV = LoraConfig(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])


def _lora_names(model):
    return sorted(name for name, _ in lorakit.lora_layers(model))


def test_add_lora_targets_suffixes_and_keeps_outputs_and_state_dict_keys():
    model = tiny_bert()
    x = ids()
    before, keys = output(model, x), set(model.state_dict())
    assert lorakit.add_lora(model, QV) is model
    assert _lora_names(model) == [f"bert.encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")]
    torch.testing.assert_close(output(model, x), before, **TOL[torch.float32])
    new_keys = set(model.state_dict())
    assert {k for k in keys if not k.startswith("classifier")} <= new_keys  # base weights keep their names


def test_regex_all_linear_and_default_targets():
    model = lorakit.add_lora(tiny_bert(), LoraConfig(target_modules=r".*layer\.0\.attention\.self\.(query|key)"))
    assert _lora_names(model) == ["bert.encoder.layer.0.attention.self.key", "bert.encoder.layer.0.attention.self.query"]
    model = lorakit.add_lora(tiny_bert(), LoraConfig(target_modules="all-linear", modules_to_save=["classifier"]))
    assert len(_lora_names(model)) == 2 * 6 + 1  # q, k, v, o, intermediate, output per layer + pooler
    gpt2 = lorakit.add_lora(tiny_gpt2(), LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in _lora_names(gpt2)  # the output embedding is never adapted
    model = lorakit.add_lora(tiny_bert(), LoraConfig())
    assert lorakit.adapter_config(model, "default").target_modules == ("query", "value")
    assert lorakit.default_target_modules(tiny_gpt2()) == ("c_attn",)


def test_default_targets_find_mpnet_style_q_v():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(4, 4) for _ in range(4))

    model = nn.Sequential(Attn(), Attn())
    lorakit.add_lora(model, LoraConfig())
    assert _lora_names(model) == ["0.q", "0.v", "1.q", "1.v"]


def test_unknown_target_lists_adaptable_names():
    with pytest.raises(ValueError, match=r"target_modules=\('qkv',\) matched no adaptable module; adaptable module names are: .*dense.*query.*word_embeddings"):
        lorakit.add_lora(tiny_bert(), LoraConfig(target_modules=["qkv"]))
    with pytest.raises(ValueError, match="modules_to_save entry 'head' matches no module"):
        lorakit.add_lora(tiny_bert(), LoraConfig(target_modules=["query"], modules_to_save=["head"]))
    with pytest.raises(ValueError, match=r"enable_lora keys \['c_proj'\] match none of the target modules"):
        lorakit.add_lora(tiny_gpt2(), LoraConfig(target_modules=["c_attn"], enable_lora={"c_proj": (True,)}))
    with pytest.raises(TypeError, match="config must be a lorakit.LoraConfig, a peft.LoraConfig or a dict, got str"):
        lorakit.add_lora(tiny_bert(), "r=8")
    with pytest.raises(ValueError, match="adapter name must be letters"):
        lorakit.add_lora(tiny_bert(), QV, adapter="a.b")


def _trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_only_adapter_and_saved_modules_train(bias):
    model = lorakit.add_lora(tiny_bert(), LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"], bias=bias))
    names = _trainable(model)
    lora = [n for n in names if ".lora_" in n]
    head = [n for n in names if n.startswith("classifier.")]
    biases = [n for n in names if n not in lora and n not in head]
    assert len(lora) == 2 * 2 * 2 and head == ["classifier.copies.default.bias", "classifier.copies.default.weight"]
    assert all(n.endswith("bias") for n in biases)
    if bias == "none":
        assert biases == []
    elif bias == "lora_only":
        assert len(biases) == 4 and all(".query." in n or ".value." in n for n in biases)
    else:
        assert len(biases) == len([n for n, _ in tiny_bert().named_parameters() if n.endswith(".bias") and not n.startswith("classifier")])


def test_paper_parameter_count_roberta_base_r8_qv():
    from transformers import RobertaConfig, RobertaModel

    with torch.device("meta"):
        model = RobertaModel(RobertaConfig())
    lorakit.add_lora(model, LoraConfig(r=8, alpha=16, target_modules=["query", "value"]))
    # |Theta| = 2 * L_hat * d_model * r = 2 * 24 * 768 * 8
    assert sum(p.numel() for _, p in lorakit.lora_parameters(model)) == 294_912
    assert lorakit.trainable_parameters(model).trainable == 294_912


def test_gpt2_medium_q_v_slices_of_c_attn_r4():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_embd=1024, n_layer=24, n_head=16))
    lorakit.add_lora(model, LoraConfig(r=4, alpha=32, target_modules=["c_attn"], enable_lora={"c_attn": (True, False, True)}))
    # per layer: A (2*4, 1024) + B (2*1024, 4); 24 layers. See docs/PARAMETERS.md for the paper's 0.35M.
    assert lorakit.trainable_parameters(model).trainable == 24 * (8 * 1024 + 2048 * 4) == 393_216


def test_gpt2_sliced_adapter_leaves_key_untouched():
    model = lorakit.add_lora(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], enable_lora={"c_attn": (True, False, True)}))
    randomize(model)
    layer = model.transformer.h[0].attn.c_attn
    delta = layer.delta_weight("default")  # (in, out) like Conv1D's weight
    assert delta.shape == (32, 96)
    assert delta[:, 32:64].abs().max() == 0 and delta[:, :32].abs().max() > 0 and delta[:, 64:].abs().max() > 0


def test_several_adapters_switch_combine_disable_delete():
    base = tiny_bert()
    x = ids()
    base_out = output(base, x)
    model = lorakit.add_lora(tiny_bert(), QV)
    lorakit.add_lora(model, LoraConfig(r=2, alpha=2, target_modules=["query", "key"], modules_to_save=["classifier"]), adapter="b")
    assert lorakit.adapter_names(model) == ["default", "b"] and lorakit.active_adapters(model) == ("default",)
    assert not any(p.requires_grad for _, p in lorakit.lora_parameters(model, "b"))
    randomize(model)
    out_a = output(model, x)
    lorakit.set_adapter(model, "b")
    assert all(p.requires_grad for _, p in lorakit.lora_parameters(model, "b"))
    assert not any(p.requires_grad for _, p in lorakit.lora_parameters(model, "default"))
    out_b = output(model, x)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base_out)
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(output(model, x), base_out, **TOL[torch.float32])
    torch.testing.assert_close(output(model, x), out_b, **TOL[torch.float32])
    with pytest.raises(ValueError, match="cannot delete the active adapter 'b'"):
        lorakit.delete_adapter(model, "b")
    with pytest.raises(ValueError, match=r"already has an adapter named 'b'"):
        lorakit.add_lora(model, QV, adapter="b")
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['c'\]"):
        lorakit.set_adapter(model, "c")
    lorakit.set_adapter(model, "default")
    lorakit.delete_adapter(model, "b")
    assert lorakit.adapter_names(model) == ["default"]
    assert not any(isinstance(m, LoraLayer) for n, m in model.named_modules() if n.endswith(".key"))
    torch.testing.assert_close(output(model, x), out_a, **TOL[torch.float32])


def test_adding_an_adapter_when_none_is_active_activates_it():
    model = lorakit.add_lora(tiny_bert(), QV)
    lorakit.add_lora(model, QV, adapter="b")
    from lorakit.model import remove_adapter

    remove_adapter(model, "default")  # the active one: nothing is active now
    assert lorakit.active_adapters(model) == ()
    lorakit.add_lora(model, QV, adapter="c")
    assert lorakit.active_adapters(model) == ("c",) and lorakit.adapter_names(model) == ["b", "c"]


def test_two_active_adapters_add_their_updates():
    model = lorakit.add_lora(tiny_bert(), LoraConfig(r=2, target_modules=["query"]))
    lorakit.add_lora(model, LoraConfig(r=3, target_modules=["query"]), adapter="b")
    randomize(model)
    layer = model.bert.encoder.layer[0].attention.self.query
    lorakit.set_adapter(model, ["default", "b"])
    lorakit.merge(model)
    torch.testing.assert_close(layer.weight - layer.unmerged_weight, layer.delta_weight("default") + layer.delta_weight("b"), **TOL[torch.float32])


def test_merge_unmerge_and_unload():
    base = tiny_bert()
    model = lorakit.add_lora(tiny_bert(), QV)
    randomize(model)
    x = ids()
    unmerged = output(model, x)
    lorakit.merge(model)
    lorakit.merge(model)
    torch.testing.assert_close(output(model, x), unmerged, **MODEL_TOL)
    with pytest.raises(ValueError, match="cannot add an adapter while adapters are merged"):
        lorakit.add_lora(model, QV, adapter="b")
    with lorakit.disable_adapters(model):  # the base model runs, merged or not
        torch.testing.assert_close(output(model, x), output(base, x), **TOL[torch.float32])
    lorakit.unmerge(model)
    for name, layer in lorakit.lora_layers(model):
        assert torch.equal(layer.weight, base.get_submodule(name).weight)
    plain = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, LoraLayer | ModulesToSave) for m in plain.modules())
    assert set(plain.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(output(plain, x), unmerged, **MODEL_TOL)


def test_gradients_reach_only_trainable_parameters():
    model = lorakit.add_lora(tiny_bert(), QV).train()
    randomize(model)
    out = model(ids(), labels=torch.tensor([0, 1, 1]))
    out.loss.backward()
    with_grad = sorted(n for n, p in model.named_parameters() if p.grad is not None)
    assert with_grad == _trainable(model)


def test_trainable_parameters_string():
    count = lorakit.trainable_parameters(lorakit.add_lora(tiny_bert(), LoraConfig(r=4, target_modules=["query"])))
    assert count.trainable == 2 * (4 * 32 + 32 * 4)
    assert str(count).startswith(f"trainable params: {count.trainable:,} || all params: {count.total:,}")


@pytest.mark.parametrize("training", [False, True])
def test_new_layers_take_the_mode_of_the_module_they_wrap(training):
    model = tiny_bert().train(training)
    lorakit.add_lora(model, LoraConfig(r=4, dropout=0.5, modules_to_save=["classifier"]))
    lorakit.add_lora(model, LoraConfig(r=2, dropout=0.5), adapter="second")
    assert {m.training for m in model.modules()} == {training}
    if not training:  # eval mode: no dropout anywhere, so two calls agree exactly
        for _, layer in lorakit.lora_layers(model):
            torch.nn.init.normal_(layer.lora_B["default"])
        ids = torch.randint(0, 99, (4, 12))
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_seq_cls_adapters_train_the_head_as_peft_does():
    model = tiny_bert()
    lorakit.add_lora(model, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    assert isinstance(model.classifier, ModulesToSave)  # the head trains, no modules_to_save needed
    assert all(p.requires_grad for p in model.classifier.copies["default"].parameters())
    # PEFT writes modules_to_save ["classifier", "score"]; the head this model lacks is skipped
    other = tiny_bert()
    lorakit.add_lora(other, LoraConfig(r=4, modules_to_save=["classifier", "score"], task_type="SEQ_CLS"))
    assert isinstance(other.classifier, ModulesToSave)
    with pytest.raises(ValueError, match="modules_to_save entry 'score' matches no module"):
        lorakit.add_lora(tiny_bert(), LoraConfig(r=4, modules_to_save=["classifier", "score"]))


def test_all_linear_leaves_the_classification_head_alone():
    model = tiny_roberta()  # its head classifier.dense / classifier.out_proj are linear layers
    lorakit.add_lora(model, LoraConfig(r=2, target_modules="all-linear"))
    names = _lora_names(model)
    assert names and not any(n.startswith("classifier") for n in names)
    assert any(n.endswith("attention.self.query") for n in names)


def test_weighted_combination_is_exact_and_set_adapter_refuses_weights():
    model = tiny_bert()
    lorakit.add_lora(model, LoraConfig(r=4, alpha=8), adapter="a")
    lorakit.add_lora(model, LoraConfig(r=2, alpha=6, use_rslora=True), adapter="b")
    randomize(model)
    x = ids()
    with pytest.raises(TypeError, match="set_adapter takes adapter names, not weights"):
        lorakit.set_adapter(model, {"a": 0.7, "b": 0.3})
    lorakit.add_weighted_adapter(model, {"a": 0.7, "b": -0.3}, "mix")
    lorakit.set_adapter(model, "mix")
    mixed = output(model, x)
    for _, layer in lorakit.lora_layers(model):  # ΔW_mix = 0.7 ΔW_a - 0.3 ΔW_b, layer by layer
        torch.testing.assert_close(layer.delta_weight("mix"),
                                   0.7 * layer.delta_weight("a") - 0.3 * layer.delta_weight("b"), **TOL[torch.float32])
    with lorakit.disable_adapters(model):
        assert not torch.allclose(mixed, output(model, x))
    with pytest.raises(ValueError, match=r"weights must name adapters of the model, got \['c'\]"):
        lorakit.add_weighted_adapter(model, {"c": 1.0}, "mix2")


def test_add_lora_takes_a_peft_config():
    peft = pytest.importorskip("peft")
    model = lorakit.add_lora(tiny_bert(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query"]))
    assert _lora_names(model) == [f"bert.encoder.layer.{i}.attention.self.query" for i in (0, 1)]
    assert lorakit.adapter_config(model, "default").scaling == 2.0
