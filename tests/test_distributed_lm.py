"""FSDP2 for causal LMs (tiny Llama, E2E, gloo, 2 CPU processes): the same adapter as DDP and as
one process, resume after SIGKILL, two torchrun launches with --nnodes 2 on one host; the model is
built on the meta device and each process fills only its shards, from the checkpoint or (a folder
with only a config) from seeded random weights."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import without_java
from lorakit import train
from test_distributed import ENV, KILLER
from test_materialise import _config_only, _tied_llama

E2E = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e"
pytestmark = pytest.mark.skipif(not E2E.is_dir(), reason="../shared/data/e2e not present")

BASE = dict(task="e2e", data_dir=str(E2E), epochs=2, lr=1e-2, max_length=64, max_train_examples=24, max_eval_examples=5,
            eval_batch_size=2, max_new_tokens=6, lora_r=4, lora_alpha=8.0, lora_dropout=0.0, precision="fp32",
            gradient_checkpointing=True)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


ENV = {**ENV, "PATH": without_java(ENV.get("PATH", ""))}


@pytest.fixture
def no_java(monkeypatch):
    """The same for the runs inside this process (nlg_metrics looks java up on PATH at each scoring)."""
    monkeypatch.setenv("PATH", without_java(os.environ.get("PATH", "")))


def _args(model: str, out, **kw) -> list[str]:
    flags = []
    for k, v in {**BASE, "model": model, "out": str(out), **kw}.items():
        name = f"--{k.replace('_', '-')}"
        flags += ([name] if v else []) if isinstance(v, bool) else [name, str(v)]
    return [*flags, "--no-progress", "--preset", "none"]


def _adapter(out) -> dict[str, torch.Tensor]:
    return load_file(Path(out) / "seed0" / "adapter" / "adapter_model.safetensors")


def _torchrun(launch: list[str], args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, *launch, "-m", "lorakit", "train", *args], env=ENV, capture_output=True, text=True,
                          timeout=900)


def test_fsdp_gives_the_adapter_of_ddp_and_of_one_process(tiny_llama, tmp_path, no_java):
    # one process with batches of 8; two processes with 2 rows each, accumulating 2 micro-batches per step
    train.train(train.TrainConfig(**{**BASE, "model": tiny_llama, "out": str(tmp_path / "one"), "batch_size": 8,
                                     "progress": False}), seed=0)
    two = dict(batch_size=2, gradient_accumulation_steps=2)
    for engine in ("ddp", "fsdp"):
        done = _torchrun(["--standalone", "--nproc_per_node", "2"],
                         _args(tiny_llama, tmp_path / engine, fsdp=engine == "fsdp", **two))
        assert done.returncode == 0, done.stderr[-3000:]
    assert "FSDP2: sharded LlamaDecoderLayer and the rest over 2 processes, each process reading only its shards" in done.stdout
    one, ddp, fsdp = (_adapter(tmp_path / name) for name in ("one", "ddp", "fsdp"))
    assert one.keys() == ddp.keys() == fsdp.keys() and len(one) == 8  # q_proj, v_proj: A and B in 2 layers
    for name, tensor in fsdp.items():
        assert not torch.equal(tensor, torch.zeros_like(tensor)), name
        torch.testing.assert_close(tensor, ddp[name], rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(tensor, one[name], rtol=0, atol=1e-5, msg=name)
    # 3 dev batches over 2 processes: under FSDP one process repeats a batch and counts it 0
    dev = [json.loads((tmp_path / n / "seed0" / "summary.json").read_text())["epochs"] for n in ("ddp", "fsdp")]
    assert [e["dev"]["dev"]["loss"] for e in dev[1]] == pytest.approx([e["dev"]["dev"]["loss"] for e in dev[0]], abs=1e-5)
    outputs = [(tmp_path / n / "seed0" / "outputs").rglob("*.txt") for n in ("ddp", "fsdp")]
    assert [p.read_text() for p in sorted(outputs[0])] == [p.read_text() for p in sorted(outputs[1])]


# dropout on: the resumed run and the two-node launch must also restore / draw each process's dropout masks
WHOLE = dict(fsdp=True, batch_size=2, lora_dropout=0.1, save_steps=2)


@pytest.fixture(scope="module")
def fsdp_whole(tiny_llama, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The adapter of one uninterrupted 2-process FSDP launch (``WHOLE``), which the SIGKILLed and resumed run
    and the two-node launch must each give bit for bit: one launch for both tests."""
    out = tmp_path_factory.mktemp("fsdp-whole")
    whole = _torchrun(["--standalone", "--nproc_per_node", "2"], _args(tiny_llama, out, **WHOLE))
    assert whole.returncode == 0, whole.stderr[-3000:]
    return _adapter(out)


def test_fsdp_resumes_bit_identically_after_sigkill(tiny_llama, fsdp_whole, tmp_path):
    args = _args(tiny_llama, tmp_path / "killed", **WHOLE)
    # the main process (the one that writes checkpoints) SIGKILLs itself after its 3rd checkpoint, mid-epoch 2
    (tmp_path / "killer.py").write_text(KILLER)
    killed = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node", "2", str(tmp_path / "killer.py"), "after",
                             "3", *args], env=ENV, capture_output=True, text=True, timeout=900)
    assert killed.returncode != 0 and "Signal 9" in killed.stderr, killed.stderr[-3000:]
    assert not (tmp_path / "killed" / "seed0" / "summary.json").exists()
    again = _torchrun(["--standalone", "--nproc_per_node", "2"], [*args, "--resume"])
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-3000:]
    a, b = fsdp_whole, _adapter(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_one_host_equal_one_launch(tiny_llama, fsdp_whole, tmp_path):
    """The many-machine launch (docs/DISTRIBUTED.md) with both "machines" on localhost."""
    args = _args(tiny_llama, tmp_path / "nodes", **WHOLE)
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "lorakit-test",
                               "-m", "lorakit", "train", *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in (0, 1)]
    results = [(node.communicate(timeout=900), node.returncode) for node in nodes]
    assert [code for _, code in results] == [0, 0], results[0][0][1][-2000:] + results[1][0][1][-2000:]
    a, b = _adapter(tmp_path / "nodes"), fsdp_whole  # the same run as one --standalone launch of 2 processes
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


SHARDS = """
import sys, torch
from torch.distributed.tensor import DTensor
from lorakit import LoraConfig, add_lora
from lorakit.distributed import fully_shard_model, setup
from lorakit.tasks.lm import load_causal_lm
from lorakit.training.materialise import Checkpoint, materialise

world = setup()
path = sys.argv[1]
models = []
for empty in (False, True):
    torch.manual_seed(0)
    _, model = load_causal_lm(path, empty=empty)
    add_lora(model, LoraConfig(r=4))
    models.append(model)
loaded, model = models
fully_shard_model(model)
materialise(model, "cpu", Checkpoint.find(path))
assert model.lm_head.weight is model.model.embed_tokens.weight
want = dict(loaded.named_parameters())
replicated = []
for name, param in model.named_parameters():
    if isinstance(param, DTensor):
        mine = want[name].chunk(world.size)[world.rank]  # FSDP2's Shard(0): torch.chunk's rows
        assert torch.equal(param.to_local(), mine), name
    else:  # the frozen weights outside the blocks are replicated
        assert torch.equal(param, want[name]) and not param.requires_grad, name
        replicated.append(name)
assert replicated == ["model.embed_tokens.weight", "model.norm.weight"], replicated
for name, buffer in loaded.named_buffers():
    assert torch.equal(model.get_buffer(name), buffer), name
print("shards equal", world.rank, len(want))
"""


def test_each_process_fills_its_shards_with_the_loaded_model_rows(tmp_path):
    path = _tied_llama(tmp_path / "tied")
    (tmp_path / "shards.py").write_text(SHARDS)
    done = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node", "2", str(tmp_path / "shards.py"), path],
                          env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "shards equal 0 " in done.stdout and "shards equal 1 " in done.stdout


def test_fsdp_trains_a_random_weights_model_as_ddp(tmp_path):
    """A folder with a config and no weights (the memory benchmark's model): every process draws the
    same seeded weights, so FSDP's shards and DDP's copies hold one model."""
    path = _config_only(_tied_llama(tmp_path / "tied"), tmp_path / "config-only")
    for engine in ("ddp", "fsdp"):
        done = _torchrun(["--standalone", "--nproc_per_node", "2"],
                         _args(path, tmp_path / engine, fsdp=engine == "fsdp", batch_size=2, epochs=1))
        assert done.returncode == 0, done.stderr[-3000:]
        assert "a config and no weights: random weights" in done.stdout
    ddp, fsdp = _adapter(tmp_path / "ddp"), _adapter(tmp_path / "fsdp")
    assert ddp.keys() == fsdp.keys() and len(ddp) == 8
    for name, tensor in fsdp.items():
        assert not torch.equal(tensor, torch.zeros_like(tensor)), name
        torch.testing.assert_close(tensor, ddp[name], rtol=0, atol=1e-5, msg=name)
