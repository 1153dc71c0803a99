"""DoRA (lorakit.variants) against independently written formulas, and LoRA+'s parameter groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from helpers import MODEL_TOL, TOL, clone, conv_net, ids, output, tiny_bert, tiny_gpt2
from lorakit import LoraConfig, variants
from lorakit.layers import LoraConv, LoraEmbedding, LoraLinear


def dora_randomize(model: nn.Module, seed: int = 2) -> None:
    """Random A and B, and magnitudes 0.7x to 1.3x the norms they start at: a non-trivial DoRA adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lorakit.lora_parameters(model):
            if ".lora_magnitude_vector." in name:
                p.mul_(0.7 + 0.6 * torch.rand(p.shape, generator=g, dtype=p.dtype))
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def expected_weight(W0: torch.Tensor, delta: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The paper's W' = m (W0 + ΔW) / ||W0 + ΔW||_c, norms over all but the first axis (as ``(out, ...)``)."""
    V = W0 + delta
    norms = V.flatten(1).norm(dim=1).view(-1, *[1] * (V.dim() - 1))
    return m.reshape(-1).view_as(norms) * V / norms


def adapted(layer_type: str, dtype=torch.float64):
    """A single DoRA layer of each kind, with its plain module's forward for the expected output."""
    torch.manual_seed(0)
    if layer_type == "linear":
        base, x = nn.Linear(12, 10), torch.randn(3, 5, 12)
    elif layer_type == "conv1d_gpt2":
        from transformers.pytorch_utils import Conv1D

        base, x = Conv1D(10, 12), torch.randn(3, 5, 12)
        nn.init.normal_(base.weight, std=0.2)
        nn.init.normal_(base.bias, std=0.2)
    elif layer_type == "embedding":
        base, x = nn.Embedding(20, 6), torch.randint(0, 20, (3, 5))
    else:
        base, x = nn.Conv2d(3, 5, 3, padding=1), torch.randn(2, 3, 6, 6)
    base = base.to(dtype)
    x = x.to(dtype) if x.is_floating_point() else x
    model = lorakit.add_lora(nn.Sequential(base), LoraConfig(r=3, alpha=5, target_modules=["0"], use_dora=True))
    dora_randomize(model)
    return model, model[0], x


LAYERS = ("linear", "conv1d_gpt2", "embedding", "conv2d")


@pytest.mark.parametrize("layer_type", LAYERS)
def test_dora_layer_equals_the_papers_formula(layer_type):
    model, layer, x = adapted(layer_type)
    W0 = layer.weight.detach().clone()
    m = layer.lora_magnitude_vector["default"].detach()
    delta = layer.lora_delta("default")
    if layer_type == "conv1d_gpt2":  # weight stored (in, out): the norms are over the input axis
        expected_w = expected_weight(W0.T, delta.T, m).T
    elif layer_type == "embedding":  # PEFT's channels: the embedding's dimensions (columns)
        expected_w = expected_weight(W0.T, delta.T, m).T
    else:
        expected_w = expected_weight(W0, delta, m)
    plain = layer._plain(expected_w)
    torch.testing.assert_close(layer(x), plain(x), **TOL[torch.float64])
    assert not torch.allclose(layer(x), layer._plain(W0)(x))  # the adapter does something
    torch.testing.assert_close(layer.delta_weight("default"), expected_w - W0, **TOL[torch.float64])


@pytest.mark.parametrize("layer_type", LAYERS)
def test_the_fast_weight_norm_equals_the_direct_formula(layer_type):
    for dtype in (torch.float64, torch.float32):
        _, layer, _ = adapted(layer_type, dtype)
        fast, direct = variants.weight_norm(layer, "default"), variants.weight_norm_reference(layer, "default")
        rows = layer.weight_rows(layer.weight)
        by_hand = torch.stack([(rows[i].double() + layer.scaling("default") * (layer.dora_factors("default")[1][i].double()
                               @ layer.dora_factors("default")[0].double())).norm() for i in range(rows.shape[0])])
        torch.testing.assert_close(fast.double(), by_hand, **TOL[dtype])
        torch.testing.assert_close(direct.double(), by_hand, **TOL[dtype])


def test_the_cached_base_norms_follow_changes_of_the_base_weight():
    _, layer, x = adapted("linear")
    before = variants.weight_norm(layer, "default")
    with torch.no_grad():
        layer.weight.mul_(2.0)  # in place: the version counter moves
    after = variants.weight_norm(layer, "default")
    torch.testing.assert_close(after, variants.weight_norm_reference(layer, "default").double(), **TOL[torch.float64])
    assert not torch.allclose(before, after)


def test_the_magnitude_starts_at_the_norms_so_a_new_adapter_changes_nothing():
    base = tiny_bert()
    model = lorakit.add_lora(clone(base), LoraConfig(r=4, target_modules=["query", "value"], use_dora=True))
    torch.testing.assert_close(output(model, ids()), output(base, ids()), **MODEL_TOL)
    layer = model.bert.encoder.layer[0].attention.self.query
    torch.testing.assert_close(layer.lora_magnitude_vector["default"], layer.weight.norm(dim=1), **TOL[torch.float32])
    # init_lora_weights=False (B random): m = ||W0 + s B A||, still the identity at creation (PEFT's)
    random = lorakit.add_lora(clone(base), LoraConfig(r=4, target_modules=["query"], use_dora=True, init="random"))
    torch.testing.assert_close(output(random, ids()), output(base, ids()), **MODEL_TOL)


@pytest.mark.parametrize("make, targets", [(tiny_bert, ["query", "value", "word_embeddings"]),
                                           (tiny_gpt2, ["c_attn", "c_proj"]),
                                           (conv_net, ["conv1", "conv2", "seq", "head"])])
def test_merge_equals_unmerged_and_unmerge_restores_bit_for_bit(make, targets):
    model = lorakit.add_lora(make(), LoraConfig(r=4, alpha=8, target_modules=targets, use_dora=True))
    dora_randomize(model)
    x = torch.randn(2, 3, 8, 8) if make is conv_net else ids()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    unmerged = output(model, x)
    layers = dict(lorakit.lora_layers(model))
    deltas = {n: layer.delta_weight("default") for n, layer in layers.items()}
    lorakit.merge(model)
    for n, layer in layers.items():  # delta_weight is what merge added (one source of truth)
        torch.testing.assert_close(layer.weight - before[f"{n}.weight"], deltas[n].to(layer.weight.dtype),
                                   **TOL[torch.float32])
    merged_once = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    lorakit.merge(model)  # idempotent
    assert all(torch.equal(layers[n].weight, w) for n, w in merged_once.items())
    torch.testing.assert_close(output(model, x), unmerged, **MODEL_TOL)
    lorakit.unmerge(model)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())  # drift 0


def test_mixed_batch_with_a_dora_adapter_equals_each_row_alone():
    model = tiny_bert()
    lorakit.add_lora(model, LoraConfig(r=4, target_modules=["query", "value"], use_dora=True), "dora")
    lorakit.add_lora(model, LoraConfig(r=2, alpha=4, target_modules=["query", "value"]), "plain")
    lorakit.add_lora(model, LoraConfig(r=3, target_modules=["value"], use_dora=True, dropout=0.1), "dora2")
    dora_randomize(model)
    rows, x = ["dora", "plain", None, "dora2", "plain", "dora"], ids(6)
    for grad in (False, True):  # inference (stacks over every adapter) and training
        with torch.set_grad_enabled(grad), lorakit.adapter_per_row(model, rows):
            mixed = model(x).logits
        alone = []
        for i, name in enumerate(rows):
            if name is None:
                with lorakit.disable_adapters(model):
                    alone.append(output(model, x[i:i + 1]))
            else:
                lorakit.set_adapter(model, name)
                alone.append(output(model, x[i:i + 1]))
        torch.testing.assert_close(mixed.detach(), torch.cat(alone), **MODEL_TOL)


def test_several_active_adapters_add_their_updates_and_merge_to_the_same_function():
    """A DoRA adapter active with a plain one: each update is relative to W0 and they add up (lorakit's rule;
    PEFT rescales the earlier adapters' output instead: docs/PEFT.md), merged = unmerged."""
    _, layer, x = adapted("linear")
    layer.add_adapter("plain", LoraConfig(r=2, init="random"))
    layer.active = ("default", "plain")
    W = layer.weight + layer.delta_weight("default") + layer.delta_weight("plain")
    torch.testing.assert_close(layer(x), layer._plain(W)(x), **TOL[torch.float64])
    layer.merge()
    torch.testing.assert_close(layer(x), layer._plain(W)(x), **TOL[torch.float64])


def test_training_reaches_a_b_and_the_magnitude_and_the_norm_is_detached():
    model = lorakit.add_lora(tiny_bert().train(), LoraConfig(r=4, target_modules=["query", "value"], use_dora=True,
                                                            dropout=0.1))
    dora_randomize(model)
    model(ids()).logits.square().sum().backward()
    names = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for suffix in ("lora_A.default", "lora_B.default", "lora_magnitude_vector.default"):
        hits = [p for n, p in names.items() if n.endswith(suffix)]
        assert hits and all(p.grad is not None and p.grad.abs().sum() > 0 for p in hits), suffix
    # the magnitude's gradient with the norm treated as a constant (section 4.3): d/dm of m/c * (V x) is (V x)/c
    layer = LoraLinear(nn.Linear(4, 3).double())
    layer.add_adapter("a", LoraConfig(r=2, use_dora=True))
    layer.active = ("a",)
    with torch.no_grad():
        layer.lora_B["a"].normal_()
    x = torch.randn(5, 4, dtype=torch.float64)
    layer(x).sum().backward()
    V = layer.weight + layer.lora_delta("a")
    torch.testing.assert_close(layer.lora_magnitude_vector["a"].grad, (x @ V.T.detach()).sum(0) / V.norm(dim=1).detach())


def test_dora_adapters_cannot_be_combined():
    model = tiny_bert()
    lorakit.add_lora(model, LoraConfig(r=2, target_modules=["query"], use_dora=True), "a")
    lorakit.add_lora(model, LoraConfig(r=2, target_modules=["query"]), "b")
    with pytest.raises(ValueError, match=r"adapters \['a'\] are DoRA adapters \(use_dora\).*cannot be combined"):
        lorakit.add_weighted_adapter(model, {"a": 0.5, "b": 0.5}, "mix")


def test_layer_types_and_magnitude_shapes_follow_peft():
    for layer_type, cls, shape in (("linear", LoraLinear, (10,)), ("embedding", LoraEmbedding, (6,)),
                                   ("conv2d", LoraConv, (1, 5, 1, 1))):
        _, layer, _ = adapted(layer_type)
        assert isinstance(layer, cls) and layer.lora_magnitude_vector["default"].shape == shape


# ---- LoRA+ ---------------------------------------------------------------------------------------


def _canonical(name: str) -> str:
    """A parameter's name in lorakit's or PEFT's model, without what tells the two apart."""
    drop = {"base_model", "model", "default", "base_layer", "modules_to_save", "copies"}
    parts = [p for p in name.split(".") if p not in drop]
    if parts[-1] == "weight" and any(p.startswith("lora_") for p in parts[:-1]):
        parts = parts[:-1]
    return ".".join(p.replace("lora_embedding_", "lora_") for p in parts)


def test_loraplus_groups_equal_peft_create_loraplus_optimizer():
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    kw = dict(r=4, lora_alpha=8, target_modules=["query", "value", "word_embeddings"], modules_to_save=["classifier"],
              bias="lora_only", use_dora=True)
    theirs = peft.get_peft_model(tiny_bert(), peft.LoraConfig(**kw))
    ours = lorakit.add_lora(tiny_bert(), kw)
    options = dict(lr=1e-3, loraplus_lr_ratio=16.0, loraplus_weight_decay=0.01, loraplus_lr_embedding=1e-5)
    expected = create_loraplus_optimizer(theirs, torch.optim.AdamW, **options).param_groups
    got = lorakit.loraplus_param_groups(ours, lr=1e-3, ratio=16.0, weight_decay=0.01, lr_embedding=1e-5)
    names = [{id(p): n for n, p in m.named_parameters()} for m in (theirs, ours)]
    assert len(got) == len(expected) == 4
    for mine, peft_group in zip(got, expected):
        assert (mine["lr"], mine["weight_decay"]) == (peft_group["lr"], peft_group["weight_decay"])
        assert [_canonical(names[1][id(p)]) for p in mine["params"]] == \
               [_canonical(names[0][id(p)]) for p in peft_group["params"]]
    assert all(g["params"] for g in got)  # every group holds something: the comparison could fail
    with pytest.raises(ValueError, match=r"loraplus_param_groups: ratio must be a finite positive number, got ratio=0"):
        lorakit.loraplus_param_groups(ours, lr=1e-3, ratio=0)


def test_the_cached_base_norms_follow_a_weight_given_new_data_and_a_pickled_model_loads():
    import io

    _, layer, x = adapted("linear")
    variants.weight_norm(layer, "default")
    layer.weight.data = layer.weight.data * 3.0  # the same Parameter, new storage
    torch.testing.assert_close(variants.weight_norm(layer, "default"), variants.weight_norm_reference(layer, "default").double(),
                               **TOL[torch.float64])
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(again(x), layer(x), **TOL[torch.float64])
