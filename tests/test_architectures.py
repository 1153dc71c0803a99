"""The architecture matrix: one tiny random model per family users fine-tune, each checked
against PEFT 0.21 (the oracle) for every usual target set:

- a fresh adapter changes nothing;
- same factors give the same logits as PEFT, both ways: lorakit saves -> PEFT loads, PEFT
  saves -> lorakit loads, and both adapt the same modules;
- merged = unmerged, and unmerge restores every tensor bit for bit (tied weights re-tied);
- mixed-adapter batches equal one adapter at a time.

Where lorakit refuses, the message is pinned. See docs/PEFT.md for the table of results.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lorakit
import zoo
from helpers import MODEL_TOL
from lorakit.architectures import PEFT_DEFAULT_TARGETS
from zoo import ARCHS, Arch

peft = pytest.importorskip("peft")

CASES = ("default", "attention", "all-linear", "embeddings", "head")


def _targets(arch: Arch, case: str) -> tuple[str, ...] | str | None:
    return {"default": None, "attention": arch.attention, "all-linear": "all-linear",
            "embeddings": (arch.attention[0], arch.embed), "head": (arch.attention[0], arch.head)}[case]


def _matrix() -> list:
    return [pytest.param(a, c, id=f"{a}-{c}") for a, arch in ARCHS.items() for c in CASES
            if not (c == "embeddings" and arch.embed is None) and not (c == "head" and arch.head is None)]


def _extra(arch: Arch) -> dict:
    """The classification head trains whole: PEFT's SEQ_CLS task, or modules_to_save for ViT."""
    return {"cls": dict(task_type="SEQ_CLS"), "image": dict(modules_to_save=["classifier"])}.get(arch.kind, {})


def _lorakit_config(arch: Arch, case: str, r: int = 4) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(r=r, alpha=8, target_modules=_targets(arch, case), **_extra(arch))


def _attach(arch: Arch, case: str, seed: int = 2) -> tuple[nn.Module, nn.Module]:
    """(base, the base with a lorakit adapter whose every factor is random)."""
    base = zoo.base(arch)
    model = lorakit.add_lora(copy.deepcopy(base), _lorakit_config(arch, case))
    _randomize(model, seed)
    return base, model


def _randomize(model: nn.Module, seed: int, adapter: str | None = None) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lorakit.lora_parameters(model, adapter):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for m in model.modules():  # a trained head
            if isinstance(m, lorakit.layers.ModulesToSave) and (adapter or "default") in m.copies:
                for p in m.copies[adapter or "default"].parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _skip_refused(arch: Arch, case: str) -> None:
    if case in arch.refuse:
        with pytest.raises(ValueError, match=arch.refuse[case]):
            lorakit.add_lora(zoo.base(arch), _lorakit_config(arch, case))
        pytest.skip(f"lorakit refuses by name: {arch.refuse[case]}")


def _adapted(model: nn.Module) -> set[str]:
    """Names of the modules carrying LoRA factors (lorakit's or PEFT's), without PEFT's prefix."""
    names = {n.removeprefix("base_model.model.") for n, m in model.named_modules()
             if isinstance(m, lorakit.layers.LoraLayer) or hasattr(m, "lora_A") and len(m.lora_A)
             or hasattr(m, "lora_embedding_A") and len(m.lora_embedding_A)}
    return names


# ---- the matrix ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "case"), _matrix())
def test_a_fresh_adapter_changes_nothing(name, case):
    arch = ARCHS[name]
    _skip_refused(arch, case)
    base = zoo.base(arch)
    x = zoo.inputs(arch)
    model = lorakit.add_lora(copy.deepcopy(base), _lorakit_config(arch, case))
    torch.testing.assert_close(zoo.logits(model, x), zoo.logits(base, x), rtol=0, atol=0)


@pytest.mark.parametrize(("name", "case"), _matrix())
def test_lorakit_adapter_loads_in_peft_with_the_same_logits(name, case, tmp_path):
    arch = ARCHS[name]
    _skip_refused(arch, case)
    base, model = _attach(arch, case)
    x = zoo.inputs(arch)
    ours = zoo.logits(model, x)
    assert not torch.allclose(ours, zoo.logits(base, x), **MODEL_TOL)
    with lorakit.disable_adapters(model):
        assert torch.equal(zoo.logits(model, x), zoo.logits(base, x))
    lorakit.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert _adapted(theirs) == _adapted(model)
    torch.testing.assert_close(zoo.logits(theirs, x), ours, **MODEL_TOL)


@pytest.mark.parametrize(("name", "case"), _matrix())
def test_peft_adapter_loads_in_lorakit_with_the_same_logits(name, case, tmp_path):
    arch = ARCHS[name]
    _skip_refused(arch, case)
    base, x = zoo.base(arch), zoo.inputs(arch)
    targets = _targets(arch, case)
    # PEFT has no default for some families, and fails on Mixtral under transformers 5 (NoMatchingPeftModuleError):
    # give it what lorakit resolved
    if targets is None and (base.config.model_type not in PEFT_DEFAULT_TARGETS or name == "mixtral"):
        targets = lorakit.adapter_config(lorakit.add_lora(zoo.base(arch), _lorakit_config(arch, case)), "default").target_modules
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets, **_extra(arch),
                             fan_in_fan_out=name == "gpt2")
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    expected = zoo.logits(theirs, x)
    assert not torch.allclose(expected, zoo.logits(base, x), **MODEL_TOL)
    theirs.save_pretrained(tmp_path)
    ours = lorakit.load_adapter(copy.deepcopy(base), tmp_path).eval()
    assert _adapted(ours) == _adapted(theirs)
    torch.testing.assert_close(zoo.logits(ours, x), expected, **MODEL_TOL)


@pytest.mark.parametrize(("name", "case"), _matrix())
def test_merge_equals_unmerged_and_unmerge_restores_every_bit(name, case):
    arch = ARCHS[name]
    _skip_refused(arch, case)
    _, model = _attach(arch, case)
    x = zoo.inputs(arch)
    unmerged, before = zoo.logits(model, x), {k: v.clone() for k, v in model.state_dict().items()}
    tied = _tied_pairs(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorakit.merge(model)
    untied = [w for w in caught if "its own copy of a weight it shared with another module" in str(w.message)]
    assert bool(untied) == _touches(model, tied)  # said when, and only when, a tied weight was merged into
    torch.testing.assert_close(zoo.logits(model, x), unmerged, **MODEL_TOL)
    lorakit.unmerge(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert _tied_pairs(model) == tied  # re-tied
    assert torch.equal(zoo.logits(model, x), unmerged)


@pytest.mark.parametrize("name", ARCHS)
def test_mixed_adapter_batches_equal_one_adapter_at_a_time(name):
    arch = ARCHS[name]
    case = "embeddings" if arch.embed else "attention"
    model = lorakit.add_lora(zoo.base(arch), _lorakit_config(arch, case))
    lorakit.add_lora(model, _lorakit_config(arch, "attention", r=2), "second")
    _randomize(model, 2, "default")
    _randomize(model, 5, "second")
    x = zoo.inputs(arch)
    plan = ["default", "second", None, "default"]
    with lorakit.adapter_per_row(model, plan):
        mixed = zoo.logits(model, x)
    for i, adapter in enumerate(plan):
        row = {k: v[i:i + 1] for k, v in x.items()}
        if adapter is None:
            with lorakit.disable_adapters(model):
                alone = zoo.logits(model, row)
        else:
            lorakit.set_adapter(model, adapter)
            alone = zoo.logits(model, row)
        torch.testing.assert_close(mixed[i:i + 1], alone, **MODEL_TOL)


def _tied_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """The (first, other) names of every parameter that two modules share."""
    seen: dict[int, str] = {}
    pairs = []
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            pairs.append((seen[id(p)], n))
        seen.setdefault(id(p), n)
    return pairs


def _touches(model: nn.Module, tied: list[tuple[str, str]]) -> bool:
    """Whether a LoRA layer owns one of the tied weights."""
    names = {f"{n}.weight" for n, _ in lorakit.lora_layers(model)}
    return any(a in names or b in names for a, b in tied)
