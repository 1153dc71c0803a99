"""lorakit serve checks each adapter's receipt through its own engine (lorakit.serving.verify): at start-up and
on load, as scheduler rows; strict refuses what does not reproduce, warn serves it, /v1/models shows the result."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from safetensors.torch import load_file, save_file

import lorakit
from helpers import randomize
from lorakit.io import WEIGHTS_NAME
from lorakit.receipt import RECEIPT_NAME
from lorakit.serving.config import ServeConfig
from lorakit.serving.generation import GenerationEngine
from lorakit.serving.scheduler import Scheduler
from lorakit.serving.server import create_app
from lorakit.tasks.lm import load_causal_lm
from test_serve import running


def _adapter(model_dir: str, folder, seed: int = 0) -> str:
    _, model = load_causal_lm(model_dir)
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize(model, seed, std=0.3)
    lorakit.save_adapter(model, folder)
    (folder / "task.json").write_text(json.dumps({"task": "jsonl", "model": model_dir}))
    return str(folder)


@pytest.fixture(scope="module")
def folders(tiny_llama, tmp_path_factory):
    """A good adapter, one without a receipt, one with half of each lora_B zeroed after saving."""
    root = tmp_path_factory.mktemp("verify")
    good, bare, zeroed = (_adapter(tiny_llama, root / n, seed) for seed, n in enumerate(("good", "bare", "zeroed")))
    (root / "bare" / RECEIPT_NAME).unlink()
    tensors = load_file(root / "zeroed" / WEIGHTS_NAME)
    for key, t in tensors.items():
        if ".lora_B." in key:
            t[: len(t) // 2] = 0
    save_file(tensors, root / "zeroed" / WEIGHTS_NAME)
    return {"good": good, "bare": bare, "zeroed": zeroed}


def _server(model_dir: str, adapters: dict[str, str], quantize: str | None = None, **options):
    config = ServeConfig(**{"max_length": 64, "max_new_tokens": 16, **options})
    return running(create_app(GenerationEngine(model_dir, config, "fp32", quantize), config, adapters))


def _receipts(client) -> dict[str, dict]:
    return {m["id"]: m["receipt"] for m in client.get("/v1/models").json()["data"] if "receipt" in m}


def test_start_up_adapters_are_checked_and_shown_in_models(tiny_llama, folders):
    with _server(tiny_llama, {"good": folders["good"], "bare": folders["bare"]}) as client:
        receipts = _receipts(client)
        assert receipts["good"]["status"] == "verified" and receipts["good"]["tolerance"] == "fp32", receipts
        assert receipts["good"]["top1_agreement"] == 1.0 and receipts["good"]["kl_bound"] <= 1e-6
        assert receipts["good"]["base"] == "equal" and receipts["good"]["checksum"] == "equal"
        assert receipts["bare"] == {"status": "unverified", "reason": "no receipt"}  # served all the same
        assert client.post("/v1/completions", json={"model": "bare", "prompt": "x", "max_tokens": 2}).status_code == 200
        listed = {a["name"]: a["receipt"]["status"] for a in client.get("/v1/adapters").json()["adapters"]}
        assert listed == {"good": "verified", "bare": "unverified"}


def test_strict_refuses_a_changed_adapter_at_start_up(tiny_llama, folders):
    with pytest.raises(ValueError, match=r"adapter 'zeroed' does not reproduce its receipt on this server: .*"
                                         r"file differs from the receipt's checksum.*top-1 agreement"):
        _start(tiny_llama, "zeroed", folders["zeroed"])


def _start(model_dir: str, name: str, folder: str, quantize: str | None = None, **options) -> None:
    """A server's start-up (the scheduler not started) with adapter ``folder`` as ``name``."""
    engine = GenerationEngine(model_dir, ServeConfig(**options), "fp32", quantize)
    engine.load(name, folder)
    engine.prepare()


def test_a_load_while_serving_runs_the_probes_as_rows_beside_a_running_stream(tiny_llama, folders, monkeypatch):
    forwards = []  # the adapters of each forward's rows, and whether it was a prefill
    original = Scheduler._forward

    def recording(self, seqs, ids, start, last=None):
        forwards.append(([s.adapter for s in seqs], last is not None))
        return original(self, seqs, ids, start, last)

    monkeypatch.setattr(Scheduler, "_forward", recording)
    with _server(tiny_llama, {"good": folders["good"]}, max_new_tokens=120) as client:
        body = {"model": "good", "prompt": "x", "temperature": 0, "max_tokens": 120, "ignore_eos": True, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data"))
            r2 = client.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": folders["good"]})
            assert r2.status_code == 200, r2.text
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert _receipts(client)["late"]["status"] == "verified"
    probe = next(i for i, (names, prefill) in enumerate(forwards) if prefill and "late" in names)
    assert forwards[probe][0].count("late") >= 1
    decodes = [i for i, (names, prefill) in enumerate(forwards) if not prefill and names == ["good"]]
    assert min(decodes) < probe < max(decodes)  # the stream was decoding before and after the probes' prefill


@pytest.mark.parametrize("mode", ["strict", "warn"])
def test_a_changed_adapter_loaded_while_serving(tiny_llama, folders, mode, capfd):
    with _server(tiny_llama, {}, verify_adapters=mode) as client:
        r = client.post("/v1/adapters", json={"name": "zeroed", "path": folders["zeroed"]})
        if mode == "strict":
            assert r.status_code == 400, r.text
            assert "adapter 'zeroed' does not reproduce its receipt" in r.json()["error"]
            assert "checksum" in r.json()["error"] and "strict refuses it" in r.json()["error"]
            assert "zeroed" not in _receipts(client)
            r = client.post("/v1/completions", json={"model": "zeroed", "prompt": "x", "max_tokens": 2})
            assert r.status_code == 404  # refused adapters are detached: the name is free again
            r = client.post("/v1/load_lora_adapter", json={"lora_name": "zeroed", "lora_path": folders["zeroed"]})
            assert r.status_code == 400 and "does not reproduce" in r.json()["error"]["message"]
        else:
            assert r.status_code == 201 and r.json()["receipt"]["status"] == "failed", r.text
            assert r.json()["receipt"]["checksum"] == "different" and r.json()["receipt"]["top1_agreement"] < 1
            assert "warning: adapter 'zeroed' does not reproduce its receipt" in capfd.readouterr().err
            assert client.post("/v1/completions", json={"model": "zeroed", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_off_reads_no_receipt(tiny_llama, folders):
    with _server(tiny_llama, {"zeroed": folders["zeroed"]}, verify_adapters="off") as client:
        assert _receipts(client) == {"zeroed": {"status": "not checked"}}


def test_int8_serving_passes_and_a_quantized_base_beyond_tolerance_is_refused(tiny_llama, folders):
    with _server(tiny_llama, {"good": folders["good"]}, quantize="int8") as client:
        receipt = _receipts(client)["good"]
        assert receipt["status"] == "verified" and receipt["tolerance"] == "int8", receipt
        assert receipt["base"] == "same base, quantized" and receipt["kl_bound"] > 0  # (the int8 kernels ran)
    # the same adapter on the same int8 base, held to a tolerance that int8 cannot meet: refused, with the figures
    with pytest.raises(ValueError, match=r"adapter 'good' does not reproduce its receipt.*KL bound .*tolerance int8"):
        _start(tiny_llama, "good", folders["good"], "int8", verify_tolerance="top1=1,kl=1e-12")


def test_probes_longer_than_the_servers_sequences_are_cut(tiny_llama, folders):
    with _server(tiny_llama, {"good": folders["good"]}, max_length=8, max_new_tokens=4) as client:
        assert _receipts(client)["good"]["status"] == "verified"


def test_a_client_cancelling_a_load_leaves_no_half_loaded_adapter(tiny_llama, folders):
    engine = GenerationEngine(tiny_llama, ServeConfig(), "fp32")
    engine.start()
    try:
        async def cancelled():
            await engine.call(engine.load, "good", folders["good"])
            hold = threading.Event()
            engine.scheduler.call(hold.wait)  # the scheduler waits: the probes cannot finish before the cancel
            task = asyncio.ensure_future(engine.verify("good"))
            await asyncio.sleep(0.1)
            task.cancel()
            hold.set()
            with pytest.raises(asyncio.CancelledError):
                await task
            await engine.call(lambda: None)  # (after the discard queued by the cancellation)

        asyncio.run(cancelled())
        assert "good" not in engine.pending and "good" not in engine.adapters
        assert not any("good" in layer.adapters for _, layer in lorakit.lora_layers(engine.model))
    finally:
        engine.stop()
