"""Saving from an FSDP2-sharded model (lorakit.training.sharded_save), in one torchrun launch of 2 gloo CPU
processes on a tiny Llama: the receipt written under FSDP verifies on a single-process load as one written
without FSDP; a torn save (one rank's slice lost in the gather, a truncated file, a file gone before the
others read it, a checkpoint missing one rank's rows) makes every process raise SaveVerificationError naming the rank and the tensor, and the launch
ends (no process waits for another in a collective)."""

import json
import subprocess
import sys

import pytest
import torch

import lorakit
from lorakit.receipt import compare, make_receipt, read_receipt
from test_distributed import ENV

LAUNCHED = """
import contextlib, json, os, sys
from pathlib import Path
import torch
from lorakit import LoraConfig, add_lora, checkpoint, io, lora_parameters
from lorakit.distributed import fully_shard_model, setup
from lorakit.io import SaveVerificationError
from lorakit.training import sharded_save
from transformers import AutoModelForCausalLM

world = setup()
base, out = sys.argv[1], Path(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(base)
add_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
g = torch.Generator().manual_seed(2)  # the same random factors on every process: the adapter changes the output
with torch.no_grad():
    for _, p in lora_parameters(model):
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
fully_shard_model(model)
TORN = "model.layers.1.self_attn.q_proj.lora_B.default"  # (32, 4): rank 0 holds rows 0-15, rank 1 rows 16-31
results = {}


def expect_failure(what, save):
    try:
        save()
        results[what] = None
    except SaveVerificationError as e:
        results[what] = str(e)


sharded_save.save_adapter_sharded(model, out / "good", world)
try:  # one process alone cannot: its tensors are shards, the receipt needs everyone
    io.save_adapter(model, out / "alone")
except ValueError as e:
    results["alone"] = str(e)
real_gather = sharded_save.full_parameters


@contextlib.contextmanager
def losing_rank_1(model):  # a gather that loses rank 1's rows of one tensor (accelerate PR #4206)
    with real_gather(model):
        model.get_parameter(TORN).data[16:] = 0
        yield


sharded_save.full_parameters = losing_rank_1
expect_failure("gather", lambda: sharded_save.save_adapter_sharded(model, out / "gather", world))
sharded_save.full_parameters = real_gather
real_save_file = io.save_file


def truncated(tensors, path, **kw):  # a write cut short (a full disk)
    real_save_file(tensors, path, **kw)
    os.truncate(path, os.path.getsize(path) // 2)


io.save_file = truncated
expect_failure("truncated", lambda: sharded_save.save_adapter_sharded(model, out / "truncated", world))
io.save_file = real_save_file
real_save_adapter = sharded_save.save_adapter


def vanishing(model, directory, *args, **kw):  # the file gone before the others read it (a folder not shared)
    real_save_adapter(model, directory, *args, **kw)
    (directory / "adapter_model.safetensors").unlink()


sharded_save.save_adapter = vanishing
expect_failure("missing", lambda: sharded_save.save_adapter_sharded(model, out / "missing", world))
sharded_save.save_adapter = real_save_adapter
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
progress = checkpoint.Progress()
checkpoint.save(out, {}, progress, model, optimizer, scheduler, world)  # a good checkpoint passes
real_state = checkpoint.get_model_state_dict


def rows_lost(model, options):  # the whole state dict without rank 1's rows of one tensor
    state = real_state(model, options=options)
    if TORN in state:
        state[TORN] = state[TORN].clone()
        state[TORN][16:] = 0
    return state


checkpoint.get_model_state_dict = rows_lost
progress.step = 1
expect_failure("checkpoint", lambda: checkpoint.save(out, {}, progress, model, optimizer, scheduler, world))
(out / f"results.{world.rank}.json").write_text(json.dumps(results))
"""


@pytest.fixture(scope="module")
def launched(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded-save")
    (out / "launched.py").write_text(LAUNCHED)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(out / "launched.py"), tiny_llama, str(out)], env=ENV, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, [json.loads((out / f"results.{rank}.json").read_text()) for rank in (0, 1)]


def test_a_receipt_written_under_fsdp_verifies_on_one_process_as_one_written_without(tiny_llama, launched):
    from transformers import AutoModelForCausalLM

    out, _ = launched
    model = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), out / "good")
    sharded = read_receipt(out / "good")
    report = compare(sharded, model, "default")
    assert report["passed"] and report["fingerprint"]["status"] == "equal", report
    assert report["tolerance"]["key"] == "fp32" and report["top1_agreement"] == 1.0
    alone = make_receipt(model, "default")
    assert sharded.metadata["fingerprints"] == alone.metadata["fingerprints"]  # sha256 of the whole weights
    assert sharded.metadata["adapter_sha256"] == alone.metadata["adapter_sha256"]
    assert sharded.tensors.keys() == alone.tensors.keys()
    for name, tensor in alone.tensors.items():
        torch.testing.assert_close(sharded.tensors[name], tensor, rtol=0, atol=1e-5, msg=name)
    # a receipt that can fail: the base alone, without the adapter, does not reproduce it
    assert not compare(sharded, AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), None)["passed"]


def test_one_process_alone_is_told_to_save_from_every_process(launched):
    out, results = launched
    assert all("the model is FSDP-sharded: call lorakit.training.sharded_save.save_adapter_sharded" in r["alone"]
               for r in results), results
    assert not (out / "alone").exists()


@pytest.mark.parametrize("what, expected", [
    ("gather", "rank 1: 1 slices differ: base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"),
    ("truncated", "rank 0 could not save"),
    ("missing", "rank 0: cannot read it back (FileNotFoundError"),
    ("checkpoint", "rank 1: 1 slices differ: model.layers.1.self_attn.q_proj.lora_B.default"),
])
def test_a_torn_save_under_fsdp_fails_on_every_process_naming_rank_and_tensor(launched, what, expected):
    out, results = launched
    messages = [r[what] for r in results]
    assert all(m is not None and expected in m for m in messages), messages
    assert messages[0] == messages[1]  # every process says the same
    if what == "missing":
        assert "; rank 1: cannot read it back (FileNotFoundError" in messages[0]
    else:
        assert "rank 0:" not in messages[0]  # rank 0's own slice was right
    if what == "gather":
        assert not (out / "gather" / "receipt.safetensors").exists()  # no receipt vouches for a torn save
    if what == "checkpoint":  # set aside: a resume never reads it
        assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-0-0.pt", "checkpoint-0-1.pt.damaged"}
