"""DDP through torchrun (gloo, 2 CPU processes) and crash safety of lorakit train, in
real processes: SIGKILL mid-epoch and mid-write, then --resume."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lorakit import cli, train
from lorakit.distributed import World, shard_rows

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

BASE = dict(task="mrpc", epochs=2, batch_size=4, lr=1e-3, max_length=32, max_train_examples=29, max_eval_examples=24,
            lora_dropout=0.0, precision="fp32")  # fp32: processes are compared to 1e-4


def _args(model: str, out, **kw) -> list[str]:
    values = {**BASE, "model": model, "out": str(out), **kw}
    flags = []
    for k, v in values.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    return [*flags, "--no-progress", "--preset", "none"]


def _cfg(model: str, out, **kw) -> train.TrainConfig:
    return train.TrainConfig(**{**BASE, "model": model, "out": str(out), "progress": False, **kw})


def test_shard_rows_deals_rows_and_weights_them_to_the_global_mean():
    batch = [10, 11, 12, 13, 14]
    parts = [shard_rows(batch, World(rank=r, size=2)) for r in range(2)]
    assert parts == [([10, 12, 14], 2 * 3 / 5), ([11, 13], 2 * 2 / 5)]
    # weights turn the average of per-process means into the global mean
    values = {10: 1.0, 11: 2.0, 12: 4.0, 13: 8.0, 14: 16.0}
    mean = sum((sum(values[i] for i in rows) / len(rows)) * w for rows, w in parts) / 2
    assert mean == pytest.approx(sum(values.values()) / 5)
    assert shard_rows([7], World(rank=1, size=2)) == ([7], 0.0)  # a process without rows contributes nothing


@pytest.fixture(scope="module")
def one_process(tiny_no_dropout, tmp_path_factory):
    """One process with the double batch (8 rows per step), no dropout: the run that each 2-process launch
    below (DDP, FSDP, DDP accumulating) must give; trained once for all three."""
    out = tmp_path_factory.mktemp("one")
    summary = train.train(_cfg(tiny_no_dropout, out, batch_size=8), seed=0)
    return summary, torch.load(out / "seed0" / "checkpoint-2-0.pt", weights_only=True)


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_with_the_double_batch(tiny_no_dropout, one_process, tmp_path, engine):
    one, ours = one_process
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lorakit", "train", *_args(tiny_no_dropout, tmp_path / "two", batch_size=4),
           *(["--fsdp"] if engine == "fsdp" else [])]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("epoch 1: train loss") == 1  # only the main process prints
    theirs = torch.load(tmp_path / "two" / "seed0" / "checkpoint-2-0.pt", weights_only=True)
    assert theirs["world_size"] == 2 and len(theirs["ranks"]) == 2
    assert ours["trainable"].keys() == theirs["trainable"].keys()
    for name, tensor in ours["trainable"].items():
        torch.testing.assert_close(theirs["trainable"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    run = tmp_path / "two" / "seed0"
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "checkpoint-1-0.pt", "checkpoint-2-0.pt", "config.yaml",
                                                     "curve.png", "log.jsonl", "summary.json"]
    assert len((run / "log.jsonl").read_text().splitlines()) == 2  # one record per epoch, not one per process
    # the adapter's receipt (under FSDP made by both processes together) reproduces on one process
    assert (run / "adapter" / "receipt.safetensors").is_file()
    assert cli.main(["verify", "--adapter", str(run / "adapter")]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trainable_params"] == one["trainable_params"]
    for a, b in zip(one["epochs"], summary["epochs"]):  # the gathered evaluation covers every dev example
        assert a["dev"]["dev"] == pytest.approx(b["dev"]["dev"], abs=0.05)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
    # resuming the 2-process run from its first epoch's checkpoint ends where it ended
    (run / "checkpoint-2-0.pt").unlink()
    again = subprocess.run([*cmd, "--resume"], env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-3000:]
    resumed = torch.load(run / "checkpoint-2-0.pt", weights_only=True)
    for name, tensor in theirs["trainable"].items():
        torch.testing.assert_close(resumed["trainable"][name], tensor, rtol=0, atol=0, msg=name)


# `lorakit train` with DDP counting the gradient synchronisations (a comm hook's calls for the first
# bucket: one per synchronised backward pass) into <argv[1]>.<rank>.
COUNT_SYNCS = """
import sys
import torch
import torch.nn.parallel
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from lorakit.cli import main

synced = 0

class Counted(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

        def hook(state, bucket):
            global synced
            synced += bucket.index() == 0
            return allreduce_hook(state, bucket)

        self.register_comm_hook(None, hook)

torch.nn.parallel.DistributedDataParallel = Counted
code = main(["train", *sys.argv[2:]])
open(f"{sys.argv[1]}.{torch.distributed.get_rank()}", "w").write(str(synced))
sys.exit(code)
"""


def test_two_processes_accumulating_equal_one_process_and_sync_once_per_step(tiny_no_dropout, one_process, tmp_path):
    """2 processes x 2 rows x 2 accumulated micro-batches = one process's batch of 8: the same weights;
    DDP synchronises the gradients in the last micro-step of each optimizer step only; resuming mid-run ends
    bit-identical."""
    script = tmp_path / "count_syncs.py"
    script.write_text(COUNT_SYNCS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path / "synced"), *_args(tiny_no_dropout, tmp_path / "two", batch_size=2, gradient_accumulation_steps=2,
                                            save_steps=3)]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # 29 rows, 8 per optimizer step: 4 steps per epoch (the last of 5 rows: micro-batches of 4 and 1), 2 epochs
    assert [int((tmp_path / f"synced.{rank}").read_text()) for rank in (0, 1)] == [8, 8]  # not 16
    ours = one_process[1]["trainable"]
    run = tmp_path / "two" / "seed0"
    theirs = torch.load(run / "checkpoint-2-0.pt", weights_only=True)["trainable"]
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        torch.testing.assert_close(theirs[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    (run / "checkpoint-2-0.pt").unlink()  # resume after step 6: step 2 of epoch 2
    again = subprocess.run([*cmd, "--resume"], env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "checkpoint-1-2.pt: 1 epochs and 2 steps done" in again.stdout, again.stderr[-3000:]
    resumed = torch.load(run / "checkpoint-2-0.pt", weights_only=True)["trainable"]
    assert all(torch.equal(resumed[k], v) for k, v in theirs.items())


# A driver that runs `lorakit train` and SIGKILLs itself at a chosen point: after the
# N-th checkpoint, or in the middle of writing the N-th one (half a file on disk).
KILLER = """
import os, signal, sys
import torch
from lorakit import checkpoint
from lorakit.cli import main

mode, n = sys.argv[1], int(sys.argv[2])
saves = 0
real_save, real_torch_save = checkpoint._atomic_save, torch.save

def half_save(obj, path):
    real_torch_save(obj, path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    os.kill(os.getpid(), signal.SIGKILL)

def save(obj, path):
    global saves
    saves += 1
    if mode == "during" and saves == n:
        torch.save = half_save
    real_save(obj, path)
    if mode == "after" and saves == n:
        os.kill(os.getpid(), signal.SIGKILL)

checkpoint._atomic_save = save
sys.exit(main(["train", *sys.argv[3:]]))
"""


def _killed_run(args: list[str], mode: str, n: int) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", KILLER, mode, str(n), *args], env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == -9, (done.returncode, done.stderr[-3000:])
    return done


def _resume_matches(args: list[str], whole, run) -> str:
    done = subprocess.run([sys.executable, "-m", "lorakit", "train", *args, "--resume"], env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert [h["dev"] for h in summary["epochs"]] == [h["dev"] for h in whole["epochs"]]
    assert [h["train_loss"] for h in summary["epochs"]] == [h["train_loss"] for h in whole["epochs"]]
    assert len((run / "log.jsonl").read_text().splitlines()) == len(whole["epochs"])
    a = load_file(run / "adapter" / "adapter_model.safetensors")
    b = load_file(run.parents[1] / "whole" / "seed0" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return done.stdout


@pytest.fixture(scope="module")
def whole_run(tiny_model, tmp_path_factory):
    """The uninterrupted reference run (with dropout: the random state must resume too)."""
    root = tmp_path_factory.mktemp("crash")
    done = subprocess.run([sys.executable, "-m", "lorakit", "train", *_args(tiny_model, root / "whole", save_every=3,
                                                                            lora_dropout=0.1)],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, json.loads((root / "whole" / "seed0" / "summary.json").read_text())


@pytest.fixture(scope="module")
def killed_after_4(tiny_model, whole_run):
    """A run SIGKILLed after its 4th checkpoint, as it was left, for each test below that resumes it: killed once."""
    root, _ = whole_run
    args = _args(tiny_model, root / "killed", save_every=3, lora_dropout=0.1)
    _killed_run(args, "after", 4)  # 8 steps per epoch: saves after steps 3, 6, 8 (the epoch's end), then 9
    shutil.copytree(root / "killed", root / "killed-as-left")
    return args


@pytest.fixture
def killed(killed_after_4, whole_run):
    """(its arguments, its run folder): a fresh copy of the killed run, at the --out it recorded (which a resume
    checks)."""
    root, _ = whole_run
    shutil.rmtree(root / "killed", ignore_errors=True)
    shutil.copytree(root / "killed-as-left", root / "killed")
    return killed_after_4, root / "killed" / "seed0"


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(whole_run, killed):
    _, whole = whole_run
    args, run = killed
    assert {"checkpoint-1-0.pt", "checkpoint-1-1.pt"} <= {p.name for p in run.glob("checkpoint-*")}
    out = _resume_matches(args, whole, run)
    assert "resumed from" in out and "checkpoint-1-1.pt: 1 epochs and 1 steps done" in out


def test_sigkill_during_a_checkpoint_write_then_resume(tiny_model, whole_run):
    root, whole = whole_run
    args = _args(tiny_model, root / "torn", save_every=3, lora_dropout=0.1)
    _killed_run(args, "during", 4)
    run = root / "torn" / "seed0"
    assert [p.name for p in run.glob(".checkpoint-*.tmp")]  # the torn write never got the checkpoint's name
    out = _resume_matches(args, whole, run)
    assert "checkpoint-1-0.pt: 1 epochs and 0 steps done" in out


def test_a_damaged_newest_checkpoint_is_skipped(whole_run, killed):
    _, whole = whole_run
    args, run = killed
    newest = run / "checkpoint-1-1.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # e.g. a disk that filled up
    out = _resume_matches(args, whole, run)
    assert "skipping damaged checkpoint" in out and "checkpoint-1-0.pt: 1 epochs and 0 steps done" in out
    assert (run / "checkpoint-1-1.pt.damaged").is_file()  # set aside, so it can never shadow a newer checkpoint
    assert {p.name for p in run.glob("checkpoint-*.pt")} == {"checkpoint-2-0.pt", "checkpoint-1-7.pt"}


def test_fsdp_needs_several_processes(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="--fsdp shards the model across processes: launch with torchrun"):
        train.train(_cfg(tiny_model, tmp_path, fsdp=True), seed=0)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tiny_model, tmp_path, capsys):
    from lorakit.cli import main

    code = main(["train", *_args(tiny_model, tmp_path, lr=1e30, epochs=3, save_every=1)])
    err = capsys.readouterr().err
    assert code == 2 and ("loss became nan" in err or "loss became inf" in err or "gradient norm became" in err), err
    last = sorted((tmp_path / "seed0").glob("checkpoint-*.pt"))
    assert last and f"Last good checkpoint: {last[-1]}" in err
    state = torch.load(last[-1], weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())


EVALUATE = """
import json, sys, torch
from lorakit import data
from lorakit.distributed import setup
from lorakit.tasks import glue

world = setup()
task = data.get_task("stsb")
tokenizer, model = glue.load_classifier(sys.argv[1], task)
torch.manual_seed(0)
with torch.no_grad():
    model.classifier.weight.normal_(0, 30)  # predictions that differ from row to row
    model.classifier.bias.zero_()
split = glue.tokenize(tokenizer, data.read_split(task, "dev", sys.argv[3])[:23], 32)
metrics = glue.evaluate(model, task, split, 5, tokenizer.pad_token_id, world)  # 5 batches: 3 + 2 (+1 padding)
if world.main:
    json.dump(metrics, open(sys.argv[2], "w"))
"""


def test_evaluation_gathers_every_prediction(tiny_model, tmp_path, monkeypatch):
    import runpy

    from helpers import GLUE

    script = tmp_path / "evaluate.py"
    script.write_text(EVALUATE)
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(script), tiny_model, str(tmp_path / "two.json"), str(GLUE)], env=ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the one-process side needs no process of its own (no launcher environment: setup() gives one process); it runs
    # here while the launch starts, one thread as in the launched processes, leaving this process's random state
    monkeypatch.setattr(sys, "argv", [str(script), tiny_model, str(tmp_path / "one.json"), str(GLUE)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            runpy.run_path(str(script), run_name="__main__")
        _, err = two.communicate(timeout=600)
    finally:
        torch.set_num_threads(threads)
        if two.poll() is None:
            two.kill()
            two.wait()
    assert two.returncode == 0, err[-3000:]
    a, b = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert abs(a["pearson"]) > 0.05  # the predictions are not constant
    assert a == pytest.approx(b, abs=1e-6)


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_resume_mid_epoch_with_dropout(tiny_model, tmp_path, engine):
    """Each process's random state and loss sums come back: the resumed run ends bit-identical."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lorakit", "train",
           *_args(tiny_model, tmp_path, batch_size=4, lora_dropout=0.1, save_every=3),
           *(["--fsdp"] if engine == "fsdp" else [])]
    first = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "seed0"
    whole = torch.load(run / "checkpoint-2-0.pt", weights_only=True)
    summary = json.loads((run / "summary.json").read_text())
    # 4 steps per epoch, a checkpoint every 3 steps of the run: after steps 3, 4 (the epoch's end), 6 and 8
    assert {p.name for p in run.glob("checkpoint-*.pt")} == {"checkpoint-2-0.pt", "checkpoint-1-2.pt"}
    (run / "checkpoint-2-0.pt").unlink()  # resume at step 2 of epoch 2
    again = subprocess.run([*cmd, "--resume"], env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "checkpoint-1-2.pt: 1 epochs and 2 steps done" in again.stdout, again.stderr[-3000:]
    resumed = torch.load(run / "checkpoint-2-0.pt", weights_only=True)
    assert all(torch.equal(resumed["trainable"][k], v) for k, v in whole["trainable"].items())
    after = json.loads((run / "summary.json").read_text())["epochs"]
    assert [(h["dev"], h["train_loss"]) for h in after] == [(h["dev"], h["train_loss"]) for h in summary["epochs"]]
    assert len((run / "log.jsonl").read_text().splitlines()) == 2
