"""Mixed-adapter batches: ``adapter_per_row`` against running each row alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from helpers import MODEL_TOL, TOL, tiny_bert, tiny_gpt2
from lorakit import LoraConfig
from lorakit.layers import LoraLayer

TARGETS = (["query", "value"], ["query", "key", "value", "dense"], ["value"])


def bert_with_adapters(n: int):
    """Tiny BERT with ``n`` adapters of ranks 1..7, different targets and alphas, a
    classifier copy each, and random (non-zero) factors."""
    model = tiny_bert()
    names = [f"a{i}" for i in range(n)]
    for i, name in enumerate(names):
        cfg = LoraConfig(r=1 + (2 * i) % 7, alpha=1 + i, target_modules=TARGETS[i % 3], modules_to_save=["classifier"])
        lorakit.add_lora(model, cfg, adapter=name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in lorakit.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for name in names:
            for p in model.classifier.copies[name].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval(), names


def batch(rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (rows, 9), generator=g)
    mask = torch.ones_like(ids)
    for i in range(rows):
        mask[i, 3 + i % 6:] = 0  # different lengths: padding must stay per row
    return {"input_ids": ids, "attention_mask": mask}


def row_alone(model, inputs: dict, i: int, name: str | None) -> torch.Tensor:
    row = {k: v[i : i + 1] for k, v in inputs.items()}
    if name is None:
        with lorakit.disable_adapters(model):
            return model(**row).logits
    lorakit.set_adapter(model, name)
    return model(**row).logits


@pytest.mark.parametrize("n", [1, 3, 17])
def test_mixed_batch_equals_each_row_alone(n):
    model, names = bert_with_adapters(n)
    rows = [names[i % n] if i % 5 != 4 else None for i in range(max(2 * n, 6))]
    inputs = batch(len(rows))
    with torch.no_grad(), lorakit.adapter_per_row(model, rows):
        mixed = model(**inputs).logits
    with torch.no_grad():
        expected = torch.cat([row_alone(model, inputs, i, name) for i, name in enumerate(rows)])
    torch.testing.assert_close(mixed, expected, **MODEL_TOL)
    assert all(layer.rows is None for _, layer in lorakit.lora_layers(model))  # the block cleans up


def test_gradients_equal_the_per_adapter_reference_and_skip_unused_adapters():
    model, names = bert_with_adapters(4)
    rows = ["a0", "a2", None, "a0", "a2", "a2"]  # a1 and a3 unused
    inputs = batch(len(rows))
    weights = torch.randn(len(rows), 2, generator=torch.Generator().manual_seed(3))

    lorakit.mark_trainable(model, names)
    with lorakit.adapter_per_row(model, rows):
        (model(**inputs).logits * weights).sum().backward()
    mixed = {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    for i, name in enumerate(rows):
        out = row_alone(model, inputs, i, name)
        lorakit.mark_trainable(model, names)  # set_adapter leaves only one trainable
        if out.requires_grad:  # rows of the base model touch no trainable parameter
            (out * weights[i]).sum().backward()
    for key, p in model.named_parameters():
        if p.grad is None:
            assert mixed[key] is None, key
        else:
            torch.testing.assert_close(mixed[key], p.grad, **MODEL_TOL, msg=key)
    used = [k for k, g in mixed.items() if g is not None]
    assert any(".a0" in k for k in used) and any(".a2" in k for k in used)
    assert not any(".a1" in k or ".a3" in k for k in used)


def test_batched_layer_equals_the_reference_loop_on_fused_gpt2_projection():
    model = tiny_gpt2()
    lorakit.add_lora(model, LoraConfig(r=2, target_modules=["c_attn"], enable_lora={"c_attn": (True, False, True)}), "s")
    lorakit.add_lora(model, LoraConfig(r=5, alpha=3, target_modules=["c_attn", "c_fc"]), "t")
    with torch.no_grad():
        for _, p in lorakit.lora_parameters(model):
            p.normal_()
    layer = model.transformer.h[0].attn.c_attn
    x = torch.randn(5, 4, 32)
    names, slot = ("s", "t"), torch.tensor([0, 1, 2, 1, 0])
    out = layer.base_forward(x, layer.weight)
    torch.testing.assert_close(layer.add_rows(out, x, names, slot), LoraLayer.add_rows(layer, out, x, names, slot),
                               **TOL[torch.float32])
    torch.testing.assert_close(layer.add_rows(out, x, names, slot)[2], out[2])  # slot 2: no adapter


def test_stacked_factors_follow_the_sum_of_the_ranks():
    """One r=64 adapter beside twelve r=2 ones: without autograd the layer stacks every
    adapter's factors, sum(r) x (in + out) numbers (not 13 x 64 x (in + out)), and each
    row still equals the per-adapter reference, with and without the large one in the batch."""
    from lorakit.layers import LoraLinear, RowPlan

    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(24, 16)).eval()
    ranks = [64] + [2] * 12
    for i, r in enumerate(ranks):
        layer.add_adapter(f"a{i}", LoraConfig(r=r, alpha=r + i))
    with torch.no_grad():
        for B in layer.lora_B.values():
            B.normal_()
    x = torch.randn(6, 3, 24)
    for rows in (["a0", "a3", None, "a12", "a0", "a5"], ["a1", "a2", None, "a12", "a7", "a5"]):
        names, slot = RowPlan(rows).for_layer(layer.adapters, x, every=True)
        with torch.no_grad():
            out = layer.base_forward(x, layer.weight)
            mixed = layer.add_rows(out, x, names, slot)
            torch.testing.assert_close(mixed, LoraLayer.add_rows(layer, out, x, names, slot), **TOL[torch.float32])
        assert not torch.allclose(mixed[[0, 1, 3, 4, 5]], out[[0, 1, 3, 4, 5]]) and torch.equal(mixed[2], out[2])
        assert _stacked_numbers(layer._stacked) == sum(ranks) * (24 + 16)


def test_stacked_factors_follow_in_place_changes_of_the_adapters_a_batch_uses():
    """The stacks are kept between batches and only the factors a batch reads are checked for
    changes: an adapter changed in place while unused is restacked when a batch next uses it."""
    model, names = bert_with_adapters(3)
    inputs = batch(2)

    def mixed(rows):
        with torch.no_grad(), lorakit.adapter_per_row(model, rows):
            return model(**inputs).logits

    def alone(rows):
        with torch.no_grad():
            return torch.cat([row_alone(model, inputs, i, name) for i, name in enumerate(rows)])

    before = mixed(["a0", "a0"])
    value = model.bert.encoder.layer[0].attention.self.value  # every adapter targets it (TARGETS)
    with torch.no_grad():
        value.lora_B["a2"].mul_(3)  # a2, unused by the next batch
    torch.testing.assert_close(mixed(["a0", "a0"]), before)
    torch.testing.assert_close(mixed(["a2", "a0"]), alone(["a2", "a0"]), **MODEL_TOL)
    with torch.no_grad():
        value.lora_A["a0"].mul_(-2)  # a0, used by the next batch
    changed = mixed(["a2", "a0"])
    torch.testing.assert_close(changed, alone(["a2", "a0"]), **MODEL_TOL)
    assert not torch.allclose(changed[1], before[1])


def test_a_caller_that_never_changes_factors_in_place_skips_the_check_and_sees_adds_and_removes():
    """check_factors=False (a server): the stacks are not checked for in-place changes, so such a
    change is not seen (the contract the caller takes on); adding or removing an adapter still is."""
    model, names = bert_with_adapters(2)
    inputs = batch(2)

    def mixed(rows):
        with torch.no_grad(), lorakit.adapter_per_row(model, rows, check_factors=False):
            return model(**inputs).logits

    before = mixed(["a0", "a1"])
    value = model.bert.encoder.layer[0].attention.self.value
    with torch.no_grad():
        value.lora_B["a0"].mul_(3)
    torch.testing.assert_close(mixed(["a0", "a1"]), before)  # stale, as promised
    lorakit.add_lora(model, LoraConfig(r=2, target_modules=["value"]), "new")
    with torch.no_grad():
        for _, p in lorakit.lora_parameters(model, "new"):
            p.normal_()
        expected = torch.cat([row_alone(model, inputs, 0, "a0"), row_alone(model, inputs, 1, "new")])
    torch.testing.assert_close(mixed(["a0", "new"]), expected, **MODEL_TOL)  # restacked: a0's change is in
    lorakit.set_adapter(model, "a0")
    lorakit.delete_adapter(model, "new")
    with pytest.raises(ValueError, match="unknown adapter"):
        mixed(["new", "a0"])


def _stacked_numbers(stacks) -> int:
    """Numbers in the 3-D tensors (the stacked ``A`` and ``B``) of a nest of tuples and lists."""
    if isinstance(stacks, torch.Tensor):
        return stacks.numel() if stacks.dim() == 3 else 0
    return sum(_stacked_numbers(s) for s in stacks)


def test_each_row_gets_its_own_adapters_dropout():
    model = tiny_bert()
    lorakit.add_lora(model, LoraConfig(r=2, dropout=0.0), "keep")
    lorakit.add_lora(model, LoraConfig(r=2, dropout=0.5), "drop")
    with torch.no_grad():
        for _, p in lorakit.lora_parameters(model):
            p.normal_()
    layer = model.bert.encoder.layer[0].attention.self.query
    layer.train()
    x = torch.randn(4, 3, 32)
    names, slot = ("keep", "drop"), torch.tensor([0, 1, 0, 1])
    out = layer.base_forward(x, layer.weight)
    mixed = layer.add_rows(out, x, names, slot)
    layer.eval()
    clean = layer.add_rows(out, x, names, slot)
    torch.testing.assert_close(mixed[slot == 0], clean[slot == 0], **TOL[torch.float32])  # p = 0: no noise
    assert not torch.allclose(mixed[slot == 1], clean[slot == 1])  # p = 0.5: dropped inputs


def test_heads_of_different_widths_are_zero_padded():
    model, names = bert_with_adapters(2)
    model.classifier.copies["a1"] = nn.Linear(32, 3)
    inputs = batch(3)
    with torch.no_grad(), lorakit.adapter_per_row(model, ["a0", "a1", "a0"]):
        logits = model(**inputs).logits
    assert logits.shape == (3, 3)
    assert torch.equal(logits[[0, 2], 2], torch.zeros(2))
    with torch.no_grad():
        torch.testing.assert_close(logits[1:2], row_alone(model, inputs, 1, "a1"), **MODEL_TOL)


def test_bad_input_is_refused_with_a_clear_message():
    model, _ = bert_with_adapters(2)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['zz'\]; the model has \['a0', 'a1'\]"):
        with lorakit.adapter_per_row(model, ["a0", "zz"]):
            pass
    with pytest.raises(ValueError, match="given 2 adapter names for a batch of 3 rows"):
        with lorakit.adapter_per_row(model, ["a0", "a1"]):
            model(**batch(3))
    lorakit.merge(model)
    with pytest.raises(ValueError, match="cannot use per-row adapters while adapters are merged"):
        with lorakit.adapter_per_row(model, ["a0"]):
            pass


def test_blocks_nest():
    model, _ = bert_with_adapters(2)
    inputs = batch(2)
    with torch.no_grad(), lorakit.adapter_per_row(model, ["a0", "a1"]):
        outer = model(**inputs).logits
        with lorakit.adapter_per_row(model, ["a1", "a1"]):
            inner = model(**inputs).logits
        torch.testing.assert_close(model(**inputs).logits, outer)  # the outer plan is back
    torch.testing.assert_close(inner[1], outer[1])
    assert not torch.allclose(inner[0], outer[0])


@pytest.mark.parametrize("grad", [False, True])
def test_rows_that_share_one_adapter_get_it_on_the_whole_batch(grad):
    """A batch whose rows all use one adapter gets an int slot from RowPlan (nothing to gather:
    a single stream decoding), and add_rows with it equals the reference on a tensor of that
    slot: plain, sliced (q|v of GPT-2's fused c_attn) and DoRA adapters, and no adapter at all;
    saved modules (heads) run the one module."""
    from helpers import randomize
    from lorakit.layers import RowPlan

    model = tiny_gpt2()
    lorakit.add_lora(model, LoraConfig(r=2, target_modules=["c_attn"], enable_lora={"c_attn": (True, False, True)}), "s")
    lorakit.add_lora(model, LoraConfig(r=3, alpha=5, target_modules=["c_attn"]), "t")
    lorakit.add_lora(model, LoraConfig(r=2, target_modules=["c_attn"], use_dora=True), "d")
    randomize(model, std=0.3)
    layer = model.transformer.h[0].attn.c_attn
    x = torch.randn(4, 3, 32)
    for name in ("s", "t", "d", None):
        names, slot = RowPlan([name] * 4).for_layer(layer.adapters, x, every=True)
        assert slot == (names.index(name) if name else len(names))
        with torch.set_grad_enabled(grad):
            out = layer.base_forward(x, layer.weight)
            got = layer.add_rows(out, x, names, slot)
            want = LoraLayer.add_rows(layer, out, x, names, torch.full((4,), slot))
        torch.testing.assert_close(got, want, **TOL[torch.float32])
        assert torch.equal(got, out) if name is None else not torch.allclose(got, out)
    model, _ = bert_with_adapters(2)  # saved heads: the one module on the whole batch
    inputs = batch(3)
    for name in ("a1", None):
        with torch.no_grad(), lorakit.adapter_per_row(model, [name] * 3):
            logits = model(**inputs).logits
        with torch.no_grad():
            torch.testing.assert_close(logits, torch.cat([row_alone(model, inputs, i, name) for i in range(3)]),
                                       **MODEL_TOL)


def test_per_row_adapters_walk_the_model_once_and_follow_lorakits_changes(monkeypatch):
    """adapter_per_row remembers the model's LoRA layers (a decode step calls it every token);
    adding adapters on new layers, deleting and merging are seen at once."""
    model = tiny_bert()
    lorakit.add_lora(model, LoraConfig(r=2, target_modules=["query"]), "a")
    inputs = batch(2)
    with torch.no_grad(), lorakit.adapter_per_row(model, ["a", None]):
        model(**inputs)
    walks = []
    walk = model.named_modules
    monkeypatch.setattr(model, "named_modules", lambda *a, **k: walks.append(1) or walk(*a, **k))
    with torch.no_grad(), lorakit.adapter_per_row(model, ["a", None]):
        model(**inputs)
    assert walks == []

    lorakit.add_lora(model, LoraConfig(r=2, target_modules=["value"]), "b")  # new LoRA layers
    with torch.no_grad():
        for _, p in lorakit.lora_parameters(model):
            p.normal_()
        with lorakit.adapter_per_row(model, ["b", None]):
            mixed = model(**inputs).logits
        b_alone, base_alone = row_alone(model, inputs, 0, "b"), row_alone(model, inputs, 1, None)
    torch.testing.assert_close(mixed[:1], b_alone, **MODEL_TOL)
    torch.testing.assert_close(mixed[1:], base_alone, **MODEL_TOL)
    assert not torch.allclose(b_alone, base_alone)

    lorakit.set_adapter(model, "b")
    lorakit.delete_adapter(model, "a")  # the query layers become plain again
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['a'\]; the model has \['b'\]"):
        with lorakit.adapter_per_row(model, ["a", "b"]):
            pass
    lorakit.merge(model)
    with pytest.raises(ValueError, match="cannot use per-row adapters while adapters are merged"):
        with lorakit.adapter_per_row(model, ["b", None]):
            pass
