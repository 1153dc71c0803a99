"""Each LoRA layer against an independently written formula, and merge/unmerge exactness."""

import pytest
import torch
from torch import nn

from helpers import TOL
from lorakit import LoraConfig
from lorakit.layers import LoraConv, LoraEmbedding, LoraLinear, lora_class_for


def _layer(base, r=3, alpha=6.0, **kw):
    layer = lora_class_for(base)(base)
    layer.add_adapter("a", LoraConfig(r=r, alpha=alpha, **kw))
    layer.active = ("a",)
    return layer


def _randomize_B(layer, name="a"):
    torch.manual_seed(5)
    with torch.no_grad():
        layer.lora_B[name].normal_()
        layer.lora_A[name].normal_()


def test_hand_computed_example():
    base = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.eye(2))
    layer = _layer(base, r=1, alpha=2.0)  # scaling 2
    with torch.no_grad():
        layer.lora_A["a"].copy_(torch.tensor([[1.0, 2.0]]))
        layer.lora_B["a"].copy_(torch.tensor([[1.0], [0.0]]))
    # h = I x + 2 * B A x = [1, 1] + 2 * [3, 0]
    assert layer(torch.tensor([[1.0, 1.0]])).tolist() == [[7.0, 1.0]]
    assert layer.delta_weight("a").tolist() == [[2.0, 4.0], [0.0, 0.0]]


def test_linear_matches_formula_and_fresh_adapter_changes_nothing():
    base = nn.Linear(5, 4)
    x = torch.randn(2, 3, 5)
    expected_base = base(x)
    layer = _layer(base)
    torch.testing.assert_close(layer(x), expected_base, **TOL[torch.float32])
    _randomize_B(layer)
    A, B = layer.lora_A["a"], layer.lora_B["a"]
    expected = x @ base.weight.T + base.bias + 2.0 * (x @ A.T @ B.T)
    out = layer(x)
    assert not torch.allclose(out, expected_base)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    torch.testing.assert_close(layer.delta_weight("a"), 2.0 * B @ A, **TOL[torch.float32])


def test_gpt2_conv1d_is_linear_with_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(4, 5)  # nf=out=4, nx=in=5: weight (5, 4)
    lin = nn.Linear(5, 4)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    lc, ll = _layer(conv), _layer(lin)
    assert isinstance(lc, LoraLinear) and lc.fan_in_fan_out and (lc.in_features, lc.out_features) == (5, 4)
    _randomize_B(lc)
    _randomize_B(ll)
    x = torch.randn(2, 3, 5)
    torch.testing.assert_close(lc(x), ll(x), **TOL[torch.float32])
    torch.testing.assert_close(lc.delta_weight("a"), ll.delta_weight("a").T, **TOL[torch.float32])


def test_sliced_adapter_updates_only_enabled_slices():
    base = nn.Linear(5, 6)  # three slices of 2 outputs: q | k | v
    layer = lora_class_for(base)(base)
    layer.add_adapter("a", LoraConfig(r=2, alpha=2.0), (True, False, True))
    layer.active = ("a",)
    assert layer.lora_A["a"].shape == (4, 5) and layer.lora_B["a"].shape == (4, 2)
    _randomize_B(layer)
    A, B = layer.lora_A["a"], layer.lora_B["a"]
    delta = layer.delta_weight("a")
    torch.testing.assert_close(delta[0:2], B[0:2] @ A[0:2], **TOL[torch.float32])
    assert torch.equal(delta[2:4], torch.zeros(2, 5))
    torch.testing.assert_close(delta[4:6], B[2:4] @ A[2:4], **TOL[torch.float32])
    x = torch.randn(3, 5)
    torch.testing.assert_close(layer(x), base(x) + x @ delta.T, **TOL[torch.float32])


def test_slices_must_divide_the_output():
    layer = lora_class_for(nn.Linear(5, 7))(nn.Linear(5, 7))
    with pytest.raises(ValueError, match=r"splits 7 output features into 3 slices"):
        layer.add_adapter("a", LoraConfig(r=2), (True, False, True))


def test_embedding_matches_formula():
    base = nn.Embedding(10, 4, padding_idx=0)
    layer = _layer(base)
    assert isinstance(layer, LoraEmbedding)
    assert torch.equal(layer.lora_A["a"], torch.zeros(3, 10))  # A = 0, B Gaussian for embeddings
    _randomize_B(layer)
    ids = torch.tensor([[0, 3, 9], [1, 1, 2]])
    table = base.weight + 2.0 * (layer.lora_B["a"] @ layer.lora_A["a"]).T
    torch.testing.assert_close(layer(ids), table[ids], **TOL[torch.float32])


@pytest.mark.parametrize("base", [nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1), nn.Conv1d(3, 4, 3, padding=2, dilation=2),
                                  nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")])
def test_conv_matches_conv_with_updated_weight(base):
    layer = _layer(base)
    assert isinstance(layer, LoraConv)
    _randomize_B(layer)
    x = torch.randn(2, 3, *([9, 9] if isinstance(base, nn.Conv2d) else [11]))
    delta = layer.delta_weight("a")
    torch.testing.assert_close(layer(x), base._conv_forward(x, base.weight + delta, base.bias), **TOL[torch.float32])


def test_grouped_conv_is_not_adaptable():
    assert lora_class_for(nn.Conv2d(4, 4, 3, groups=2)) is None


@pytest.mark.parametrize("init, check", [("kaiming", lambda A: A.abs().max() <= 1 / 5**0.5), ("gaussian", lambda A: abs(A.std() - 1 / 4) < 0.02)])
def test_init_B_is_zero_and_A_follows_init(init, check):
    torch.manual_seed(0)
    layer = _layer(nn.Linear(5, 800), r=4, init=init) if init == "kaiming" else _layer(nn.Linear(5000, 8), r=4, init=init)
    assert torch.equal(layer.lora_B["a"], torch.zeros_like(layer.lora_B["a"]))
    assert check(layer.lora_A["a"])


def test_dropout_applies_to_lora_branch_in_training_only():
    base = nn.Linear(64, 64)
    layer = _layer(base, dropout=0.5)
    _randomize_B(layer)
    x = torch.randn(4, 64)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))


def _all_layers():
    from transformers.pytorch_utils import Conv1D

    return [nn.Linear(6, 5), Conv1D(5, 6), nn.Embedding(7, 6), nn.Conv2d(3, 5, 3), nn.Conv1d(3, 5, 2)]


def _input(layer):
    if isinstance(layer, LoraEmbedding):
        return torch.tensor([[1, 2, 6]])
    if isinstance(layer, LoraConv):
        return torch.randn(2, 3, *([6, 6] if layer.weight.dim() == 4 else [6]))
    return torch.randn(2, 6)


@pytest.mark.parametrize("base", _all_layers(), ids=lambda m: type(m).__name__)
def test_merge_equals_unmerged_and_is_idempotent(base):
    layer = _layer(base)
    _randomize_B(layer)
    x = _input(layer)
    unmerged = layer(x)
    layer.merge()
    once = layer.weight.clone()
    layer.merge()
    assert torch.equal(layer.weight, once)
    torch.testing.assert_close(layer(x), unmerged, **TOL[torch.float32])
    layer.unmerge()
    torch.testing.assert_close(layer(x), unmerged, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unmerge_is_bit_exact_after_1000_cycles(dtype):
    base = nn.Linear(32, 32).to(dtype)
    original = base.weight.detach().clone()
    layer = _layer(base)
    _randomize_B(layer)
    for _ in range(1000):
        layer.merge()
        layer.unmerge()
    assert torch.equal(layer.weight, original)
    layer.merge()
    assert not torch.equal(layer.weight, original)
    expected = (original.float() + layer.delta_weight("a")).to(dtype)  # summed in fp32, rounded once
    assert torch.equal(layer.weight, expected)


def test_unwrap_gives_back_the_same_parameters():
    base = nn.Linear(3, 2)
    layer = _layer(base)
    plain = layer.unwrap()
    assert type(plain) is nn.Linear and plain.weight is base.weight and plain.bias is base.bias
    assert plain.in_features == 3 and not plain._modules


def test_delta_weight_is_float32_even_for_bf16_factors():
    layer = _layer(nn.Linear(16, 16))
    _randomize_B(layer)
    original = layer.weight.detach().to(torch.bfloat16)
    layer.to(torch.bfloat16)  # factors too
    assert layer.delta_weight("a").dtype == torch.float32
    layer.merge()
    A, B = layer.lora_A["a"].float(), layer.lora_B["a"].float()
    assert torch.equal(layer.weight, (original.float() + 2.0 * B @ A).to(torch.bfloat16))
