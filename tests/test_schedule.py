"""Learning-rate schedules: transformers' get_scheduler at every step of a real run, lorakit's former
schedule for the runs that recorded it, and resuming those."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import GLUE
from lorakit import checkpoint, runfiles, train
from lorakit.training.schedule import SCHEDULERS, create_scheduler, legacy_linear

pytestmark = pytest.mark.skipif(not GLUE.is_dir(), reason="../shared/data/glue not present")


def _cfg(model, tmp_path, **kw):
    values = dict(model=model, data_dir=str(GLUE), out=str(tmp_path / "{task}"), epochs=2, batch_size=4, lr=1e-3,
                  max_length=32, max_train_examples=40, max_eval_examples=16, progress=False)
    return train.TrainConfig(**{**values, **kw})


def _reference(name: str, lr: float, warmup: int, total: int) -> list[float]:
    """transformers' get_scheduler on its own: the learning rate before step 1, ..., after step ``total``."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(total):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    return lrs


@pytest.mark.parametrize("name", [n for n in SCHEDULERS if n != "legacy_linear"])
def test_a_run_follows_get_scheduler_at_every_step(tiny_model, tmp_path, monkeypatch, name):
    """Accumulation and --max-steps: the schedule advances once per optimizer step, over --max-steps."""
    seen = []
    monkeypatch.setattr(runfiles.Tracker, "step", lambda self, step, values: seen.append((step, values["lr"])))
    real = train._optimizer
    first = []

    def optimizer(model, cfg, total_steps):
        parts = real(model, cfg, total_steps)
        first.append(parts[1].get_last_lr()[0])  # the rate of the first step
        return parts

    monkeypatch.setattr(train, "_optimizer", optimizer)
    # 40 rows, 8 per optimizer step (2 x 4 accumulated): 5 steps per epoch; 7 steps in all
    train.train(_cfg(tiny_model, tmp_path, lr_scheduler=name, gradient_accumulation_steps=2, max_steps=7,
                     warmup_steps=3), seed=0)
    expected = _reference(name, 1e-3, 3, 7)
    assert first + [lr for _, lr in seen] == expected
    assert [step for step, _ in seen] == list(range(1, 8))
    assert len(set(expected)) > 2 or name == "constant"  # the schedule moves


def test_legacy_linear_is_lorakits_former_schedule():
    factor = legacy_linear(warmup=3, total=10)
    assert [factor(s) for s in range(11)] == [1 / 4, 2 / 4, 3 / 4, 1.0, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7, 0.0]
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    assert create_scheduler(optimizer, "legacy_linear", 3, 10).get_last_lr() == [0.5]  # never 0, unlike linear's s/w
    with pytest.raises(ValueError, match="lr_scheduler must be one of linear, .*; got 'cosine_annealing'"):
        train.TrainConfig(lr_scheduler="cosine_annealing")


def test_a_run_older_than_the_schedule_flag_resumes_on_its_own_schedule(tiny_model, tmp_path, monkeypatch):
    """A checkpoint without lr_scheduler was trained on legacy_linear: resuming it on transformers'
    linear is refused, saying so; with --lr-scheduler legacy_linear it ends bit-identical."""
    common = dict(warmup_steps=4, lora_dropout=0.1, save_steps=3)
    whole = train.train(_cfg(tiny_model, tmp_path / "whole", lr_scheduler="legacy_linear", **common), seed=0)

    real_save = checkpoint._atomic_save

    def killed(obj, path):
        del obj["config"]["lr_scheduler"]  # as written before the field existed
        real_save(obj, path)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoint, "_atomic_save", killed)
    old = _cfg(tiny_model, tmp_path / "old", lr_scheduler="legacy_linear", **common)
    with pytest.raises(KeyboardInterrupt):
        train.train(old, seed=0)
    monkeypatch.setattr(checkpoint, "_atomic_save", real_save)
    run = tmp_path / "old" / "mrpc" / "seed0"
    assert [p.name for p in checkpoint.checkpoints(run)] == ["checkpoint-0-3.pt"]

    with pytest.raises(ValueError, match=r"another configuration \(lr_scheduler 'legacy_linear' there, 'linear' here\); "
                                         r"it began before lorakit took its schedules from transformers: "
                                         r"add --lr-scheduler legacy_linear to resume it on the schedule it recorded"):
        train.train(_cfg(tiny_model, tmp_path / "old", resume=True, **common), seed=0)
    resumed = train.train(train.TrainConfig(**{**old.__dict__, "resume": True}), seed=0)
    assert [(h["dev"], h["train_loss"]) for h in resumed["epochs"]] == [(h["dev"], h["train_loss"]) for h in whole["epochs"]]
    a = load_file(tmp_path / "whole" / "mrpc" / "seed0" / "adapter" / "adapter_model.safetensors")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_runs_on_different_schedules_are_not_one_recipe(tiny_model, tmp_path):
    train.train(_cfg(tiny_model, tmp_path, epochs=1, max_train_examples=8), seed=0)
    summary = json.loads((tmp_path / "mrpc" / "seed0" / "summary.json").read_text())
    older = json.loads(json.dumps(summary))
    del older["config"]["lr_scheduler"]  # a summary from before the field: legacy_linear
    older["config"]["seed"] = 1
    with pytest.raises(ValueError, match="these runs differ in lr_scheduler"):
        train.seeds_report([summary, older])
    older["config"]["lr_scheduler"] = "linear"
    assert train.seeds_report([summary, older])["seeds"] == [0, 1]
