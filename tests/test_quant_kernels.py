"""Block-quantized weights (lorakit.quant.blocks), their C++ kernels (lorakit.quant.kernels: compiled once into
the user's cache, reused by later sessions) and the layers that use them (lorakit.quant.linear)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import lorakit
from helpers import randomize
from lorakit.quant import blocks, kernels
from lorakit.quant.linear import QuantLinear, quantize_linears

FORMATS = blocks.FORMATS


@pytest.fixture(scope="module")
def isas():
    kernels.load()
    return [isa for isa, code in kernels.ISAS.items() if code <= kernels.ISAS[kernels.cpu_isa()]]


def _weight(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05


# ---- the formats, in plain torch --------------------------------------------------------------------------------


def test_4bit_codes_are_packed_in_ggufs_order():
    codes = torch.arange(32, dtype=torch.uint8).remainder(16)[None]  # one block: 0..15, 0..15
    packed = blocks.pack_nibbles(codes)
    assert packed.tolist() == [[j | (j << 4) for j in range(16)]]  # byte j: element j low, element j + 16 high
    codes = torch.randint(0, 16, (3, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(blocks.unpack_nibbles(blocks.pack_nibbles(codes)), codes)


def test_a_hand_made_block_dequantizes_to_d_q_plus_m():
    q4_1 = blocks.BlockWeight("q4_1", blocks.pack_nibbles(torch.arange(32).remainder(16)[None].to(torch.uint8)),
                              torch.tensor([[0.5]], dtype=torch.float16), torch.tensor([[-1.0]], dtype=torch.float16))
    assert blocks.dequantize(q4_1).tolist() == [[0.5 * (j % 16) - 1.0 for j in range(32)]]
    q8 = blocks.BlockWeight("q8_0", torch.arange(-16, 16, dtype=torch.int8)[None], torch.tensor([[0.25]], dtype=torch.float16), None)
    assert blocks.dequantize(q8).tolist() == [[0.25 * j for j in range(-16, 16)]]


@pytest.mark.parametrize("fmt", FORMATS)
def test_rounding_moves_each_weight_by_at_most_its_step(fmt):
    weight = _weight(16, 128)
    weight[0, :32] = 0.0  # an all-zero block (d = 0)
    q = blocks.quantize(weight, fmt)
    err = (blocks.dequantize(q) - weight).abs().reshape(16, 4, 32)
    d = q.d.float().abs()[..., None]
    amax = weight.abs().reshape(16, 4, 32).amax(-1, keepdim=True)
    step = d if fmt == "q4_0" else d / 2  # q4_0's grid reaches -8 d but only 7 d: the far end rounds by up to d
    assert (err <= step + amax * 2**-9).all()  # + the float16 rounding of d and m
    assert err[0, 0].max() == 0
    again = blocks.quantize(blocks.dequantize(q), fmt)  # weights on the grid stay where they are
    torch.testing.assert_close(blocks.dequantize(again), blocks.dequantize(q), rtol=0, atol=float(d.max()) * 2**-9)


def test_the_grids_have_their_formats_ranges():
    weight = _weight(8, 64)
    q8, q40, q41 = (blocks.quantize(weight, f) for f in ("q8_0", "q4_0", "q4_1"))
    assert q8.q.dtype == torch.int8 and q8.q.abs().max() == 127 and q8.m is None
    assert q41.q.shape == (8, 32) and q41.q.dtype == torch.uint8
    torch.testing.assert_close(q41.m.float(), weight.reshape(8, 2, 32).amin(-1), rtol=1e-3, atol=0)
    torch.testing.assert_close(q40.m.float(), -8 * q40.d.float(), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(8, 40), (8,), (4, 2, 32)])
def test_in_features_not_a_multiple_of_32_is_refused(shape):
    with pytest.raises(ValueError, match=r"in_features is a multiple of 32, got shape .*keep this layer in full precision"):
        QuantLinear.from_float(torch.randn(*shape))


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match=r"fmt must be one of \('q8_0', 'q4_0', 'q4_1'\), got 'q5_k'"):
        blocks.quantize(torch.randn(4, 32), "q5_k")


# ---- the kernels --------------------------------------------------------------------------------------------------


ACTS = list(kernels.ACTS)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 32])
@pytest.mark.parametrize("isa", list(kernels.ISAS))
@pytest.mark.parametrize("act", ACTS)
def test_the_kernel_computes_the_reference(isas, fmt, rows, isa, act):
    if isa not in isas:
        pytest.skip(f"this CPU has no {isa}")
    for out, inp, bias in [(37, 96, True), (5, 2112, False)]:  # odd output rows; > 64 blocks (factor chunks)
        weight = blocks.quantize(_weight(out, inp), fmt)
        b = torch.randn(out) if bias else None
        x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(1))
        want = blocks.reference_linear(x, weight, b, act)
        got = kernels.linear(x, weight, b, isa=isa, act=act)
        # the same float32 products, summed in another order: a few ulps of the sum of |terms|
        tol = 1e-6 * float((x.abs() @ blocks.dequantize(weight).abs().T).max())
        torch.testing.assert_close(got, want, rtol=0, atol=tol)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("isa", list(kernels.ISAS))
@pytest.mark.parametrize("act", ACTS)
def test_every_row_count_and_tile_remainder_computes_the_reference(isas, fmt, isa, act):
    """1..17 rows (each tile size 1..8, equal splits such as 9 = 5 + 4), 31 and 64; K sliced where a tile's rows of x
    exceed L1 (1536, 2112); panels of output rows (37 q8_0 rows of K = 2112 are two); x read with a stride; with int8
    activations, K / 32 not a multiple of 8 (their scales' rows are padded) and over 64 blocks (chunks of scales)."""
    if isa not in isas:
        pytest.skip(f"this CPU has no {isa}")
    for out, inp, bias in [(37, 2112, True), (70, 1536, False), (9, 96, True), (11, 576, True)]:
        weight = blocks.quantize(_weight(out, inp), fmt)
        b = torch.randn(out) if bias else None
        wabs = blocks.dequantize(weight).abs().T
        for rows in [*range(1, 18), 31, 64]:
            x = torch.randn(rows, inp + 32, generator=torch.Generator().manual_seed(rows))[:, :inp]
            tol = 1e-6 * float((x.abs() @ wabs).max())
            torch.testing.assert_close(kernels.linear(x, weight, b, isa=isa, act=act),
                                       blocks.reference_linear(x, weight, b, act), rtol=0, atol=tol,
                                       msg=lambda m, rows=rows, out=out, inp=inp: f"{rows} rows of {out}x{inp}: {m}")


@pytest.mark.parametrize("act", ACTS)
def test_the_kernel_reads_rows_with_a_stride(isas, act):
    weight = blocks.quantize(_weight(8, 64), "q4_1")
    x = torch.randn(4, 96)[:, :64]  # rows 96 apart
    torch.testing.assert_close(kernels.linear(x, weight, act=act), blocks.reference_linear(x, weight, act=act),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("isa", list(kernels.ISAS))
def test_int8_activations_carry_nan_and_infinity_and_zero_blocks(isas, fmt, isa):
    """A NaN or an infinity in x makes its rows' outputs non-finite, as in float (a block's max would drop a NaN;
    the scheduler ends a request whose logits are not finite); an all-zero block contributes 0."""
    if isa not in isas:
        pytest.skip(f"this CPU has no {isa}")
    weight = blocks.quantize(_weight(16, 96), fmt)
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(0))
    x[0, 5], x[1, 70], x[2, :32] = float("nan"), float("inf"), 0.0
    for rows in (x, x[:1], x[1:2]):
        y = kernels.linear(rows, weight, isa=isa, act="int8")
        assert not torch.isfinite(y[: 2 if len(rows) > 2 else 1]).any(dim=-1).any()
    y = kernels.linear(x[2:], weight, isa=isa, act="int8")
    torch.testing.assert_close(y, blocks.reference_linear(x[2:], weight, act="int8"), rtol=1e-5, atol=1e-5)


def test_int8_activations_stay_within_their_rounding_of_float(isas):
    """What rounding x to int8 blocks costs: each product moves by at most half a step of x per weight."""
    weight = blocks.quantize(_weight(64, 576), "q4_1")
    x = torch.randn(8, 576, generator=torch.Generator().manual_seed(0))
    exact, rounded = kernels.linear(x, weight, act="fp32"), kernels.linear(x, weight, act="int8")
    step = x.reshape(8, -1, 32).abs().amax(-1).repeat_interleave(32, -1) / 127  # (8, 576): each x's step
    bound = (step / 2) @ blocks.dequantize(weight).abs().T + 1e-4
    assert ((rounded - exact).abs() <= bound).all()
    assert not torch.equal(rounded, exact)


def test_an_unknown_act_is_refused(isas, monkeypatch):
    with pytest.raises(ValueError, match=r"act must be one of \('int8', 'fp32'\) .*got 'int4'"):
        kernels.resolve_act("int4")
    monkeypatch.setenv("LORAKIT_QUANT_ACT", "fp32")
    assert kernels.resolve_act() == 32 and QuantLinear.from_float(_weight(4, 32)).act == 32
    monkeypatch.delenv("LORAKIT_QUANT_ACT")
    assert kernels.resolve_act() == 8


def test_an_unknown_or_missing_isa_is_refused(isas, monkeypatch):
    kernels.resolve_isa.cache_clear()
    with pytest.raises(ValueError, match=r"isa must be 'auto' or one of \('avx2', 'avx512', 'avx512vnni'\), got 'neon'"):
        kernels.resolve_isa("neon")
    monkeypatch.setattr(kernels, "cpu_isa", lambda: "avx2")
    with pytest.raises(ValueError, match=r"isa 'avx512' is not supported by this CPU \(it runs 'avx2'\)"):
        kernels.resolve_isa("avx512")
    assert kernels.resolve_isa("avx2") == 1
    kernels.resolve_isa.cache_clear()


def test_the_isa_can_be_forced_from_the_environment(isas, monkeypatch):
    kernels.resolve_isa.cache_clear()
    monkeypatch.setenv("LORAKIT_QUANT_ISA", "avx2")
    assert kernels.resolve_isa() == 1
    kernels.resolve_isa.cache_clear()


def test_without_a_compiler_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"no C\+\+ compiler \(c\+\+\) was found: install a C\+\+ compiler and ninja .*apt install g\+\+"):
        kernels.load.__wrapped__()  # the uncached build, as on a first use


def test_without_ninja_the_error_says_what_to_install(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"ninja was not found: install .*pip install ninja"):
        kernels.load.__wrapped__()


def test_a_failed_build_is_one_line_naming_the_folder(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    def fail(**kwargs):
        raise RuntimeError("Error building extension 'lorakit_quant_x'\nmore lines")

    monkeypatch.setattr(cpp_extension, "load", fail)
    monkeypatch.setenv("LORAKIT_KERNEL_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"building lorakit's quantized kernels in .* failed \(the compiler's output is above: "
                                           r"Error building extension 'lorakit_quant_x'\); it needs torch's C\+\+ headers") as info:
        kernels.load.__wrapped__()
    assert "\n" not in str(info.value)


def test_the_build_folder_is_keyed_by_the_cpu_flags(monkeypatch):
    here = kernels.cache_dir()
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2", "fma", "f16c"})
    assert kernels.cache_dir() != here and kernels.cache_dir().parent == here.parent


def test_pips_ninja_beside_the_python_goes_on_path(tmp_path, monkeypatch):
    """requirements.txt's ninja lands in .venv/bin, off PATH when .venv/bin/python runs by its path."""
    import os
    import stat

    scripts = tmp_path / "bin"
    scripts.mkdir()
    (scripts / "ninja").write_text("#!/bin/sh\n")
    (scripts / "ninja").chmod(stat.S_IRWXU)
    monkeypatch.setattr(kernels.sysconfig, "get_path", lambda name: str(scripts))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    kernels._find_pip_ninja()
    assert os.environ["PATH"].split(os.pathsep) == [str(scripts), str(tmp_path / "nothing-here")]
    kernels._find_pip_ninja()  # found now: PATH stays as it is
    assert os.environ["PATH"].split(os.pathsep) == [str(scripts), str(tmp_path / "nothing-here")]


def test_the_sources_ship_with_the_package():
    import tomllib
    from pathlib import Path

    config = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["lorakit"]
    shipped = {p.name for pattern in patterns for p in (kernels.CSRC.parents[1]).glob(pattern)}
    assert set(kernels.SOURCES + kernels.HEADERS) <= shipped


# ---- layers and models --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_quant_linear_takes_any_leading_shape_and_dtype(isas, fmt):
    layer = torch.nn.Linear(64, 24)
    q = QuantLinear.from_float(layer.weight, layer.bias, fmt)
    x = torch.randn(2, 3, 64)
    act = {v: k for k, v in kernels.ACTS.items()}[q.act]
    want = blocks.reference_linear(x, q.block_weight(), layer.bias, act)
    torch.testing.assert_close(q(x), want, rtol=1e-5, atol=1e-5)
    assert q(x.bfloat16()).dtype == torch.bfloat16
    q.to(torch.bfloat16)  # a model cast rounds the bias but leaves the float16 factors (int16 bit patterns) as they are
    want = blocks.reference_linear(x, q.block_weight(), layer.bias.bfloat16(), act)
    torch.testing.assert_close(q(x), want, rtol=1e-5, atol=1e-5)
    assert repr(q).endswith(f"{fmt})")


def test_quant_linear_compiles_into_one_graph(isas):
    """The operator has a fake (shape) implementation, so torch.compile keeps it in the graph (a decode step
    compiled whole)."""
    q = QuantLinear.from_float(_weight(48, 64), torch.randn(48), "q4_1")
    x = torch.randn(2, 3, 64)
    compiled = torch.compile(lambda x: torch.relu(q(x)) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), torch.relu(q(x)) * 2)


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize(model, 1, std=0.3)  # a non-trivial adapter
    return model


def _dequantized_twin(fmt):
    """The float model whose every linear weight is its quantized value (the LM head untied from the input
    embedding, which stays float): what the quantized model computes."""
    from lorakit.layers import LoraLinear

    twin = _tiny_llama()
    with torch.no_grad():
        twin.lm_head.weight = torch.nn.Parameter(blocks.dequantize(blocks.quantize(twin.lm_head.weight, fmt)))
        for module in twin.model.modules():
            if isinstance(module, torch.nn.Linear | LoraLinear):
                module.weight.copy_(blocks.dequantize(blocks.quantize(module.weight, fmt)))
    return twin


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_linears_computes_the_quantized_model_with_float_adapters(isas, fmt, monkeypatch):
    """With float32 activations, exactly the float model of the quantized weights; with int8 activations (the
    default) close to it."""
    from lorakit.layers import LoraLinear

    monkeypatch.setenv("LORAKIT_QUANT_ACT", "fp32")
    model, rounded = _tiny_llama(), _tiny_llama()
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert quantize_linears(model, fmt) == 2 * 7 + 1  # 7 matrices per layer and the LM head
        after = model(input_ids=ids).logits
        want = _dequantized_twin(fmt)(input_ids=ids).logits
        monkeypatch.setenv("LORAKIT_QUANT_ACT", "int8")
        quantize_linears(rounded, fmt)
        int8 = rounded(input_ids=ids).logits
    assert float((int8 - after).norm() / after.norm()) < 0.02 and not torch.equal(int8, after)
    lora = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(lora) == 4 and all(isinstance(m.int8_base, QuantLinear) for m in lora)
    assert isinstance(model.lm_head, QuantLinear) and isinstance(model.model.embed_tokens, torch.nn.Embedding)
    torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(after, before, atol=1e-4)  # the weights did change
    assert float((after - before).norm() / before.norm()) < (0.02 if fmt == "q8_0" else 0.2)


@pytest.mark.parametrize("per_row", [False, True])
def test_sibling_layers_share_one_product(isas, monkeypatch, per_row):
    """q, k, v and gate, up compute in one kernel call each (4 calls per layer, not 7), with the same logits as
    layers quantized apart; their weights are views of one buffer."""
    from lorakit.quant import linear

    fused, apart = _tiny_llama(), _tiny_llama()
    quantize_linears(fused, "q4_1")
    with monkeypatch.context() as m:
        m.setattr(linear, "fuse_siblings", lambda model: 0)
        quantize_linears(apart, "q4_1")
    attn = fused.model.layers[0].self_attn
    assert attn.k_proj.q.untyped_storage().data_ptr() == attn.q_proj.int8_base.q.untyped_storage().data_ptr()
    calls = []
    kernel = linear._linear
    monkeypatch.setattr(linear, "_linear", lambda *a: calls.append(a[1].shape[0]) or kernel(*a))
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(3))
    names = ["default"] * 3 if per_row else None
    with torch.inference_mode():
        for _ in range(3):  # (the same every time: each product is dropped once its siblings read it)
            calls.clear()
            with lorakit.adapter_per_row(fused, names) if per_row else contextlib.nullcontext():
                got = fused(input_ids=ids).logits
            assert sorted(calls) == sorted([64 + 32 + 32, 64, 2 * 128, 64] * 2 + [256])  # qkv, o, gate+up, down; head
        with lorakit.adapter_per_row(apart, names) if per_row else contextlib.nullcontext():
            want = apart(input_ids=ids).logits
    assert torch.equal(got, want)


def test_siblings_given_different_inputs_compute_their_own_rows(isas):
    """A module whose q, k and v read different inputs (cross-attention) gets each layer's own product, and after
    two such calls stops sharing."""
    from lorakit.quant.linear import fuse_siblings

    module = torch.nn.Module()
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(module, name, QuantLinear.from_float(_weight(32, 64, seed=len(name) + ord(name[0])), fmt="q8_0"))
    apart = {name: QuantLinear(getattr(module, name).block_weight()) for name in ("q_proj", "k_proj", "v_proj")}
    assert fuse_siblings(module) == 1
    xs = [torch.randn(2, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for _ in range(3):
        for name, x in zip(("q_proj", "k_proj", "v_proj"), xs):
            torch.testing.assert_close(getattr(module, name)(x), apart[name](x), rtol=0, atol=0)
    assert not module.q_proj.fused.shared


def test_siblings_compile_into_one_graph_with_their_shared_product(isas):
    from lorakit.quant.linear import fuse_siblings

    module = torch.nn.Module()
    for i, name in enumerate(("gate_proj", "up_proj")):
        setattr(module, name, QuantLinear.from_float(_weight(64, 64, seed=i), torch.randn(64), "q4_1"))
    apart = [QuantLinear(m.block_weight(), m.bias) for m in (module.gate_proj, module.up_proj)]
    fuse_siblings(module)
    x = torch.randn(3, 64)
    compiled = torch.compile(lambda x: F.silu(module.gate_proj(x)) * module.up_proj(x), fullgraph=True, backend="eager")
    for _ in range(2):
        torch.testing.assert_close(compiled(x), F.silu(apart[0](x)) * apart[1](x), rtol=0, atol=0)
    assert module.gate_proj.fused.x is None and module.gate_proj.fused.shared  # (read by both, dropped)


def test_greedy_tokens_mostly_agree_with_the_float_model(isas):
    """Teacher-forced top-1 agreement with the float model over a few prompts (not asserted to be 100%)."""
    model = _tiny_llama()
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(input_ids=ids).logits.argmax(-1)
        quantize_linears(model, "q8_0")
        got = model(input_ids=ids).logits.argmax(-1)
    assert (got == want).float().mean() >= 0.9


def test_the_lm_head_can_have_its_own_format(isas):
    model = _tiny_llama()
    quantize_linears(model, "q4_1", head_fmt="q8_0")
    assert model.lm_head.fmt == "q8_0" and model.model.layers[0].mlp.up_proj.fmt == "q4_1"
    assert model.model.layers[0].self_attn.q_proj.int8_base.fmt == "q4_1"
    with pytest.raises(ValueError, match="fmt must be one of"):
        quantize_linears(_tiny_llama(), "q4_1", head_fmt="q6_k")


def test_quantize_linears_leaves_layers_it_cannot_block(isas):
    model = torch.nn.Sequential(torch.nn.Linear(64, 40), torch.nn.Linear(40, 8))
    assert quantize_linears(model, "q4_1") == 1
    assert isinstance(model[0], QuantLinear) and type(model[1]) is torch.nn.Linear


def test_merging_uses_the_float_weight_not_the_quantized_copy(isas):
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, target_modules=["0"]))
    randomize(model, 1, std=0.3)
    quantize_linears(model, "q4_1")
    x = torch.randn(5, 64)
    with torch.no_grad():
        layer = model[0]
        torch.testing.assert_close(model(x), layer.int8_base(x) + layer.lora_forward(x, "default"), rtol=1e-5, atol=1e-5)
        lorakit.merge(model)
        torch.testing.assert_close(model(x), F.linear(x, layer.weight, layer.bias))
