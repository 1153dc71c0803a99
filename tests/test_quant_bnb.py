"""LoRA on bitsandbytes bases (lorakit.quant.bnb): PEFT as the oracle on the same quantized tiny Llama (same
logits and LoRA gradients, adapters both ways), merging into a 4-bit base, mixed-adapter batches, and
bitsandbytes' CPU repacking (a forward in eval mode without autograd on AVX-512 BF16 CPUs) kept away."""

import warnings

import pytest
import torch

import lorakit
from helpers import MODEL_TOL
from lorakit.model import QuantizedMergeWarning

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from bitsandbytes import functional as BF  # noqa: E402

from lorakit.quant import bnb as qbnb  # noqa: E402

# Every linear layer's in_features is a multiple of bitsandbytes' 4-bit block (64 weights).
LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
BASES = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "nf4-single": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False),
    "nf4-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
    "bnb-int8": dict(load_in_8bit=True),
}
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama64")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(folder)
    return str(folder)


def load(folder, base="nf4"):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = dict(BASES[base])
    if kw.get("load_in_4bit"):
        kw.setdefault("bnb_4bit_compute_dtype", torch.float32)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**kw), device_map="cpu")


def ids(rows=2, length=9):
    return torch.randint(0, LLAMA["vocab_size"], (rows, length), generator=torch.Generator().manual_seed(1))


def peft_model(folder, base="nf4"):
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
    return peft.get_peft_model(load(folder, base), config)


def lora_grads(model):
    """``{module path}.lora_A`` / ``.lora_B`` -> gradient, for PEFT's and lorakit's names alike."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            out[name.removeprefix("base_model.model.").replace(".default", "").removesuffix(".weight")] = p.grad
    return out


@pytest.mark.parametrize("base", BASES)
def test_peft_qlora_adapter_gives_lorakit_the_same_logits_and_lora_gradients(llama_folder, base, tmp_path):
    theirs = peft_model(llama_folder, base).train()
    expected = theirs(input_ids=ids()).logits
    expected.square().mean().backward()
    theirs.save_pretrained(tmp_path)
    ours = lorakit.load_adapter(load(llama_folder, base), tmp_path).train()
    lorakit.mark_trainable(ours, ["default"])
    got = ours(input_ids=ids()).logits
    got.square().mean().backward()
    torch.testing.assert_close(got, expected, **MODEL_TOL)
    with torch.no_grad(), lorakit.disable_adapters(ours):
        assert not torch.allclose(ours(input_ids=ids()).logits, got)  # a non-trivial adapter
    theirs_grads, our_grads = lora_grads(theirs), lora_grads(ours)
    assert len(our_grads) == 2 * 2 * len(TARGETS) and set(our_grads) == set(theirs_grads)
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, theirs_grads[name], **MODEL_TOL)


def test_a_lorakit_adapter_on_a_4bit_base_loads_in_peft_with_the_same_logits(llama_folder, tmp_path):
    ours = lorakit.add_lora(load(llama_folder), lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS, init="random"))
    ours.train()
    expected = ours(input_ids=ids()).logits
    lorakit.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(load(llama_folder), tmp_path).train()
    torch.testing.assert_close(theirs(input_ids=ids()).logits, expected, **MODEL_TOL)


def _repacking_cpu() -> bool:
    return bool(BF.has_avx512bf16())


@pytest.mark.parametrize("flag", [False, True])
def test_inference_computes_what_training_saw_whatever_bitsandbytes_cpu_flag_says(llama_folder, flag):
    """bitsandbytes repacks a 4-bit weight at the first forward in eval mode without autograd where its flag
    support_avx512bf16_for_cpu is set (AVX-512 BF16 CPUs) and computes in bf16 from then on; lorakit's
    adopted layers never do, with the flag forced either way."""
    model = lorakit.add_lora(load(llama_folder), lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS, init="random"))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 4  # the unadapted ones are adopted too
    before = [m.weight.data.clone() for m in layers]
    for m in layers:
        m.support_avx512bf16_for_cpu = flag
    trained = model.train()(input_ids=ids()).logits.detach()
    with torch.no_grad():
        served = model.eval()(input_ids=ids()).logits
    assert torch.equal(served, trained)
    assert all(torch.equal(m.weight.data, w) for m, w in zip(layers, before))
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


@pytest.mark.skipif(not _repacking_cpu(), reason="bitsandbytes repacks on CPUs with AVX-512 BF16 only")
def test_peft_on_a_repacking_cpu_computes_otherwise_in_inference(llama_folder):
    """What lorakit avoids, measured on PEFT: its eval-mode outputs move away from its training-mode ones."""
    theirs = peft_model(llama_folder)
    trained = theirs.train()(input_ids=ids()).logits.detach()
    with torch.no_grad():
        served = theirs.eval()(input_ids=ids()).logits
    assert (served - trained).abs().max() > 1e-4


def _layer(rows=64, cols=128, quant_type="nf4", nested=True, seed=0):
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(cols, rows, bias=True, compute_dtype=torch.float32, compress_statistics=nested,
                              quant_type=quant_type)
    return layer.to("cpu")  # quantizes


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_dequantize_equals_bitsandbytes_and_the_reference(quant_type, nested):
    layer = qbnb.adopt(_layer(quant_type=quant_type, nested=nested))
    expected = BF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(layer.dequantize(), expected)
    assert torch.equal(qbnb.dequantize_4bit_reference(layer.weight), expected)
    assert torch.equal(layer.dequantize(torch.bfloat16), expected.bfloat16())  # rounded once


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_the_forward_decodes_into_one_reused_buffer_the_same_weights(quant_type):
    """The CPU forward writes each layer's weight into this thread's scratch buffer (no fresh tensor, no page
    faults per product): the same values as dequantize(), in fp32 and bf16, one buffer for every layer."""
    first, second = qbnb.adopt(_layer(quant_type=quant_type)), qbnb.adopt(_layer(quant_type=quant_type, seed=1))
    for dtype in (torch.float32, torch.bfloat16):
        a = first._scratch_weight(dtype)
        assert torch.equal(a, first.dequantize(dtype))
        b = second._scratch_weight(dtype)
        assert b.data_ptr() == a.data_ptr() and torch.equal(b, second.dequantize(dtype))
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = first(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, first.dequantize(), first.bias), rtol=0, atol=0)
    y.square().sum().backward()
    expected = (2 * y.detach()) @ first.dequantize()
    torch.testing.assert_close(x.grad, expected, rtol=1.3e-6, atol=1e-5)


def test_blocks_spanning_rows_are_decoded_right():
    """bitsandbytes 0.50's CPU kernel counts blocks per row: with 48 inputs (blocks of 64 spanning rows) its
    weights are far off; lorakit decodes those layers with the reference (within nf4's own error)."""
    torch.manual_seed(0)
    weight = torch.randn(32, 48)
    layer = bnb.nn.Linear4bit(48, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    layer = qbnb.adopt(layer.to("cpu"))
    x = torch.randn(4, 48)
    torch.testing.assert_close(layer(x), x @ qbnb.dequantize_4bit_reference(layer.weight).T, rtol=1.3e-6, atol=1e-5)
    ours = (layer.dequantize() - weight).norm() / weight.norm()
    theirs = (BF.dequantize_4bit(layer.weight.data, layer.weight.quant_state) - weight).norm() / weight.norm()
    assert ours < 0.12 < theirs


def test_a_layer_repacked_before_lorakit_adopts_it_is_unpacked_and_said(llama_folder):
    """Force bitsandbytes' repacking (pure torch: any CPU) before lorakit sees the layer: lorakit unpacks it,
    warns, and computes with the bf16-rounded block scales the repacking left."""
    model = load(llama_folder)
    q_proj = model.model.layers[0].self_attn.q_proj
    true = BF.dequantize_4bit(q_proj.weight.data, q_proj.weight.quant_state)
    q_proj.weight.data, _ = BF._convert_weight_packed_for_cpu(q_proj.weight.data, q_proj.weight.quant_state)
    with pytest.warns(qbnb.RepackedWeightWarning, match="had been repacked by bitsandbytes"):
        lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS, init="random"))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.quantized and not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    rounded = layer._dequantized(layer.weight)
    torch.testing.assert_close(rounded, true, rtol=2 ** -8, atol=0)  # block scales rounded to bf16, codes exact
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer.base_forward(x, layer.weight), torch.nn.functional.linear(x, rounded) +
                               (layer.bias if layer.bias is not None else 0), **MODEL_TOL)


@pytest.mark.parametrize("base", ["nf4", "bnb-int8"])
def test_merging_into_a_quantized_base_equals_the_unmerged_model(llama_folder, base):
    model = lorakit.add_lora(load(llama_folder, base), lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS,
                                                                          init="random")).eval()
    layer = model.model.layers[0].self_attn.q_proj
    true = layer._dequantized(layer.weight)
    with torch.no_grad():
        unmerged = model(input_ids=ids()).logits
        with lorakit.disable_adapters(model):
            base_logits = model(input_ids=ids()).logits
    assert not torch.allclose(unmerged, base_logits)
    with pytest.warns(QuantizedMergeWarning, match="exactly the function the adapter was trained against"):
        lorakit.merge(model)
    assert layer.weight.dtype == torch.float32
    torch.testing.assert_close(layer.weight, true + layer.delta_weight("default"), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids()).logits, unmerged, **MODEL_TOL)
        with lorakit.disable_adapters(model):  # the quantized weight, kept aside
            torch.testing.assert_close(model(input_ids=ids()).logits, base_logits, rtol=0, atol=0)
    lorakit.merge(model)  # twice = once
    lorakit.unmerge(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids()).logits, unmerged)
    merged = lorakit.merge_and_unload(model, dtype=torch.bfloat16)
    q_proj, k_proj = merged.model.layers[0].self_attn.q_proj, merged.model.layers[0].self_attn.k_proj
    assert type(q_proj) is torch.nn.Linear and q_proj.weight.dtype == torch.bfloat16
    assert isinstance(k_proj, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)  # no adapter there: left quantized


def test_dequantize_model_gives_a_plain_model_of_the_true_weights(llama_folder):
    model = load(llama_folder)
    x = ids()
    with torch.no_grad():
        expected = qbnb.adopt_all(model) and model.eval()(input_ids=x).logits
    assert qbnb.dequantize_model(model) == 2 * 7
    assert not any(qbnb.is_bnb_linear(m) for m in model.modules())
    assert getattr(model.config, "quantization_config", None) is None
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, expected, **MODEL_TOL)


def test_mixed_adapter_batches_on_a_4bit_base(llama_folder):
    model = load(llama_folder)
    for name in ("a", "b"):
        lorakit.add_lora(model, lorakit.LoraConfig(r=2 if name == "a" else 4, alpha=8, target_modules=TARGETS,
                                                   init="random"), name)
    x = ids(rows=3)
    alone = {}
    for name in ("a", "b"):
        lorakit.set_adapter(model, name)
        alone[name] = model(input_ids=x).logits.detach()
    with lorakit.disable_adapters(model):
        alone[None] = model(input_ids=x).logits.detach()
    lorakit.mark_trainable(model, ["a", "b"])
    with lorakit.adapter_per_row(model, ["b", None, "a"]):
        mixed = model(input_ids=x).logits
    for row, name in enumerate(["b", None, "a"]):
        torch.testing.assert_close(mixed[row], alone[name][row], **MODEL_TOL)
    mixed.square().mean().backward()  # training on a mixed batch reaches both adapters
    assert all(p.grad is not None for n, p in lorakit.lora_parameters(model))


def test_gradient_checkpointing_on_a_4bit_base_gives_the_same_gradients(llama_folder):
    grads = []
    for checkpointing in (False, True):
        model = lorakit.add_lora(load(llama_folder), lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS,
                                                                        init="random", dropout=0.0))
        torch.manual_seed(3)
        for _, p in lorakit.lora_parameters(model):
            torch.nn.init.normal_(p)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()(input_ids=ids()).logits.square().mean().backward()
        grads.append(lora_grads(model))
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, **MODEL_TOL)


def test_bf16_autocast_on_a_4bit_base_is_peft_s_within_bf16_rounding(llama_folder, tmp_path):
    theirs = peft_model(llama_folder).train()
    theirs.save_pretrained(tmp_path)
    ours = lorakit.load_adapter(load(llama_folder), tmp_path).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = theirs(input_ids=ids()).logits, ours(input_ids=ids()).logits
    torch.testing.assert_close(got.float(), expected.float(), rtol=1.6e-2, atol=2e-2)  # bf16 products, fp32 sums


def test_a_16_bit_linear8bitlt_is_refused_by_name():
    layer = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=True)
    with pytest.raises(ValueError, match="Linear8bitLt layers holding int8 weights"):
        qbnb.adopt(layer)


def test_the_decoding_kernels_refuse_a_quantized_base(llama_folder):
    from lorakit.quant.linear import quantize_model

    model = lorakit.add_lora(load(llama_folder), lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS))
    with pytest.raises(ValueError, match="already quantized \\(bitsandbytes\\)"):
        quantize_model(model, "int4")


def test_warnings_stay_quiet_without_a_quantized_base():
    from helpers import tiny_gpt2

    model = lorakit.add_lora(tiny_gpt2(), lorakit.LoraConfig(r=2, target_modules=["c_attn"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantizedMergeWarning)
        lorakit.merge(model)
