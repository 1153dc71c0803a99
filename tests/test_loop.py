"""The loop's Trainer flags on tiny models: gradient accumulation, --max-steps, --eval-steps,
--save-steps with --save-total-limit, --logging-steps, and their CLI and config-file spellings."""

import json

import pytest
import torch

from helpers import GLUE
from lorakit import checkpoint, runfiles, train
from lorakit.training.loop import Plan

pytestmark = pytest.mark.skipif(not GLUE.is_dir(), reason="../shared/data/glue not present")


def _cfg(model, tmp_path, **kw):
    values = dict(model=model, data_dir=str(GLUE), out=str(tmp_path / "{task}"), epochs=2, batch_size=4, lr=1e-3,
                  max_length=32, max_train_examples=40, max_eval_examples=16, progress=False)
    return train.TrainConfig(**{**values, **kw})


def _trained(run) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint-2-0.pt", weights_only=True)["trainable"]


def _assert_same_weights(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        # summation order differs (micro-batches, padding widths): fp32 drift, amplified by Adam's normalisation
        torch.testing.assert_close(theirs[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_accumulated_micro_batches_equal_one_batch_n_times_larger(tiny_no_dropout, tmp_path, method):
    # 29 rows, 8 per optimizer step: the last step of an epoch has 5 rows, micro-batches of 2, 2 and 1 (a mean of
    # the micro-batches' means would weigh that 1 row twice)
    common = dict(task="mrpc", method=method, lora_dropout=0.0, precision="fp32", max_train_examples=29,
                  lr=1e-3 if method == "lora" else 1e-4)
    big = train.train(_cfg(tiny_no_dropout, tmp_path / "big", batch_size=8, **common), seed=0)
    small = train.train(_cfg(tiny_no_dropout, tmp_path / "small", batch_size=2, gradient_accumulation_steps=4, **common),
                        seed=0)
    ours, theirs = _trained(tmp_path / "big" / "mrpc" / "seed0"), _trained(tmp_path / "small" / "mrpc" / "seed0")
    _assert_same_weights(ours, theirs)
    before = torch.load(tmp_path / "big" / "mrpc" / "seed0" / "checkpoint-1-0.pt", weights_only=True)["trainable"]
    assert not all(torch.equal(before[k], t) for k, t in ours.items())  # the second epoch trained
    steps = [torch.load(r / "mrpc" / "seed0" / "checkpoint-2-0.pt", weights_only=True)["scheduler"]["last_epoch"]
             for r in (tmp_path / "big", tmp_path / "small")]
    assert steps == [8, 8]  # 4 optimizer steps per epoch in both
    for a, b in zip(big["epochs"], small["epochs"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_accumulation_normalises_a_causal_lm_by_the_tokens_of_the_whole_step(tiny_llama, tmp_path, method):
    # completions of 1 to 12 words: micro-batches of one row each hold very different token counts
    rows = [{"prompt": f"count {i}", "completion": " ".join(str(j) for j in range(i, i + 1 + (5 * i) % 12))}
            for i in range(12)]
    data = _jsonl(tmp_path / "rows.jsonl", rows)
    common = dict(task="jsonl", model=tiny_llama, train_file=data, dev_file=data, out=str(tmp_path / "{task}"), epochs=2,
                  lr=1e-2 if method == "lora" else 1e-3, max_length=64, lora_r=4, lora_dropout=0.0, label_smoothing=0.1,
                  precision="fp32", eval_batch_size=4, progress=False, method=method)
    train.train(train.TrainConfig(**{**common, "out": str(tmp_path / "big"), "batch_size": 4}), seed=0)
    train.train(train.TrainConfig(**{**common, "out": str(tmp_path / "small"), "batch_size": 1,
                                     "gradient_accumulation_steps": 4}), seed=0)
    _assert_same_weights(_trained(tmp_path / "big" / "seed0"), _trained(tmp_path / "small" / "seed0"))


def test_max_steps_stops_there_and_resumes_exactly(tiny_model, tmp_path, monkeypatch):
    # 40 rows, 8 per step: 5 steps per epoch, so 7 steps end 2 steps into the second epoch
    kw = dict(max_steps=7, epochs=10, gradient_accumulation_steps=2, save_steps=3, lr_scheduler="cosine",
              lora_dropout=0.1)
    whole = train.train(_cfg(tiny_model, tmp_path / "whole", **kw), seed=0)
    run = tmp_path / "whole" / "mrpc" / "seed0"
    final = torch.load(run / "checkpoint-2-0.pt", weights_only=True)
    assert final["scheduler"]["last_epoch"] == 7 and [h["step"] for h in whole["epochs"]] == [5, 7]
    assert [p.name for p in checkpoint.checkpoints(run)] == ["checkpoint-2-0.pt", "checkpoint-1-1.pt"]

    saves = 0
    real_save = checkpoint._atomic_save

    def killed_after_the_third(obj, path):  # steps 3, 5 (the epoch's end), 6
        nonlocal saves
        real_save(obj, path)
        saves += 1
        if saves == 3:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoint, "_atomic_save", killed_after_the_third)
    cfg = _cfg(tiny_model, tmp_path / "split", **kw)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg, seed=0)
    monkeypatch.setattr(checkpoint, "_atomic_save", real_save)
    resumed = train.train(train.TrainConfig(**{**cfg.__dict__, "resume": True}), seed=0)
    assert [(h["dev"], h["train_loss"]) for h in resumed["epochs"]] == [(h["dev"], h["train_loss"]) for h in whole["epochs"]]
    again = _trained(tmp_path / "split" / "mrpc" / "seed0")
    assert all(torch.equal(again[k], v) for k, v in final["trainable"].items())


def test_eval_steps_evaluate_every_n_steps_and_after_the_last(tiny_model, tmp_path, capsys):
    summary = train.train(_cfg(tiny_model, tmp_path, eval_steps=4, batch_size=8), seed=0)  # 2 epochs of 5 steps
    assert [h["step"] for h in summary["epochs"]] == [4, 8, 10]
    assert [h["epoch"] for h in summary["epochs"]] == [0.8, 1.6, 2.0]
    best = summary["best_epoch"] - 1
    assert summary["best_step"] == summary["epochs"][best]["step"]
    out = capsys.readouterr().out
    assert "step 4 (epoch 0.8): train loss" in out and "step 10 (epoch 2): train loss" in out
    log = (tmp_path / "mrpc" / "seed0" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [4, 8, 10]


def test_save_total_limit_keeps_that_many_checkpoints(tiny_model, tmp_path):
    train.train(_cfg(tiny_model, tmp_path / "three", save_steps=1, save_total_limit=3, batch_size=8), seed=0)
    kept = [p.name for p in checkpoint.checkpoints(tmp_path / "three" / "mrpc" / "seed0")]
    assert kept == ["checkpoint-2-0.pt", "checkpoint-1-4.pt", "checkpoint-1-3.pt"]
    train.train(_cfg(tiny_model, tmp_path / "all", save_steps=1, save_total_limit=0, batch_size=8), seed=0)
    kept = [p.name for p in checkpoint.checkpoints(tmp_path / "all" / "mrpc" / "seed0")]
    assert len(kept) == 10 and kept[-1] == "checkpoint-0-1.pt"  # steps 1-4 and 6-9, and the two epoch ends


def test_logging_steps_print_and_report_every_n_steps(tiny_model, tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(runfiles.Tracker, "step", lambda self, step, values: seen.append((step, values)))
    train.train(_cfg(tiny_model, tmp_path, logging_steps=4, batch_size=8), seed=0)  # 2 epochs of 5 steps
    assert [step for step, _ in seen] == [4, 8]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 4/10 (epoch 0.80)", "step 8/10 (epoch 1.60)"]
    assert f"loss {seen[0][1]['loss']:.4f}, lr {seen[0][1]['lr']:.3g}" in lines[0]


def test_full_fine_tuning_of_a_glue_regression_takes_every_step_flag(tiny_model, tmp_path, monkeypatch):
    """--method full on STS-B: accumulation, --max-steps, the schedule, --eval-steps (the best evaluation's weights
    are what trainable.safetensors holds), --save-steps with --save-total-limit 0, --logging-steps."""
    from safetensors.torch import load_file

    from test_schedule import _reference

    seen = []
    monkeypatch.setattr(runfiles.Tracker, "step", lambda self, step, values: seen.append((step, values["lr"])))
    # 40 rows, 8 per optimizer step (2 x 4 accumulated): 5 steps per epoch; 7 steps in all
    kw = dict(task="stsb", method="full", lr=1e-4, gradient_accumulation_steps=2, max_steps=7, epochs=10, eval_steps=3,
              save_steps=3, save_total_limit=0, logging_steps=2, lr_scheduler="cosine", warmup_steps=2)
    summary = train.train(_cfg(tiny_model, tmp_path, **kw), seed=0)
    run = tmp_path / "stsb" / "seed0"
    assert [h["step"] for h in summary["epochs"]] == [3, 6, 7]
    assert seen == [(s, _reference("cosine", 1e-4, 2, 7)[s]) for s in (2, 4, 6)]
    at = {3: "checkpoint-0-3.pt", 5: "checkpoint-1-0.pt", 6: "checkpoint-1-1.pt", 7: "checkpoint-2-0.pt"}
    assert [p.name for p in checkpoint.checkpoints(run)] == [at[s] for s in (7, 6, 5, 3)]
    states = {s: torch.load(run / name, weights_only=True) for s, name in at.items()}
    assert states[7]["scheduler"]["last_epoch"] == 7
    saved = load_file(run / "trainable.safetensors")
    assert len(saved) > 20 and "bert.embeddings.word_embeddings.weight" in saved  # the whole model trained
    for step in (3, 6, 7):
        same = all(torch.equal(saved[k], states[step]["trainable"][k]) for k in saved)
        assert same == (step == summary["best_step"]), step  # the best evaluation's weights, no other's


def test_plan_counts_optimizer_steps():
    cfg = train.TrainConfig(batch_size=4, gradient_accumulation_steps=3, epochs=2)
    plan = Plan.of(cfg, train_rows=50, processes=2)  # 24 rows per step
    assert (plan.rows_per_step, plan.micro_rows, plan.steps_per_epoch, plan.total_steps, plan.epochs) == (24, 8, 3, 6, 2)
    capped = Plan.of(train.TrainConfig(batch_size=4, max_steps=15, epochs=10), train_rows=50, processes=1)
    assert (capped.steps_per_epoch, capped.total_steps, capped.epochs, capped.steps_in(0), capped.steps_in(1)) == (
        13, 15, 2, 13, 2)  # --max-steps overrides --epochs
    assert [s for s in range(1, 16) if capped.evaluates(s, epoch_end=s in (13, 15))] == [13, 15]
    every = Plan(8, 8, 13, 15, eval_steps=4, save_steps=5, logging_steps=3)
    assert [s for s in range(1, 16) if every.evaluates(s, epoch_end=s == 13)] == [4, 8, 12, 15]
    assert [s for s in range(1, 16) if every.saves(s, epoch_end=s in (13, 15))] == [5, 10]  # and every epoch end
    assert [s for s in range(1, 16) if every.logs(s)] == [3, 6, 9, 12, 15]


@pytest.mark.parametrize("kw, message", [
    (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps must be positive, got 0"),
    (dict(max_steps=0), r"max_steps must be positive \(or None: --epochs decides\), got 0"),
    (dict(logging_steps=-1), r"logging_steps must be positive \(or None: no log lines\), got -1"),
    (dict(eval_steps=-2), "eval_steps must be 0 or positive, got -2"),
    (dict(save_total_limit=-1), "save_total_limit must be 0 or positive, got -1"),
])
def test_bad_loop_settings_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        train.TrainConfig(**kw)


def test_the_flags_on_the_command_line_and_in_config_files(tmp_path):
    from lorakit.cli import _train_config, build_parser

    flags = ["--gradient-accumulation-steps", "4", "--max-steps", "100", "--lr-scheduler", "cosine", "--eval-steps",
             "20", "--save-steps", "10", "--save-total-limit", "3", "--logging-steps", "5"]
    cfg, _ = _train_config(build_parser().parse_args(["train", *flags]))
    wanted = dict(gradient_accumulation_steps=4, max_steps=100, lr_scheduler="cosine", eval_steps=20, save_steps=10,
                  save_total_limit=3, logging_steps=5)
    assert {k: getattr(cfg, k) for k in wanted} == wanted
    cfg, _ = _train_config(build_parser().parse_args(["train", "--save-every", "7"]))  # the older name
    assert cfg.save_steps == 7
    config = tmp_path / "run.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in wanted.items()) + "task: rte\n")
    cfg, _ = _train_config(build_parser().parse_args(["train", "--config", str(config), "--max-steps", "50"]))
    assert {k: getattr(cfg, k) for k in wanted} == {**wanted, "max_steps": 50}
    config.write_text("save_every: 3\n")
    assert _train_config(build_parser().parse_args(["train", "--config", str(config)]))[0].save_steps == 3
