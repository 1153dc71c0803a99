"""Section 7's measures on matrices with known answers, and the reports on saved adapters."""

import json

import pytest
import torch

import lorakit
from helpers import randomize, tiny_bert
from lorakit.analysis import adapter_factors, amplification_report, projection_norms, similarity_report, subspace_similarity
from lorakit.cli import main


def _rows(*columns: int, d: int = 8, scale=None) -> torch.Tensor:
    """A factor whose rows are e_c (times a decreasing scale, so the SVD order is known)."""
    a = torch.zeros(len(columns), d)
    for k, c in enumerate(columns):
        a[k, c] = (scale or [len(columns) - i for i in range(len(columns))])[k]
    return a


def test_identical_subspaces_give_one_orthogonal_give_zero():
    a = torch.randn(4, 16)
    mixed = torch.randn(4, 4) @ a  # the same row space, other singular vectors inside it
    assert torch.allclose(subspace_similarity(a, a), torch.ones(4, 4, dtype=torch.float64))
    assert subspace_similarity(a, mixed)[3, 3].item() == pytest.approx(1.0)
    assert torch.allclose(subspace_similarity(_rows(0, 1, 2), _rows(3, 4, 5, 6)), torch.zeros(3, 4, dtype=torch.float64))


def test_partial_overlap_and_different_ranks():
    phi = subspace_similarity(_rows(0, 1), _rows(0, 5, 6, 7))  # shares only its top direction
    assert phi.shape == (2, 4)
    assert phi[0, 0] == pytest.approx(1.0)  # top-1 of each: the same e0
    assert phi[1, 0] == pytest.approx(1.0)  # e0 lies in span(e0, e1), divided by min(2, 1)
    assert phi[1, 1] == pytest.approx(0.5)  # span(e0, e1) vs span(e0, e5): one of two directions
    assert phi[1, 3] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="act on different spaces"):
        subspace_similarity(torch.ones(2, 3), torch.ones(2, 4))


def test_planted_amplification():
    w = torch.diag(torch.tensor([10.0, 9, 8, 7, 0.4, 0.3, 0.2, 0.1]))
    w[4, 5] = 0.5  # what W holds in the direction ΔW will take
    delta = 3 * torch.outer(torch.eye(8)[4], torch.eye(8)[5])  # rank 1, ||ΔW|| = 3
    n = projection_norms(w, delta, r=1)
    assert n["delta_directions"] == pytest.approx(0.5)
    assert n["delta_norm"] == pytest.approx(3.0) and n["amplification"] == pytest.approx(6.0)
    assert n["w_directions"] == pytest.approx(10.0)  # W's top singular value
    assert n["random_directions"] < n["w_directions"] and n["w_norm"] == pytest.approx(torch.linalg.matrix_norm(w).item())


def test_reports_on_saved_adapters(tmp_path, capsys):
    model = lorakit.add_lora(tiny_bert(), lorakit.LoraConfig(r=4, alpha=8, target_modules=["query", "value"]))
    randomize(model)
    lorakit.save_adapter(model, tmp_path / "a")
    factors = adapter_factors(tmp_path / "a")
    assert list(factors)[:2] == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"]
    layer = model.bert.encoder.layer[0].attention.self.query
    a, b, scaling = factors["bert.encoder.layer.0.attention.self.query"]
    torch.testing.assert_close(a, layer.lora_A["default"].detach())
    torch.testing.assert_close((b @ a) * scaling, layer.delta_weight("default").detach())

    report = similarity_report(tmp_path / "a", tmp_path / "a", tmp_path / "sim")
    assert all(m["phi_top1"] == pytest.approx(1.0) for m in report["modules"].values())
    assert (tmp_path / "sim" / "similarity.png").stat().st_size > 0
    assert json.loads((tmp_path / "sim" / "similarity.json").read_text())["modules"].keys() == factors.keys()

    weights = {path: model.get_submodule(path).weight.detach() for path in factors}
    amp = amplification_report(tmp_path / "a", weights, tmp_path / "amp")["modules"]
    assert set(amp) == set(factors) and all(row["r"] == 4 and row["amplification"] > 0 for row in amp.values())

    other = lorakit.add_lora(tiny_bert(), lorakit.LoraConfig(r=2, target_modules=["key"]))
    lorakit.save_adapter(other, tmp_path / "b")
    with pytest.raises(ValueError, match="adapt no module in common"):
        similarity_report(tmp_path / "a", tmp_path / "b", tmp_path / "x")
    assert main(["analyze", "similarity", str(tmp_path / "a"), str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "no adapter_config.json in" in capsys.readouterr().err


def test_sweep_plans_placements_at_a_budget_or_over_ranks():
    from lorakit.sweep import plan

    assert plan(["q", "qv", "qkvo"], 8, None) == [("q", 8), ("qv", 4), ("qkvo", 2)]
    assert plan(["qv"], None, [1, 64]) == [("qv", 1), ("qv", 64)]
    with pytest.raises(ValueError, match="--budget 6 does not divide among the 4 weight types of 'qkvo'"):
        plan(["qkvo"], 6, None)
    with pytest.raises(ValueError, match="placement 'qx'"):
        plan(["qx"], 8, None)
    with pytest.raises(ValueError, match="exactly one of --budget"):
        plan(["q"], 8, [1])


def test_sweep_trains_each_placement_and_resumes(tiny_model, tmp_path, capsys):
    args = ["sweep", "--targets", "q,ko", "--budget", "2", "--task", "mrpc", "--model", tiny_model,
            "--out", str(tmp_path), "--epochs", "1", "--max-train-examples", "16", "--max-eval-examples", "16",
            "--max-length", "32", "--no-progress"]
    assert main(args) == 0
    table = json.loads((tmp_path / "sweep.json").read_text())
    assert [(r["placement"], r["r"], r["targets"]) for r in table["rows"]] == [
        ("q", 2, "query"), ("ko", 1, "key,attention.output.dense")]
    # equal budgets: q is 32x32, k and o too, so 2 x rank 1 matches 1 x rank 2 (plus the same head)
    assert table["rows"][0]["trainable_params"] == table["rows"][1]["trainable_params"]
    assert (tmp_path / "sweep.png").stat().st_size > 0 and (tmp_path / "ko-r1" / "seed0" / "adapter").is_dir()
    assert "| ko | 1 |" in capsys.readouterr().out
    # --resume reuses finished runs (their last checkpoint) instead of training them again
    assert main(args + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert out.count("resumed from") == 2 and "epoch 1:" not in out
    assert json.loads((tmp_path / "sweep.json").read_text()) == table
