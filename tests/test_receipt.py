"""Receipts (lorakit.receipt, lorakit verify): each injected failure is caught and named; the good cases pass."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from helpers import randomize
from lorakit import cli
from lorakit.io import WEIGHTS_NAME, SaveVerificationError
from lorakit.receipt import RECEIPT_NAME, compare, make_receipt, read_receipt


def _base(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.fixture
def adapter(tiny_llama, tmp_path):
    """A tiny Llama's q/v adapter with random factors, saved by lorakit (with its receipt)."""
    model = _base(tiny_llama)
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def _save_base(model, tiny_llama, folder) -> None:
    """``model`` saved as a base folder with the tiny Llama's tokenizer."""
    from transformers import AutoTokenizer

    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(folder)


def _verify(capsys, *args) -> tuple[int, dict]:
    code = cli.main(["verify", *map(str, args), "--json"])
    captured = capsys.readouterr()
    assert code in (0, 1), captured.err
    return code, json.loads(captured.out)


def test_the_adapter_as_saved_reproduces(adapter, capsys):
    code, report = _verify(capsys, "--adapter", adapter)
    assert code == 0 and report["verified"], report
    assert report["fingerprint"]["status"] == "equal" and report["checksum"] == "equal"
    assert report["top1_agreement"] == 1.0 and report["tolerance"]["key"] == "fp32"
    assert cli.main(["verify", "--adapter", str(adapter)]) == 0
    assert "reproduces" in capsys.readouterr().out


def test_an_adapter_without_receipt_is_unverified(adapter, capsys):
    (adapter / RECEIPT_NAME).unlink()
    code, report = _verify(capsys, "--adapter", adapter)
    assert code == 1 and report["reason"] == "unverified: no receipt"
    assert lorakit.load_adapter(_base(report_base(adapter)), adapter) is not None  # still loads


def report_base(adapter) -> str:
    return json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_keys_that_match_no_layer_are_named(adapter, capsys):
    tensors = load_file(adapter / WEIGHTS_NAME)
    renamed = {k.replace(".layers.1.self_attn.q_proj.", ".layers.1.self_attn.q_projection."): v for k, v in tensors.items()}
    save_file(renamed, adapter / WEIGHTS_NAME)
    code, report = _verify(capsys, "--adapter", adapter)
    assert code == 1 and not report["verified"]
    assert report["unmatched_tensors"] == ["base_model.model.model.layers.1.self_attn.q_projection.lora_A.weight",
                                           "base_model.model.model.layers.1.self_attn.q_projection.lora_B.weight"]
    assert report["top1_agreement"] < 1.0 or report["max_abs_logprob"] > 1e-3  # that layer ran without its adapter
    cli.main(["verify", "--adapter", str(adapter)])
    assert "q_projection.lora_A.weight" in capsys.readouterr().out


def test_a_base_with_one_targeted_weight_changed_is_named(adapter, tiny_llama, tmp_path, capsys):
    base = _base(tiny_llama)
    with torch.no_grad():
        base.model.layers[0].self_attn.v_proj.weight[3, 5] += 0.5
    _save_base(base, tiny_llama, tmp_path / "changed")
    code, report = _verify(capsys, "--adapter", adapter, "--model", tmp_path / "changed")
    assert code == 1
    assert report["fingerprint"] == {"status": "different", "differ": ["model.layers.0.self_attn.v_proj"], "missing": []}


def test_half_of_each_lora_b_zeroed_after_saving_fails(adapter, capsys):
    tensors = load_file(adapter / WEIGHTS_NAME)
    for key, t in tensors.items():
        if ".lora_B." in key:
            t[: t.shape[0] // 2] = 0
    save_file(tensors, adapter / WEIGHTS_NAME)
    code, report = _verify(capsys, "--adapter", adapter)
    assert code == 1 and report["checksum"] == "different" and not report["passed"]
    assert report["max_abs_logprob"] > report["tolerance"]["max_abs"]


def test_a_torn_write_fails_the_save(tiny_llama, tmp_path, monkeypatch):
    import lorakit.io as io

    model = _base(tiny_llama)
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    real = io.save_file

    def torn(tensors, path, metadata=None):  # the last 8 values of one tensor never reach the file
        tensors = dict(tensors)
        key = sorted(k for k in tensors if ".lora_A." in k)[0]
        tensors[key] = tensors[key].clone().reshape(-1).index_fill(0, torch.arange(8), 0.0).view(tensors[key].shape)
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(io, "save_file", torn)
    with pytest.raises(SaveVerificationError, match=r"1 tensors differ: base_model\.model\.model\.layers\.0\.self_attn"
                                                    r"\.q_proj\.lora_A\.weight"):
        lorakit.save_adapter(model, tmp_path / "torn")


def test_a_merged_folder_of_the_right_base_passes_and_of_another_base_fails(adapter, tiny_llama, tmp_path, capsys):
    assert cli.main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    assert "base fingerprint equal, top-1 agreement 100.00%" in capsys.readouterr().out  # said before writing
    code, report = _verify(capsys, "--adapter", adapter, "--merged", tmp_path / "merged")
    assert code == 0 and report["fingerprint"]["status"] == "equal", report
    torch.manual_seed(1)
    other = type(_base(tiny_llama))(_base(tiny_llama).config)  # the same architecture, other weights
    _save_base(other, tiny_llama, tmp_path / "other")
    assert cli.main(["merge", "--adapter", str(adapter), "--model", str(tmp_path / "other"),
                     "--out", str(tmp_path / "wrong")]) == 0
    assert "base fingerprint different" in capsys.readouterr().err and (tmp_path / "wrong").is_dir()
    code, report = _verify(capsys, "--adapter", adapter, "--merged", tmp_path / "wrong")
    assert code == 1 and report["fingerprint"]["status"] == "different"
    assert "model.layers.0.self_attn.q_proj" in report["fingerprint"]["differ"]
    assert report["top1_agreement"] < 0.5


def test_peft_loads_a_folder_with_a_receipt(adapter, tiny_llama):
    peft = pytest.importorskip("peft")
    assert (adapter / RECEIPT_NAME).is_file()
    theirs = peft.PeftModel.from_pretrained(_base(tiny_llama), adapter).eval()
    ours = lorakit.load_adapter(_base(tiny_llama), adapter)
    x = read_receipt(adapter).tensors["probe.ids"]
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x).logits, rtol=1e-5, atol=1e-5)


def test_compare_restores_mode_and_adapters_and_rejects_a_corrupt_receipt(adapter, tiny_llama, tmp_path):
    model = lorakit.load_adapter(_base(tiny_llama), adapter, "mine")
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), "other")
    lorakit.set_adapter(model, "other")
    model.train()
    receipt = make_receipt(model, "mine")
    assert lorakit.active_adapters(model) == ("other",) and model.training
    assert compare(receipt, model, "mine")["passed"]
    assert lorakit.active_adapters(model) == ("other",) and model.training
    (tmp_path / RECEIPT_NAME).write_bytes((adapter / RECEIPT_NAME).read_bytes()[:100])
    with pytest.raises(ValueError, match="is not a readable receipt"):
        read_receipt(tmp_path)


def test_a_lower_precision_or_quantized_copy_of_the_base_is_the_same_base_and_another_is_not(adapter, tiny_llama):
    pytest.importorskip("bitsandbytes")
    from lorakit.tasks import lm

    reference = read_receipt(adapter)
    half = lorakit.load_adapter(_base(tiny_llama), adapter).to(torch.bfloat16)
    report = compare(reference, half, "default")
    assert report["fingerprint"]["status"] == "same base, quantized" and report["tolerance"]["key"] == "bf16"
    nf4 = lorakit.load_adapter(lm.load_causal_lm(tiny_llama, "nf4")[1], adapter)
    report = compare(reference, nf4, "default")
    assert report["fingerprint"]["status"] == "same base, quantized" and report["tolerance"]["key"] == "nf4"
    assert report["passed"], report  # within the documented 4-bit tolerance
    torch.manual_seed(3)
    other = lorakit.load_adapter(type(_base(tiny_llama))(_base(tiny_llama).config).eval(), adapter)
    report = compare(reference, other, "default")
    assert report["fingerprint"]["status"] == "different" and len(report["fingerprint"]["differ"]) == 4
    assert not report["passed"]


def test_a_model_without_a_vocabulary_gets_a_receipt_of_fingerprint_and_checksum(tmp_path):
    from helpers import conv_net

    model = conv_net()
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["conv1", "head"]))
    lorakit.save_adapter(model, tmp_path)
    reference = read_receipt(tmp_path)
    assert reference.metadata["probes"] == "none" and "probe.ids" not in reference.tensors
    assert sorted(reference.metadata["fingerprints"]) == ["conv1", "head"]
    assert compare(reference, model, "default")["passed"]
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] += 1
    report = compare(reference, model, "default")
    assert report["fingerprint"]["differ"] == ["conv1"] and not report["passed"]


@pytest.mark.parametrize(("folder", "targets", "others"), [("tiny_llama", ["q_proj", "v_proj"], ["q_proj"]),
                                                           ("tiny_gpt2_lm", ["c_attn"], ["c_fc"])])
def test_the_default_probes_of_a_causal_lm_are_the_base_models_own_samples(folder, targets, others, request):
    model = _base(request.getfixturevalue(folder))
    # every next-token distribution peaked: a sample at temperature 1 is then the argmax, which a plain forward
    # without KV cache can check (the head's input scaled, not its weight: GPT-2 ties it to the input embedding)
    model.lm_head.register_forward_pre_hook(lambda module, args: (args[0] * 3e4,))
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=targets))
    randomize(model, std=1.0)  # an adapter that changes the greedy continuation
    receipt = make_receipt(model, "default")
    ids = receipt.tensors["probe.ids"]
    start = 4
    with torch.no_grad(), lorakit.disable_adapters(model):
        base = model(ids).logits.float().log_softmax(-1)
    with torch.no_grad():
        adapted = model(ids).logits.float().argmax(-1)
    peaked = base[:, start - 1:-1].max(-1).values > -1e-4  # where the sample is the argmax
    assert peaked.float().mean() > 0.9
    assert (ids[:, start:] == base[:, start - 1:-1].argmax(-1))[peaked].all()  # the base's continuation
    assert not torch.equal(ids[:, start:], adapted[:, start - 1:-1])  # not the adapter's
    assert torch.equal(make_receipt(model, "default").tensors["probe.ids"], ids)  # reproducible from the seed
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=others), "other")  # (other layers: sampled again)
    randomize(model, seed=7, std=1.0)
    assert torch.equal(make_receipt(model, "other").tensors["probe.ids"], ids)  # every adapter of a base: the same
    special = {model.config.eos_token_id, model.config.pad_token_id}
    assert not (set(ids.flatten().tolist()) & special)
    assert receipt.metadata["probes"] == {"seed": 0, "shape": [4, 32], "kind": "sampled"}


def test_probe_generation_leaves_the_models_state_unchanged(tiny_llama):
    model = lorakit.add_lora(_base(tiny_llama), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "mine")
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), "other")
    lorakit.set_adapter(model, "other")
    lorakit.mark_trainable(model, ["mine", "other"])
    model.train()
    model.model.layers[1].eval()
    modes = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    rng = torch.get_rng_state()
    receipt = make_receipt(model, "mine")
    assert lorakit.active_adapters(model) == ("other",)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == grads
    assert not any(layer.disabled for _, layer in lorakit.lora_layers(model))
    assert torch.equal(torch.get_rng_state(), rng)
    assert receipt.metadata["probes"]["kind"] == "sampled"


def test_probes_of_bf16_and_quantized_models_of_a_classifier_and_of_old_receipts(tiny_llama, tiny_model):
    from transformers import AutoModelForSequenceClassification

    from lorakit.quant.linear import quantize_model
    from lorakit.receipt import RANDOM_PROBE_TOLERANCES, TOLERANCES, tolerances_for

    half = lorakit.add_lora(_base(tiny_llama).to(torch.bfloat16), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    receipt = make_receipt(half, "default")
    assert receipt.metadata["probes"]["kind"] == "sampled" and receipt.metadata["forward_dtype"] == "bf16"
    assert compare(receipt, half, "default")["passed"]
    model = lorakit.add_lora(_base(tiny_llama), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize(model)
    reference = make_receipt(model, "default")
    quantize_model(model, "int8")
    report = compare(reference, model, "default")
    assert report["tolerance"]["key"] == "int8" and report["passed"], report
    assert make_receipt(model, "default").metadata["probes"]["kind"] == "sampled"  # sampled on the int8 layers
    old = read_receipt_like(reference, probes={"seed": 0, "shape": [4, 32]})  # written before sampled probes
    assert tolerances_for(old) is RANDOM_PROBE_TOLERANCES and tolerances_for(reference) is TOLERANCES
    assert compare(old, model, "default")["tolerance"] == {"key": "int8", **RANDOM_PROBE_TOLERANCES["int8"]}
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_model).eval()
    lorakit.add_lora(classifier, lorakit.LoraConfig(r=4, target_modules=["query", "value"]))
    assert make_receipt(classifier, "default").metadata["probes"] == {"seed": 0, "shape": [4, 32], "kind": "random"}


def read_receipt_like(receipt, **metadata):
    from lorakit.receipt import Receipt

    return Receipt(receipt.tensors, {**receipt.metadata, **metadata})
