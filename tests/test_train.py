"""The training harness on a tiny BERT saved to disk, with real GLUE rows."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import GLUE, tiny_bert, tiny_roberta
from lorakit import checkpoint, data, runfiles, train
from lorakit.baselines import freeze_for
from lorakit.tasks.glue import load_classifier, mean_pooling

pytestmark = pytest.mark.skipif(not GLUE.is_dir(), reason="../shared/data/glue not present")


def _cfg(tiny_model, tmp_path, **kw):
    values = dict(model=tiny_model, data_dir=str(GLUE), out=str(tmp_path / "{task}"), epochs=2, batch_size=8,
                  lr=1e-3, max_length=48, max_train_examples=40, max_eval_examples=24, progress=False)
    return train.TrainConfig(**{**values, **kw})


def test_presets_and_overrides():
    cfg = train.resolve_config("paper", task="mrpc")
    assert (cfg.batch_size, cfg.epochs, cfg.lr, cfg.max_length, cfg.lora_r, cfg.lora_alpha) == (16, 30, 4e-4, 512, 8, 16.0)
    assert train.resolve_config("paper", task="rte").epochs == 80
    assert train.resolve_config("paper", task="cola", lr=1e-3, epochs=None).lr == 1e-3  # a flag beats the preset
    assert train.resolve_config(None, task="rte").epochs == train.TrainConfig.epochs
    assert train.resolve_config("demo", task="rte", method="full").lr == train.BASELINE_LR["full"]
    assert train.resolve_config("demo", task="rte", method="full", lr=1e-5).lr == 1e-5
    with pytest.raises(ValueError, match=r"unknown preset 'fast'; choose one of \['paper', 'demo'\]"):
        train.resolve_config("fast", task="mrpc")


@pytest.mark.parametrize("kw, message", [
    (dict(method="prefix"), r"method must be one of \('lora', 'full', 'bitfit', 'adapter'\), got 'prefix'"),
    (dict(epochs=0), "epochs must be positive, got 0"),
    (dict(lr=0.0), "lr must be positive, got 0.0"),
    (dict(task="mnli2"), "unknown task 'mnli2'"),
    (dict(seeds=()), "seeds must name at least one seed"),
    (dict(precision="fp16"), r"precision must be one of \('fp32', 'bf16', 'auto'\), got 'fp16'"),
])
def test_bad_config(kw, message):
    with pytest.raises(ValueError, match=message):
        train.TrainConfig(**kw)


@pytest.mark.parametrize("kw, error, message", [
    (dict(epochs=True), TypeError, r"TrainConfig.epochs must be an integer, got True \(bool\)"),
    (dict(batch_size=2.5), TypeError, r"TrainConfig.batch_size must be an integer, got 2.5 \(float\)"),
    (dict(lr="1e-4"), TypeError, r"TrainConfig.lr must be a number, got '1e-4' \(str\)"),
    (dict(out=5), TypeError, r"TrainConfig.out must be a string, got 5 \(int\)"),
    (dict(progress=1), TypeError, r"TrainConfig.progress must be True or False, got 1 \(int\)"),
    (dict(seeds=(0, 1.5)), TypeError, r"TrainConfig.seeds must be a sequence of integers, got \(0, 1.5\)"),
    (dict(warmup_steps=2.0), TypeError, r"TrainConfig.warmup_steps must be an integer, got 2.0"),
    (dict(lr=float("inf")), ValueError, "lr must be a finite number, got inf"),
    (dict(lora_alpha=float("inf")), ValueError, "lora_alpha must be a finite number, got inf"),
    (dict(label_smoothing=float("nan")), ValueError, "label_smoothing must be a finite number, got nan"),
    (dict(max_train_examples=0), ValueError, r"max_train_examples must be positive \(or None: all rows\), got 0"),
])
def test_config_fields_have_their_types_and_numbers_are_finite(kw, error, message):
    with pytest.raises(error, match=message):
        train.TrainConfig(**kw)
    assert train.TrainConfig(lr=1, lora_alpha=32, seeds=[0, 1], warmup_steps=None).lr == 1  # an int is a number


@pytest.mark.parametrize("method", ["lora", "full", "bitfit", "adapter"])
def test_methods_train_the_right_parameters(tiny_model, tmp_path, method):
    task = data.get_task("mrpc")
    _, model = load_classifier(tiny_model, task)
    train.attach_method(model, _cfg(tiny_model, tmp_path, method=method, adapter_dim=4))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    head = [n for n in names if n.startswith("classifier.")]
    rest = [n for n in names if not n.startswith("classifier.")]
    assert head
    if method == "lora":
        assert len(rest) == 2 * 2 * 2 and all(".lora_" in n for n in rest)
    elif method == "full":
        assert len(names) == len(list(model.parameters()))
    elif method == "bitfit":
        assert rest and all(n.endswith("bias") for n in rest)
    else:
        assert sum(".houlsby." in n for n in rest) == 2 * 2 * 4  # 2 sites per layer, down/up weight+bias
        assert all(".houlsby." in n or "LayerNorm" in n for n in rest)


@pytest.mark.parametrize("task", ["mrpc", "stsb", "cola", "rte", "sst2"])
def test_a_short_run_writes_everything(tiny_model, tmp_path, task):
    cfg = _cfg(tiny_model, tmp_path, task=task, epochs=1)
    report = train.train_seeds(cfg)
    run = tmp_path / data.get_task(task).name / "seed0"
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "checkpoint-1-0.pt", "config.yaml", "curve.png", "log.jsonl",
                                                     "summary.json"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_epoch"] == 1 and summary["trainable_params"] > 0 and summary["weights_bytes"] > 0
    assert set(summary["best"]["dev"]) == set(data.get_task(task).metrics)
    assert set(report["median"]) == set(data.get_task(task).metrics)
    assert json.loads((run / "adapter" / "task.json").read_text())["task"] == data.get_task(task).name


@pytest.mark.parametrize("kw", [
    {},
    # 40 rows, 16 per optimizer step: 3 steps per epoch; killed after step 2
    dict(gradient_accumulation_steps=2, lr_scheduler="cosine_with_restarts", save_steps=2),
    # 5 steps per epoch, 11 in all; killed after step 3
    dict(max_steps=11, eval_steps=4, save_steps=3, save_total_limit=1, logging_steps=2, lr_scheduler="polynomial"),
    dict(method="full", lr=1e-4, gradient_accumulation_steps=3, save_steps=1, lr_scheduler="constant_with_warmup",
         warmup_steps=2),
], ids=["epochs", "accumulation", "max-steps-eval-steps", "full"])
def test_resume_after_interruption_matches_an_uninterrupted_run(tiny_model, tmp_path, monkeypatch, kw):
    whole = train.train(_cfg(tiny_model, tmp_path / "whole", epochs=3, **kw), seed=0)

    saves = 0
    real_save = checkpoint._atomic_save

    def crash_after_first_epoch(obj, path):
        nonlocal saves
        real_save(obj, path)
        saves += 1
        if saves == 1:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoint, "_atomic_save", crash_after_first_epoch)
    cfg = _cfg(tiny_model, tmp_path / "split", epochs=3, **kw)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg, seed=0)
    resumed = train.train(train.TrainConfig(**{**cfg.__dict__, "resume": True}), seed=0)
    assert [h["dev"] for h in resumed["epochs"]] == [h["dev"] for h in whole["epochs"]]
    assert [h["train_loss"] for h in resumed["epochs"]] == [h["train_loss"] for h in whole["epochs"]]
    a = load_file(runfiles.weights_path(tmp_path / "whole" / "mrpc" / "seed0", cfg.method))
    b = load_file(runfiles.weights_path(tmp_path / "split" / "mrpc" / "seed0", cfg.method))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_configuration(tiny_model, tmp_path):
    train.train(_cfg(tiny_model, tmp_path, epochs=1), seed=0)
    with pytest.raises(ValueError, match="belongs to a run with another configuration"):
        train.train(_cfg(tiny_model, tmp_path, epochs=1, lr=5e-4, resume=True), seed=0)


def test_init_adapter_copies_factors_but_not_the_head(tiny_model, tmp_path):
    train.train(_cfg(tiny_model, tmp_path, task="rte", epochs=1), seed=0)
    source = tmp_path / "rte" / "seed0" / "adapter"
    task = data.get_task("stsb")
    _, model = load_classifier(tiny_model, task)
    train.attach_method(model, _cfg(tiny_model, tmp_path, task="stsb", init_adapter=str(source)))
    saved = load_file(source / "adapter_model.safetensors")
    layer = model.bert.encoder.layer[0].attention.self.query
    assert torch.equal(layer.lora_B["default"], saved["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"])
    _, other = load_classifier(tiny_model, task)
    with pytest.raises(ValueError, match="shape mismatches"):
        train.attach_method(other, _cfg(tiny_model, tmp_path, task="stsb", lora_r=4, init_adapter=str(source)))


def test_freeze_for_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'lora2'"):
        freeze_for(torch.nn.Linear(2, 2), "lora2", "classifier")


def test_fast_dropout_and_bf16_runs(tiny_model, tmp_path):
    from lorakit.fastops import FastDropout

    summary = train.train(_cfg(tiny_model, tmp_path, task="stsb", epochs=1, fast_dropout=True, precision="bf16"), seed=0)
    assert summary["config"]["fast_dropout"] and summary["config"]["precision"] == "bf16"
    assert -1.0 <= summary["best"]["dev"]["pearson"] <= 1.0
    _, model = load_classifier(tiny_model, data.get_task("mrpc"))
    train.attach_method(model, _cfg(tiny_model, tmp_path))
    from lorakit.fastops import use_fast_dropout

    assert use_fast_dropout(model) > 0 and any(isinstance(m, FastDropout) for m in model.modules())


def test_a_second_run_into_the_same_folder_is_refused_unless_resumed_or_overwritten(tiny_model, tmp_path):
    cfg = _cfg(tiny_model, tmp_path, epochs=1)
    first = train.train(cfg, seed=0)
    run = tmp_path / "mrpc" / "seed0"
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*")}
    with pytest.raises(ValueError, match=r"mrpc/seed0 holds a previous run \(log.jsonl, summary.json, curve.png, task.json"
                                         r"|holds a previous run .*pass --resume to continue it or --overwrite"):
        train.train(cfg, seed=0)
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing touched
    (run / "checkpoint-1-0-old.pt").write_text("a user's copy")  # not a checkpoint name: ignored, kept
    again = train.train(train.TrainConfig(**{**cfg.__dict__, "overwrite": True}), seed=0)
    assert [h["dev"] for h in again["epochs"]] == [h["dev"] for h in first["epochs"]]
    assert (run / "checkpoint-1-0-old.pt").read_text() == "a user's copy"
    assert len((run / "log.jsonl").read_text().splitlines()) == 1


def test_the_cli_refuses_in_one_line(tiny_model, tmp_path, capsys):
    from lorakit.cli import main

    args = ["train", "--model", tiny_model, "--data-dir", str(GLUE), "--out", str(tmp_path), "--epochs", "1",
            "--max-train-examples", "16", "--max-eval-examples", "8", "--max-length", "32", "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a previous run" in err and "--overwrite" in err


def test_resume_reads_checkpoints_older_than_a_new_field(tiny_model, tmp_path):
    cfg = _cfg(tiny_model, tmp_path, epochs=2)
    train.train(cfg, seed=0)
    path = tmp_path / "mrpc" / "seed0" / "checkpoint-1-0.pt"
    state = torch.load(path, weights_only=True)
    del state["config"]["label_smoothing"]  # as if written before the field existed
    for old, new in (("r", "lora_r"), ("alpha", "lora_alpha"), ("targets", "target_modules")):  # and the older names
        state["config"][old] = state["config"].pop(new)
    torch.save(state, path)
    (tmp_path / "mrpc" / "seed0" / "checkpoint-2-0.pt").unlink()
    resumed = train.train(train.TrainConfig(**{**cfg.__dict__, "resume": True}), seed=0)  # default value: same run
    assert len(resumed["epochs"]) == 2
    (tmp_path / "mrpc" / "seed0" / "checkpoint-2-0.pt").unlink()
    with pytest.raises(ValueError, match="belongs to a run with another configuration"):
        train.train(train.TrainConfig(**{**cfg.__dict__, "resume": True, "label_smoothing": 0.1}), seed=0)


def test_report_to_tensorboard_writes_readable_scalars(tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train.train(_cfg(tiny_model, tmp_path, epochs=2, report_to="tensorboard"), seed=0)
    events = EventAccumulator(str(tmp_path / "mrpc" / "seed0" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/examples_per_second", "dev/accuracy", "dev/f1"} <= tags
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == 2 * 5  # 40 rows / batch 8, two epochs
    assert [e.step for e in events.Scalars("dev/accuracy")] == [5, 10]
    with pytest.raises(ValueError, match="report_to must be one of \\('none', 'tensorboard'\\), got 'wandb'"):
        _cfg(tiny_model, tmp_path, report_to="wandb")
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(ValueError, match="needs the tensorboard package: pip install tensorboard"):
        train.train(_cfg(tiny_model, tmp_path / "other", report_to="tensorboard"), seed=0)


def _tiny_mpnet():
    from transformers import MPNetConfig, MPNetForSequenceClassification

    torch.manual_seed(0)
    cfg = MPNetConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    return MPNetForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("make", [tiny_bert, tiny_roberta, _tiny_mpnet], ids=["bert", "roberta", "mpnet"])
def test_mean_pooling_feeds_the_head_the_masked_mean(make):
    model = make()
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 10, 11, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        hidden = model.base_model(ids, attention_mask=mask).last_hidden_state
        keep = mask[..., None].float()
        mean = (hidden * keep).sum(1) / keep.sum(1)
        cls_logits = model(ids, attention_mask=mask).logits
        if hasattr(model, "bert"):  # BERT: pooler (dense + tanh) on position 0, then the classifier
            want = model.classifier(model.bert.pooler.activation(model.bert.pooler.dense(mean)))
        else:  # RoBERTa / MPNet: the head reads features[:, 0]
            want = model.classifier(mean[:, None])
        mean_pooling(model)
        got = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, :3], attention_mask=mask[1:, :3]).logits  # padding changes nothing
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(alone, got[1:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, cls_logits)


def test_pooling_is_trained_recorded_and_reloaded(tiny_model, tmp_path, capsys):
    from lorakit.cli import main
    from lorakit.tasks import lm

    train.train_seeds(_cfg(tiny_model, tmp_path, epochs=1, pooling="mean"))
    run = tmp_path / "mrpc" / "seed0"
    assert json.loads((run / "adapter" / "task.json").read_text())["pooling"] == "mean"
    best = json.loads((run / "summary.json").read_text())["best"]["dev"]["accuracy"]
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run / "adapter"), "--data-dir", str(GLUE), "--max-examples", "24",
                 "--max-length", "48"]) == 0
    assert f"{best:.2f}" in capsys.readouterr().out  # reloaded with mean pooling: the same dev accuracy
    # a merged HF classifier reads the first token: merging would change the answers, so it is refused
    assert main(["merge", "--adapter", str(run / "adapter"), "--out", str(tmp_path / "merged")]) == 2
    assert "trained with --pooling mean, but a merged Hugging Face classifier's head reads the first token" in \
        capsys.readouterr().err
    assert not (tmp_path / "merged").exists()
    with pytest.raises(ValueError, match="pooling must be 'cls' or 'mean'"):
        train.resolve_config(None, task="mrpc", pooling="max")
    with pytest.raises(ValueError, match="--pooling applies to classifiers"):
        lm.create(train.resolve_config(None, task="e2e", pooling="mean"))


def test_dora_rank_patterns_and_loraplus_train_and_save_their_adapter(tiny_model, tmp_path):
    import lorakit

    cfg = _cfg(tiny_model, tmp_path, epochs=1, use_dora=True, rank_pattern={"query": 2}, alpha_pattern={"value": 4.0},
               loraplus_lr_ratio=16.0)
    _, model = load_classifier(tiny_model, data.get_task("mrpc"))
    train.attach_method(model, cfg)
    layers = dict(lorakit.lora_layers(model))
    assert {n.rsplit(".", 1)[-1]: (layer.ranks["default"], layer.scaling("default")) for n, layer in layers.items()} == \
        {"query": (2, cfg.lora_alpha / 2), "value": (cfg.lora_r, 4.0 / cfg.lora_r)}
    optimizer, _ = train._optimizer(model, cfg, 10)
    b_factors = {id(layer.lora_B["default"]) for layer in layers.values()}
    b_group = next(g for g in optimizer.param_groups if any(id(p) in b_factors for p in g["params"]))
    assert b_group["lr"] == 16.0 * cfg.lr and {id(p) for p in b_group["params"]} >= b_factors
    assert any("lora_magnitude_vector" in n for n, p in model.named_parameters() if p.requires_grad)
    train.train_seeds(cfg)
    adapter = tmp_path / "mrpc" / "seed0" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert (saved["use_dora"], saved["rank_pattern"], saved["alpha_pattern"]) == (True, {"query": 2}, {"value": 4.0})
    assert sum(".lora_magnitude_vector" in k for k in load_file(adapter / "adapter_model.safetensors")) == 4
    _, fresh = load_classifier(tiny_model, data.get_task("mrpc"))
    lorakit.load_adapter(fresh, adapter)  # strict: every tensor where the config says


JSONL_ONLY = [("--prompt-field", "instruction"), ("--completion-field", "output"), ("--messages-field", "conversation"),
              ("--dataset-config", "en"), ("--train-split", "validation"), ("--dev-split", "test")]
OWN_FILES = [("--dev-ratio", "0.2"), ("--train-file", "rows.jsonl"), ("--dev-file", "dev.jsonl")]


@pytest.mark.parametrize("task", ["mrpc", "stsb", "e2e"])
@pytest.mark.parametrize(("flag", "value"), JSONL_ONLY + OWN_FILES, ids=[f for f, _ in JSONL_ONLY + OWN_FILES])
def test_glue_and_e2e_refuse_the_flags_of_your_own_data_by_name(task, flag, value, tmp_path, capsys, monkeypatch):
    from lorakit.cli import main

    monkeypatch.setattr(train, "_prepare", _never)
    assert main(["train", "--task", task, flag, value, "--out", str(tmp_path)]) == 2
    reader = ("--task jsonl (your own prompt/completion data)" if (flag, value) in JSONL_ONLY else
              "--task jsonl and --task classify (your own files)")
    assert capsys.readouterr().err.splitlines() == [f"lorakit: error: {flag} applies to {reader}, not to --task {task}"]


def _never(*args):
    raise AssertionError("refused flags must stop the run before the model loads")


def test_the_refusal_lists_every_flag_in_one_line(tmp_path, capsys, monkeypatch):
    from lorakit.cli import main

    monkeypatch.setattr(train, "_prepare", _never)
    assert main(["train", "--task", "mrpc", "--prompt-field", "a", "--train-split", "dev", "--dev-ratio", "0.3",
                 "--text-field", "t", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "lorakit: error: --text-field applies to --task classify (your own labelled files); --prompt-field, --train-split "
        "to --task jsonl (your own prompt/completion data); --dev-ratio to --task jsonl and --task classify (your own "
        "files), not to --task mrpc"]


@pytest.mark.parametrize(("flag", "value"), JSONL_ONLY, ids=[f for f, _ in JSONL_ONLY])
def test_classify_refuses_the_flags_of_jsonl_data(tiny_model, tmp_path, flag, value):
    cfg = train.resolve_config(None, task="classify", model=tiny_model, train_file="t.csv", text_field="t",
                               label_field="l", **{flag[2:].replace("-", "_"): value})
    with pytest.raises(ValueError, match=f"^{flag} applies to --task jsonl .*, not to --task classify$"):
        train.tasks.create(cfg)
