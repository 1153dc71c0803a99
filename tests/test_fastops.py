"""Fast dropout against its reference (torch's dropout) and the laws it must keep."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import TOL, ids, tiny_bert
from lorakit import fastops

N = 1 << 20  # 1M elements: the standard error of a keep rate is below 5e-4


@pytest.mark.parametrize("p", [0.1, 0.5, 0.01, 0.9])
def test_keep_rate_and_scaling_are_right(p):
    torch.manual_seed(0)
    y = fastops.dropout(torch.ones(N), p)
    dropped = (y == 0).double().mean().item()
    sigma = (p * (1 - p) / N) ** 0.5
    assert abs(dropped - p) < 5 * sigma + 1e-5
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - fastops.drop_probability(p))))
    assert abs(y.double().mean().item() - 1.0) < 5 * sigma / (1 - p) + 1e-5  # unbiased
    assert abs(fastops.drop_probability(p) - p) <= 2**-17


def test_same_statistics_as_the_reference():
    torch.manual_seed(0)
    x = torch.randn(N)
    fast, ref = fastops.dropout(x, 0.1), F.dropout(x, 0.1, True)
    assert abs((fast == 0).double().mean() - (ref == 0).double().mean()) < 2e-3
    assert abs(fast.double().mean() - ref.double().mean()) < 1e-2
    assert abs(fast.double().std() - ref.double().std()) < 1e-2


def _corr(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return ((a * b).mean() / (a.std() * b.std())).item()


def test_elements_and_calls_are_independent_and_seeded():
    torch.manual_seed(0)
    m = fastops.keep_mask((N,), 0.3)
    lanes = m.view(-1, 4)  # the four 16-bit lanes of each 64-bit draw
    bound = 5 / (N / 4) ** 0.5
    for i in range(4):
        for j in range(i + 1, 4):
            assert abs(_corr(lanes[:, i], lanes[:, j])) < bound
    assert abs(_corr(m[:-1], m[1:])) < 5 / N**0.5
    second = fastops.keep_mask((N,), 0.3)
    assert abs(_corr(m, second)) < 5 / N**0.5
    torch.manual_seed(0)
    assert torch.equal(fastops.keep_mask((N,), 0.3), m)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(fastops.keep_mask((1000,), 0.3, generator=g), fastops.keep_mask((1000,), 0.3, generator=torch.Generator().manual_seed(7)))


def test_gradient_is_mask_times_scale():
    torch.manual_seed(0)
    x = torch.randn(64, 33, requires_grad=True)
    y = fastops.dropout(x, 0.25)
    g = torch.randn_like(y)
    y.backward(g)
    keep = y != 0
    torch.testing.assert_close(x.grad, g * keep / (1 - 0.25), **TOL[torch.float32])
    torch.testing.assert_close(y, x.detach() * keep / (1 - 0.25), **TOL[torch.float32])


def test_identity_when_off_and_module_matches_nn_dropout():
    x = torch.randn(10, 10)
    assert fastops.dropout(x, 0.0) is x and fastops.dropout(x, 0.5, training=False) is x
    layer = fastops.FastDropout(0.2)
    assert isinstance(layer, nn.Dropout) and layer.p == 0.2
    layer.eval()
    assert layer(x) is x
    assert torch.equal(fastops.dropout(x, 1.0), torch.zeros_like(x))


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "causal"])
def test_math_attention_equals_sdpa_without_dropout(mask_kind):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, requires_grad=True) for _ in range(3))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 5, 5) > 0.3
        mask[..., 0] = True
    elif mask_kind == "additive":
        mask = torch.randn(2, 1, 5, 5)
    causal = mask_kind == "causal"
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    ours = fastops.math_attention(q, k, v, mask, 0.0, is_causal=causal)
    torch.testing.assert_close(ours, expected, **TOL[torch.float32])
    g = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(expected, (q, k, v), g)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_use_fast_dropout_on_a_transformers_model(monkeypatch):
    model = tiny_bert()
    x = ids()
    pad = torch.ones_like(x)
    pad[0, 4:] = 0  # a padded row: the attention mask must reach both attention paths
    before = model(x, attention_mask=pad).logits
    swapped = fastops.use_fast_dropout(model)
    assert swapped == sum(isinstance(m, fastops.FastDropout) for m in model.modules()) > 0
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert model.config._attn_implementation == fastops.ATTENTION_NAME
    torch.testing.assert_close(model(x, attention_mask=pad).logits, before, **TOL[torch.float32])  # eval: nothing dropped
    masks = []
    real = fastops.math_attention
    monkeypatch.setattr(fastops, "math_attention", lambda q, k, v, mask, *a, **kw: masks.append(mask) or real(q, k, v, mask, *a, **kw))
    model.train()
    torch.manual_seed(0)
    a = model(x, attention_mask=pad).logits
    torch.manual_seed(0)
    assert torch.equal(model(x, attention_mask=pad).logits, a)  # reproducible from the seed
    assert not torch.allclose(model(x, attention_mask=pad).logits, a)  # and different on the next call
    assert len(masks) == 3 * 2  # attention dropout went through the fast path in both layers
    assert all(m is not None and not m[0, ..., 4:].any() for m in masks)  # padded keys are masked out
    fastops.use_fast_dropout(model, enabled=False)
    assert not any(isinstance(m, fastops.FastDropout) for m in model.modules())
    assert model.config._attn_implementation == "sdpa"


def test_math_attention_with_dropout_equals_the_reference_with_the_same_mask():
    """Values and gradients for q, k and v (LoRA on W_q / W_k learns through the latter)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 1, 5, 5) > 0.3
    mask[..., 0] = True
    torch.manual_seed(1)
    ours = fastops.math_attention(q, k, v, mask, 0.25)
    torch.manual_seed(1)
    keep = fastops.keep_mask((2, 3, 5, 5), 0.25)
    scores = (q @ k.transpose(-1, -2) / 2).masked_fill(~mask, float("-inf"))
    expected = (scores.softmax(-1) * keep / 0.75) @ v
    torch.testing.assert_close(ours, expected, **TOL[torch.float32])
    g = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(expected, (q, k, v), g)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
