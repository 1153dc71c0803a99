"""Adapter files: round trip, strict loading, every bad input named."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from helpers import TOL, ids, output, randomize, tiny_bert, tiny_gpt2
from lorakit import LoraConfig
from lorakit.layers import LoraLayer, ModulesToSave

QV = LoraConfig(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])


@pytest.fixture
def saved(tmp_path):
    model = lorakit.add_lora(tiny_bert(), QV)
    randomize(model)
    with torch.no_grad():
        model.classifier.copies["default"].weight.add_(1.0)
    lorakit.save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def test_round_trip_gives_the_same_outputs(saved):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "receipt.safetensors"]
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    keys = load_file(path / "adapter_model.safetensors")
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert "base_model.model.classifier.weight" in keys and len(keys) == 2 * 2 * 2 + 2
    loaded = lorakit.load_adapter(tiny_bert(), path)
    torch.testing.assert_close(output(loaded, ids()), output(model, ids()), **TOL[torch.float32])
    # the file names the task its head belongs to (the model says it); the model's config is untouched
    assert config["task_type"] == "SEQ_CLS" and lorakit.adapter_config(model, "default").task_type is None
    assert config["base_model_name_or_path"] is None  # built in memory: no folder to name
    assert lorakit.adapter_config(loaded, "default") == replace(lorakit.adapter_config(model, "default"), task_type="SEQ_CLS")


def test_load_as_second_adapter_and_sliced_gpt2_round_trip(saved, tmp_path):
    model, path = saved
    other = lorakit.add_lora(tiny_bert(), LoraConfig(target_modules=["key"]))
    lorakit.load_adapter(other, path, adapter="mrpc")
    lorakit.set_adapter(other, "mrpc")
    torch.testing.assert_close(output(other, ids()), output(model, ids()), **TOL[torch.float32])

    gpt2 = lorakit.add_lora(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], enable_lora={"c_attn": (True, False, True)}))
    randomize(gpt2)
    lorakit.save_adapter(gpt2, tmp_path / "gpt2")
    back = lorakit.load_adapter(tiny_gpt2(), tmp_path / "gpt2")
    torch.testing.assert_close(output(back, ids()), output(gpt2, ids()), **TOL[torch.float32])


def _assert_untouched(model):
    assert not any(isinstance(m, LoraLayer | ModulesToSave) for m in model.modules())


def test_adapter_for_another_architecture_names_keys_and_shapes(saved):
    _, path = saved
    wider = tiny_bert(hidden=48)
    with pytest.raises(ValueError, match=r"does not match the model; 9 shape mismatches: "
                       r"base_model\.model\.bert\.encoder\.layer\.0\.attention\.self\.query\.lora_A\.weight: file \(4, 32\) vs model \(4, 48\)"):
        lorakit.load_adapter(wider, path)
    _assert_untouched(wider)
    gpt2 = tiny_gpt2()
    with pytest.raises(ValueError, match=r"does not fit this model: target_modules=\('query', 'value'\) matched no adaptable module"):
        lorakit.load_adapter(gpt2, path)
    _assert_untouched(gpt2)


def test_missing_and_unexpected_keys_are_listed_together(saved):
    _, path = saved
    tensors = load_file(path / "adapter_model.safetensors")
    del tensors["base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"]
    tensors["base_model.model.bert.pooler.dense.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"1 missing keys: .*layer\.1\.attention\.self\.value\.lora_B\.weight; "
                       r"1 unexpected keys: .*pooler\.dense\.lora_A\.weight"):
        lorakit.load_adapter(tiny_bert(), path)


def test_truncated_file_is_reported(saved):
    _, path = saved
    f = path / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        lorakit.load_adapter(tiny_bert(), path)
    f.write_bytes(b"")
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        lorakit.load_adapter(tiny_bert(), path)


def test_missing_or_broken_config_and_pickles_are_refused(saved, tmp_path):
    _, path = saved
    config = json.loads((path / "adapter_config.json").read_text())
    del config["r"]
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"adapter_config.json is missing required field\(s\) \['r'\]"):
        lorakit.load_adapter(tiny_bert(), path)
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        lorakit.load_adapter(tiny_bert(), path)
    with pytest.raises(ValueError, match="no adapter_config.json in"):
        lorakit.load_adapter(tiny_bert(), tmp_path / "nowhere")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(QV.to_json())
    (pickled / "adapter_model.bin").write_bytes(b"\x80")
    with pytest.raises(ValueError, match=r"found \['adapter_model.bin'\]; lorakit reads safetensors only"):
        lorakit.load_adapter(tiny_bert(), pickled)


def test_duplicate_name_on_load_and_ambiguous_save(saved, tmp_path):
    model, path = saved
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        lorakit.load_adapter(model, path)
    lorakit.add_lora(model, LoraConfig(target_modules=["query"]), adapter="b")
    lorakit.set_adapter(model, ["default", "b"])
    with pytest.raises(ValueError, match=r"name the adapter to save: the model has active adapters \['default', 'b'\]"):
        lorakit.save_adapter(model, tmp_path / "x")
    lorakit.save_adapter(model, tmp_path / "b", adapter="b")
    assert not list((tmp_path / "b").glob(".*tmp"))  # no temporary files left behind


def test_resize_saved_loads_a_head_with_another_label_count(tmp_path):
    """A 1-output (regression) head loads onto a 2-label model only with resize_saved."""
    from transformers import BertConfig, BertForSequenceClassification

    body = {k: v for k, v in tiny_bert().state_dict().items() if not k.startswith("classifier.")}
    cfg = {k: v for k, v in tiny_bert().config.to_dict().items() if k not in ("id2label", "label2id")}
    one = BertForSequenceClassification(BertConfig(**cfg, num_labels=1)).eval()
    one.load_state_dict(body, strict=False)  # the same body, a 1-output head
    lorakit.add_lora(one, QV)
    randomize(one)
    lorakit.save_adapter(one, tmp_path / "reg")
    two = tiny_bert()
    with pytest.raises(ValueError, match=r"2 shape mismatches: .*classifier.weight: file \(1, 32\) vs model \(2, 32\)"):
        lorakit.load_adapter(two, tmp_path / "reg")
    assert lorakit.adapter_names(two) == []
    lorakit.load_adapter(two, tmp_path / "reg", resize_saved=True)
    assert two.classifier.copies["default"].out_features == 1
    torch.testing.assert_close(output(two, ids()), output(one, ids()), **TOL[torch.float32])


def test_a_failed_load_leaves_nothing_behind(saved, tmp_path):
    import shutil

    _, path = saved
    model = lorakit.load_adapter(tiny_bert(), path, "good")
    before = (lorakit.trainable_parameters(model), sorted(model.state_dict()), lorakit.active_adapters(model))
    # three ways to fail: a saved module the model lacks (after LoRA layers were wrapped), a shape
    # mismatch (after everything was attached), NaN weights
    no_head, wrong, nan = (tmp_path / n for n in ("no-head", "wrong", "nan"))
    for folder in (no_head, wrong, nan):
        shutil.copytree(path, folder)
    cfg = json.loads((no_head / "adapter_config.json").read_text())
    (no_head / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": ["pooler_head"]}))
    tensors = load_file(path / "adapter_model.safetensors")
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
    save_file({**tensors, key: torch.zeros(5, 32)}, wrong / "adapter_model.safetensors")  # more rows than r: found after attaching
    save_file({**tensors, key: torch.full_like(tensors[key], float("nan"))}, nan / "adapter_model.safetensors")
    messages = {no_head: "'pooler_head' matches no module", wrong: "shape mismatches", nan: "NaN or infinite values in 1"}
    for _ in range(7):
        for folder, message in messages.items():
            with pytest.raises(ValueError, match=message):
                lorakit.load_adapter(model, folder, "x")
    assert (lorakit.trainable_parameters(model), sorted(model.state_dict()), lorakit.active_adapters(model)) == before
    lorakit.load_adapter(model, path, "x")  # the name is free again
    assert lorakit.adapter_names(model) == ["good", "x"]


def test_non_finite_adapters_are_refused_at_load_by_name(saved):
    _, path = saved
    tensors = load_file(path / "adapter_model.safetensors")
    key = "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"
    save_file({**tensors, key: tensors[key].index_fill(0, torch.tensor([0]), float("inf"))}, path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=rf"NaN or infinite values in 1 tensor\(s\): {key}"):
        lorakit.load_adapter(tiny_bert(), path)
    save_file(tensors, path / "adapter_model.safetensors")
    text = (path / "adapter_config.json").read_text()
    (path / "adapter_config.json").write_text(text.replace('"lora_alpha": 8', '"lora_alpha": Infinity'))
    with pytest.raises(ValueError, match="adapter_config.json sets lora_alpha=inf; every number of a LoRA config must "
                                         "be finite"):
        lorakit.load_adapter(tiny_bert(), path)


def test_adapters_saved_from_python_name_their_base_and_task_for_peft(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    peft = pytest.importorskip("peft")
    model = lorakit.add_lora(AutoModelForCausalLM.from_pretrained(tiny_llama),
                             LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_llama and config["task_type"] == "CAUSAL_LM"
    assert lorakit.adapter_config(model, "default").task_type is None  # the file is filled, the config not rewritten
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    x = ids()
    torch.testing.assert_close(output(theirs, x), output(model.eval(), x), **TOL[torch.float32])
    # what the user set is kept; a classifier whose head the adapter does not hold gets no SEQ_CLS (its
    # readers would then look for the head in the file); a bare model is FEATURE_EXTRACTION
    mine = lorakit.add_lora(AutoModelForCausalLM.from_pretrained(tiny_llama),
                            LoraConfig(target_modules=["q_proj"], base_model_name_or_path="org/base", task_type="SEQ_2_SEQ_LM"))
    lorakit.save_adapter(mine, tmp_path / "mine")
    config = json.loads((tmp_path / "mine" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/base" and config["task_type"] == "SEQ_2_SEQ_LM"
    lorakit.save_adapter(lorakit.add_lora(tiny_bert(), LoraConfig()), tmp_path / "no-head")
    assert json.loads((tmp_path / "no-head" / "adapter_config.json").read_text())["task_type"] is None
    lorakit.save_adapter(lorakit.add_lora(tiny_bert().bert, LoraConfig()), tmp_path / "bare")
    assert json.loads((tmp_path / "bare" / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"


def test_ranks_are_checked_per_layer_before_allocating(tmp_path):
    """rank_pattern may give every layer a rank below r (the file's largest lora_A is then smaller than
    r: it loads); a layer whose config rank exceeds its lora_A's rows is refused before any factor exists."""
    cfg = LoraConfig(r=8, alpha=8, target_modules=["query", "value"], rank_pattern={"query": 2, "value": 3})
    model = lorakit.add_lora(tiny_bert(), cfg)
    randomize(model)
    lorakit.save_adapter(model, tmp_path / "low")
    again = lorakit.load_adapter(tiny_bert(), tmp_path / "low")
    torch.testing.assert_close(output(again, ids()), output(model, ids()), **TOL[torch.float32])
    d = json.loads((tmp_path / "low" / "adapter_config.json").read_text())
    (tmp_path / "low" / "adapter_config.json").write_text(json.dumps({**d, "rank_pattern": {"query": 10**9, "value": 3}}))
    with pytest.raises(ValueError, match=r"has r=1000000000 in its config for bert.encoder.layer.0.attention.self.query, "
                                         r"but its lora_A has 2 rows"):
        lorakit.load_adapter(tiny_bert(), tmp_path / "low")
