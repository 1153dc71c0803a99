"""--packing (lorakit.training.packing): first-fit decreasing placement, seeded and deterministic; each row of a
packed sequence has the logits of the row alone (Llama's rotary positions, GPT-2's learned ones,
Gemma 2's sliding window); the first label of each row and the prompt tokens are never learned; the
loss and the trained adapter equal the unpacked ones (with accumulation, --method full, DDP and
FSDP); resume is bit-identical; classifiers and models whose attention crosses rows are refused."""

import json
import os
import random
from pathlib import Path

import pytest
import torch

from conftest import _tiny_lm_folder
from helpers import GLUE, MODEL_TOL
from lorakit import checkpoint, cli, tasks, train
from lorakit.tasks import Split, lm
from lorakit.training import packing

E2E = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e"

ROWS = [{"prompt": f"count from {i}", "completion": " ".join(str(j) for j in range(i, i + 1 + (5 * i) % 9))}
        for i in range(12)]


def _jsonl(path: Path, rows=ROWS) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _encoded(tokenizer, rows=ROWS, max_length: int = 64) -> Split:
    """``rows`` encoded, and two rows that learn every token, their first too (text without a prompt): packing
    must not let that first token be predicted from the row before it."""
    texts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("one two three four", "five six seven")]
    return Split([lm.encode(tokenizer, r, "plain", max_length) for r in rows] + [{"input_ids": t, "labels": t}
                                                                                 for t in texts], rows + texts)


# ---- placement -----------------------------------------------------------------------------


def _first_fit_by_hand(lengths, capacity):
    bins, room = [], []
    for i, n in enumerate(lengths):
        b = next((b for b, r in enumerate(room) if r >= n), len(bins))
        if b == len(bins):
            bins.append([])
            room.append(capacity)
        bins[b].append(i)
        room[b] -= n
    return bins


def test_first_fit_puts_each_row_in_the_first_sequence_with_room():
    assert packing.first_fit([5, 4, 3, 6, 2, 1], 8) == [[0, 2], [1, 4, 5], [3]]
    assert packing.first_fit([8, 8], 8) == [[0], [1]] and packing.first_fit([3], 8) == [[0]]
    rng = random.Random(0)
    for n in (1, 2, 7, 100, 1000):
        lengths = [rng.randint(1, 128) for _ in range(n)]
        assert packing.first_fit(lengths, 128) == _first_fit_by_hand(lengths, 128)
    with pytest.raises(ValueError, match="a length of 9 exceeds the capacity 8"):
        packing.first_fit([3, 9], 8)


def test_packing_is_seeded_and_deterministic_and_keeps_every_row_once(tiny_llama):
    tokenizer, _ = lm.load_causal_lm(tiny_llama)
    split = _encoded(tokenizer)
    packed = packing.pack(split, 40, seed=0)
    assert packing.pack(split, 40, seed=0) == packed  # the same sequences, the same rows in each
    assert packing.pack(split, 40, seed=1).targets != packed.targets  # the seed draws the order
    assert sorted(i for rows in packed.targets for i in rows) == list(range(len(split)))
    assert len(packed) < len(split) and all(n <= 40 for n in packed.lengths)
    placed = [i for rows in packed.targets for i in rows]  # first-fit decreasing: the longest row opens the first
    assert split.lengths[placed[0]] == max(split.lengths)
    bins = packing.first_fit(sorted(split.lengths, reverse=True), 40)
    assert [len(rows) for rows in packed.targets] == [len(b) for b in bins]
    for f, rows in zip(packed.features, packed.targets):
        assert f["input_ids"] == [t for i in rows for t in split.features[i]["input_ids"]]
    with pytest.raises(ValueError, match="a row of .* tokens does not fit a packed sequence of --max-length 8"):
        packing.pack(split, 8, seed=0)


def test_packed_rows_restart_their_positions_and_never_learn_their_first_token_or_prompt(tiny_llama):
    tokenizer, _ = lm.load_causal_lm(tiny_llama)
    split = _encoded(tokenizer)
    packed = packing.pack(split, 40, seed=0)
    assert any(len(rows) > 1 for rows in packed.targets)
    for f, rows in zip(packed.features, packed.targets):
        start = 0
        for i in rows:
            row = split.features[i]
            end = start + len(row["input_ids"])
            assert f["position_ids"][start:end] == list(range(end - start))
            assert f["labels"][start] == lm.IGNORE  # not predicted from the row before
            assert f["labels"][start + 1 : end] == row["labels"][1:]  # prompt tokens stay IGNORE
            if i < len(ROWS):
                prompt = len(lm.prompt_ids(tokenizer, ROWS[i]["prompt"], "plain"))
                assert set(f["labels"][start : start + prompt]) == {lm.IGNORE}
            start = end
    task = lm.LMTask(train.TrainConfig(task="jsonl", train_file="x", dev_file="y"))
    assert task.loss_units(packed, range(len(packed))) == task.loss_units(split, range(len(split)))
    # a batch of packed sequences: positions, no attention mask; the padding is a row of its own
    batch = lm.collate(packed.features[:3], tokenizer.pad_token_id)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    for b, f in enumerate(packed.features[:3]):
        assert batch["position_ids"][b, len(f["input_ids"]):].tolist() == list(range(batch["input_ids"].shape[1]
                                                                                    - len(f["input_ids"])))


# ---- the model sees each row alone ---------------------------------------------------------


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2_lm", "tiny_gemma2_lm"])
def test_each_packed_row_has_the_logits_of_the_row_alone(request, arch):
    tokenizer, model = lm.load_causal_lm(request.getfixturevalue(arch))
    model.eval()
    split = _encoded(tokenizer)
    packed = packing.pack(split, 48, seed=0)
    batch = lm.collate(packed.features, tokenizer.pad_token_id)
    with torch.no_grad():  # no cache: transformers reads packed rows from the positions in training passes only
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        plain = model(input_ids=batch["input_ids"], use_cache=False).logits  # concatenated, not packed
    crossed = False
    for b, rows in enumerate(packed.targets):
        start = 0
        for i in rows:
            ids = split.features[i]["input_ids"]
            with torch.no_grad():
                alone = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(logits[b, start : start + len(ids)], alone, **MODEL_TOL)
            crossed |= start > 0 and not torch.allclose(plain[b, start : start + len(ids)], alone, **MODEL_TOL)
            start += len(ids)
    assert crossed  # concatenated rows without packing's positions do see each other: the check can fail


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2_lm"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_packed_loss_and_gradients_equal_the_unpacked_ones(request, arch, eps):
    cfg = train.TrainConfig(task="jsonl", model=request.getfixturevalue(arch), train_file="x", dev_file="y",
                            lora_r=4, lora_dropout=0.0, label_smoothing=eps, progress=False)
    task = lm.LMTask(cfg)
    tokenizer, model = train._prepare(cfg, task)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)  # B != 0: the adapter changes the outputs, gradients reach A
    split = _encoded(tokenizer)
    packed = packing.pack(split, 48, seed=0)
    assert len(packed) < len(split)
    results = []
    for s in (split, packed):
        loss = task.loss_module(model)(**task.collate(s, list(range(len(s)))))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        model.zero_grad(set_to_none=True)
    (unpacked, grads), (loss, packed_grads) = results
    torch.testing.assert_close(loss, unpacked, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(packed_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_a_model_whose_attention_crosses_rows_is_refused(tiny_llama, tmp_path):
    _, llama = lm.load_causal_lm(tiny_llama)
    llama.train()
    packing.check_model(llama)
    assert llama.training  # its mode is kept
    opt = _tiny_lm_folder(tmp_path / "opt", "opt")
    message = r"--packing: OPTForCausalLM lets packed rows see each other .* train it without --packing"
    with pytest.raises(ValueError, match=message):
        packing.check_model(lm.load_causal_lm(opt)[1])
    data = _jsonl(tmp_path / "rows.jsonl")
    with pytest.raises(ValueError, match=message):  # train checks the model it trains
        train.train(_cfg(opt, tmp_path / "run", data, packing=True), seed=0)


@pytest.mark.skipif(not GLUE.is_dir(), reason="../shared/data/glue not present")
def test_classifiers_refuse_packing_by_name(tiny_model, tmp_path, capsys):
    for kw in (dict(task="mrpc"), dict(task="classify", train_file="x.csv", text_field="t", label_field="l")):
        with pytest.raises(ValueError, match=rf"--packing concatenates causal-LM rows \(--task e2e, jsonl\); "
                                             rf"--task {kw['task']} classifies each row on its own: drop --packing"):
            tasks.create(train.TrainConfig(model=tiny_model, packing=True, **kw))
    assert cli.main(["train", "--task", "rte", "--model", tiny_model, "--packing", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--task rte classifies each row on its own: drop --packing" in err


# ---- training runs -------------------------------------------------------------------------


def _cfg(model, out, data, **kw):
    values = dict(task="jsonl", model=model, train_file=data, dev_file=data, out=str(out), epochs=2, lr=1e-2,
                  max_length=48, lora_r=4, lora_dropout=0.0, precision="fp32", eval_batch_size=4, progress=False)
    return train.TrainConfig(**{**values, **kw})


def _trained(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint-2-0.pt", weights_only=True)["trainable"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_packed_run_trains_the_weights_of_an_unpacked_run(tiny_llama, tmp_path, method, capsys):
    # one optimizer step per epoch holds all 12 rows: 12 rows unpacked, or every packed sequence (at most 12), in
    # one batch or accumulated one sequence at a time
    data = _jsonl(tmp_path / "rows.jsonl")
    kw = dict(method=method, label_smoothing=0.1, lr=1e-2 if method == "lora" else 1e-3)
    train.train(_cfg(tiny_llama, tmp_path / "rows", data, batch_size=12, **kw), seed=0)
    packed = train.train(_cfg(tiny_llama, tmp_path / "packed", data, batch_size=12, packing=True, **kw), seed=0)
    out = capsys.readouterr().out
    assert "--packing: 12 training rows in " in out and "training packed sequences" in out
    accumulated = train.train(_cfg(tiny_llama, tmp_path / "acc", data, batch_size=1, gradient_accumulation_steps=12,
                                   packing=True, **kw), seed=0)
    ours = _trained(tmp_path / "rows" / "seed0")
    before = torch.load(tmp_path / "rows" / "seed0" / "checkpoint-1-0.pt", weights_only=True)["trainable"]
    assert not all(torch.equal(before[k], t) for k, t in ours.items())  # the second step trained
    for run in ("packed", "acc"):
        theirs = _trained(tmp_path / run / "seed0")
        assert theirs.keys() == ours.keys()
        for name, tensor in ours.items():
            # summation order differs (sequences, padding): fp32 drift, amplified by Adam's normalisation
            torch.testing.assert_close(theirs[name], tensor, rtol=1e-4, atol=1e-5, msg=f"{run} {name}")
    rows = json.loads((tmp_path / "rows" / "seed0" / "summary.json").read_text())["epochs"]
    for summary in (packed, accumulated):
        assert [e["dev"]["dev"]["loss"] for e in summary["epochs"]] == pytest.approx([e["dev"]["dev"]["loss"]
                                                                                     for e in rows], rel=1e-4)
    assert packed["epochs"][0]["train_loss"] == pytest.approx(rows[0]["train_loss"], rel=1e-5)


def test_a_packed_run_resumes_bit_identically(tiny_llama, tmp_path, monkeypatch):
    data = _jsonl(tmp_path / "rows.jsonl")
    kw = dict(packing=True, batch_size=2, lora_dropout=0.1, max_length=32, save_steps=2)
    whole = train.train(_cfg(tiny_llama, tmp_path / "whole", data, **kw), seed=0)
    final = _trained(tmp_path / "whole" / "seed0")
    saves, real_save = 0, checkpoint._atomic_save

    def killed_after_the_second(obj, path):
        nonlocal saves
        real_save(obj, path)
        saves += 1
        if saves == 2:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoint, "_atomic_save", killed_after_the_second)
    cfg = _cfg(tiny_llama, tmp_path / "split", data, **kw)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg, seed=0)
    monkeypatch.setattr(checkpoint, "_atomic_save", real_save)
    with pytest.raises(ValueError, match="packing True there, False here"):
        train.train(train.TrainConfig(**{**cfg.__dict__, "resume": True, "packing": False}), seed=0)
    resumed = train.train(train.TrainConfig(**{**cfg.__dict__, "resume": True}), seed=0)
    assert [(h["dev"], h["train_loss"]) for h in resumed["epochs"]] == [(h["dev"], h["train_loss"]) for h in whole["epochs"]]
    again = _trained(tmp_path / "split" / "seed0")
    assert all(torch.equal(again[k], v) for k, v in final.items())


@pytest.mark.skipif(not E2E.is_dir(), reason="../shared/data/e2e not present")
def test_train_packing_on_the_command_line(tiny_gpt2_lm, tmp_path, capsys, monkeypatch):
    from helpers import without_java

    monkeypatch.setenv("PATH", without_java(os.environ.get("PATH", "")))  # rows, sequences and steps checked, not scores
    args = ["train", "--task", "e2e", "--model", tiny_gpt2_lm, "--data-dir", str(E2E), "--packing", "--preset", "none",
            "--max-train-examples", "24", "--max-eval-examples", "2", "--max-new-tokens", "4", "--max-length", "96",
            "--batch-size", "2", "--epochs", "1", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "--packing: 24 training rows in " in out
    summary = json.loads((tmp_path / "seed0" / "summary.json").read_text())
    assert summary["config"]["packing"] is True
    sequences = int(out.split("--packing: 24 training rows in ")[1].split()[0])
    assert 1 < sequences < 24 and summary["epochs"][0]["step"] == -(-sequences // 2)  # batches of 2 sequences


@pytest.mark.skipif(not E2E.is_dir(), reason="../shared/data/e2e not present")
def test_packing_under_ddp_and_fsdp_trains_the_adapter_of_one_process(tiny_llama, tmp_path, monkeypatch):
    from test_distributed_lm import BASE, _adapter, _args, _torchrun, without_java

    monkeypatch.setenv("PATH", without_java(os.environ.get("PATH", "")))  # as _torchrun's processes: no METEOR

    common = dict(packing=True, max_length=96, gradient_checkpointing=False)
    train.train(train.TrainConfig(**{**BASE, **common, "model": tiny_llama, "out": str(tmp_path / "one"),
                                     "batch_size": 4, "progress": False}), seed=0)
    for engine in ("ddp", "fsdp"):
        done = _torchrun(["--standalone", "--nproc_per_node", "2"],
                         _args(tiny_llama, tmp_path / engine, fsdp=engine == "fsdp", batch_size=1,
                               gradient_accumulation_steps=2, **common))
        assert done.returncode == 0, done.stderr[-3000:]
        assert "--packing: 24 training rows in " in done.stdout
    one = _adapter(tmp_path / "one")
    for engine in ("ddp", "fsdp"):
        theirs = _adapter(tmp_path / engine)
        assert theirs.keys() == one.keys()
        for name, tensor in one.items():
            assert not torch.equal(tensor, torch.zeros_like(tensor)), name
            torch.testing.assert_close(theirs[name], tensor, rtol=0, atol=1e-5, msg=f"{engine} {name}")
