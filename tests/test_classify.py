"""``--task classify``: classifiers and regressors on the user's own CSV / JSONL files, end to end on a tiny
model (train, task.json, eval, merge, serve), the label rules, the refusals; and PEFT SEQ_CLS adapters with --task."""

import csv
import json
import shlex
from pathlib import Path

import pytest
import torch

import lorakit
from helpers import GLUE, randomize
from lorakit import cli, data, train
from lorakit.metrics import macro_f1
from lorakit.tasks import classify
from lorakit.tasks.glue import load_classifier

ROOT = Path(__file__).resolve().parents[1]

PREMISES = ["A man plays a guitar.", "Two dogs run in a park.", "The cafe is closed today.", "She reads a long novel.",
            "Kids build a sandcastle.", "The train left at noon."]
HYPOTHESES = ["Someone makes music.", "Animals are outside.", "Nobody is in the cafe.", "A woman sleeps.",
              "Children are at a beach.", "A bus arrived."]
LABELS = ["entailment", "neutral", "contradiction"]
TINY = ["--epochs", "1", "--batch-size", "8", "--lr", "0.05", "--max-length", "32", "--no-progress"]


def _pairs(n: int, offset: int = 0) -> list[dict]:
    return [{"premise": PREMISES[(i + offset) % 6], "hypothesis": HYPOTHESES[(i * 5 + offset) % 6],
             "label": LABELS[(i + offset) % 3]} for i in range(n)]


def _write_csv(path: Path, rows: list[dict]) -> str:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _train(tiny_model, out: Path, *flags: str) -> Path:
    assert cli.main(["train", "--task", "classify", "--model", tiny_model, "--out", str(out), *TINY, *flags]) == 0
    return out / "seed0"


def _logits(model, tokenizer, pairs: list[tuple[str, ...]]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**tokenizer(*zip(*pairs), padding=True, return_tensors="pt")).logits


def test_a_csv_classifier_trains_evaluates_merges_and_serves_with_its_label_names(tiny_model, tmp_path, capsys):
    from fastapi.testclient import TestClient
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorakit.serving.classify import Engine
    from lorakit.serving.config import ServeConfig
    from lorakit.serving.server import create_app

    train_file, dev_file = _write_csv(tmp_path / "train.csv", _pairs(24)), _write_csv(tmp_path / "dev.csv", _pairs(9, 1))
    run = _train(tiny_model, tmp_path / "run", "--train-file", train_file, "--dev-file", dev_file,
                 "--text-field", "premise", "--text-pair-field", "hypothesis", "--label-field", "label")
    adapter = run / "adapter"
    info = json.loads((adapter / "task.json").read_text())
    assert info["labels"] == ["contradiction", "entailment", "neutral"]  # sorted: the model's outputs 0, 1, 2
    assert (info["task"], info["problem_type"], info["text_fields"], info["label_field"]) == \
        ("classify", "single_label_classification", ["premise", "hypothesis"], "label")
    best = json.loads((run / "summary.json").read_text())["best"]["dev"]
    assert set(best) == {"accuracy", "macro_f1"}
    capsys.readouterr()

    assert cli.main(["eval", "--adapter", str(adapter), "--dev-file", dev_file, "--max-length", "32"]) == 0
    assert json.loads(capsys.readouterr().out)["dev"] == pytest.approx(best)  # the best epoch's dev figures again

    assert cli.main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["id2label"] == {"0": "contradiction", "1": "entailment", "2": "neutral"}
    assert config["label2id"] == {"contradiction": 0, "entailment": 1, "neutral": 2}
    assert config["problem_type"] == "single_label_classification"
    pairs = [(r["premise"], r["hypothesis"]) for r in _pairs(6)]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    _, adapted = load_classifier(tiny_model, classify.task_of(info))
    lorakit.load_adapter(adapted, adapter)
    expected = _logits(adapted, tokenizer, pairs)
    torch.testing.assert_close(_logits(merged, tokenizer, pairs), expected, rtol=1e-5, atol=1e-5)
    _, base = load_classifier(tiny_model, classify.task_of(info))
    assert not torch.allclose(_logits(base, tokenizer, pairs), expected, atol=1e-3)  # the adapter changes the answers

    engine = Engine(tiny_model, "fp32")
    with TestClient(create_app(engine, ServeConfig(), {"nli": str(adapter)})) as client:
        listed = client.get("/v1/adapters").json()["adapters"]
        receipt = listed[0].pop("receipt")  # the trained adapter, checked through the engine at start-up
        assert receipt["status"] == "verified" and receipt["tolerance"] == "fp32", receipt
        assert listed == [{"name": "nli", "task": "classify", "labels": info["labels"], "inputs_per_row": 2,
                           "pooling": "cls"}]
        reply = client.post("/v1/classify", json={"adapter": "nli", "inputs": [list(p) for p in pairs]}).json()
    assert reply["label_names"] == info["labels"]
    assert reply["labels"] == [info["labels"][i] for i in expected.argmax(-1).tolist()]
    torch.testing.assert_close(torch.tensor(reply["scores"]), expected.softmax(-1), rtol=1e-4, atol=1e-5)


def test_a_jsonl_classifier_without_a_dev_file_holds_out_an_announced_seeded_split(tiny_model, tmp_path, capsys):
    rows = [{"text": f"{w} example number {i}", "topic": w} for i, w in enumerate(["sports", "music", "news", "food"] * 5)]
    train_file = _write_jsonl(tmp_path / "train.jsonl", rows)
    flags = ["--train-file", train_file, "--text-field", "text", "--label-field", "topic", "--dev-ratio", "0.25"]
    run = _train(tiny_model, tmp_path / "run", *flags, "--seeds", "0,1")
    printed = capsys.readouterr().out
    assert f"no --dev-file: holding out 5 of the 20 rows of {train_file} as the dev split (--dev-ratio 0.25, seeded" in printed
    assert "15 training rows, 5 dev rows" in printed
    assert json.loads((run / "adapter" / "task.json").read_text())["labels"] == ["food", "music", "news", "sports"]
    cfg = train.resolve_config(None, task="classify", model=tiny_model, train_file=train_file, text_field="text",
                               label_field="topic", dev_ratio=0.25)
    task = classify.create(cfg)
    first = task.read(task.load_model(tiny_model)[0])[1]["dev"]
    again = classify.create(cfg).read(task.load_model(tiny_model)[0])[1]["dev"]
    assert first.features == again.features and first.targets == again.targets  # the same rows every time


def test_float_labels_train_a_regression_that_merges_as_one(tiny_model, tmp_path, capsys):
    rows = [{"a": PREMISES[i % 6], "b": HYPOTHESES[(i * 5) % 6], "score": round(0.37 * i % 5, 2)} for i in range(20)]
    train_file = _write_csv(tmp_path / "sts.csv", rows)
    run = _train(tiny_model, tmp_path / "run", "--train-file", train_file, "--text-field", "a", "--text-pair-field", "b",
                 "--label-field", "score")
    info = json.loads((run / "adapter" / "task.json").read_text())
    assert (info["problem_type"], info["labels"]) == ("regression", None)
    assert set(json.loads((run / "summary.json").read_text())["best"]["dev"]) == {"pearson", "spearman"}
    assert cli.main(["merge", "--adapter", str(run / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert (config["problem_type"], len(config["id2label"])) == ("regression", 1)


def _rows(*labels) -> list[classify.Row]:
    return [classify.Row(("text",), label, f"f.csv:{i + 2}") for i, label in enumerate(labels)]


@pytest.mark.parametrize("labels, problem_type, expected", [
    (("pos", "neg", "pos", "mixed"), None, (("mixed", "neg", "pos"), "single_label_classification")),
    ((10, 2, 1, 2), None, (("1", "2", "10"), "single_label_classification")),  # integers in numeric order
    ((12345678901234567891, 2), None, (("2", "12345678901234567891"), "single_label_classification")),  # exact names
    ((1.0, 2, "3"), None, (("1", "2", "3"), "single_label_classification")),  # "3" in a CSV is the number 3
    (("true", "false"), None, (("false", "true"), "single_label_classification")),
    ((0.5, 4.2, 3), None, (None, "regression")),  # a fractional number: a score, as STS-B
    (("pos", 0.5), None, (("0.5", "pos"), "single_label_classification")),  # names among them: all are names
    ((1, 2, 5, 3), "regression", (None, "regression")),
    ((0.5, 1.5, 0.5), "single_label_classification", (("0.5", "1.5"), "single_label_classification")),
])
def test_labels_are_discovered_by_the_documented_rules(labels, problem_type, expected):
    assert classify.discover_labels(_rows(*labels), problem_type) == expected


def test_problem_type_overrides_what_the_labels_suggest(tiny_model, tmp_path):
    train_file = _write_jsonl(tmp_path / "stars.jsonl", [{"review": f"review {i}", "stars": 1 + i % 5} for i in range(10)])
    common = dict(task="classify", model=tiny_model, train_file=train_file, text_field="review", label_field="stars")
    assert classify.create(train.resolve_config(None, **common)).info()["labels"] == ["1", "2", "3", "4", "5"]
    info = classify.create(train.resolve_config(None, **common, problem_type="regression")).info()
    assert (info["problem_type"], info["labels"]) == ("regression", None)
    with pytest.raises(ValueError, match="problem_type must be single_label_classification or regression, got 'multi'"):
        train.resolve_config(None, **common, problem_type="multi")


@pytest.mark.parametrize("name, content, message", [
    ("f.csv", "text,label\nfine,pos\n,neg\n", "f.csv:3: the text field 'text' is empty"),
    ("f.csv", "text,label\nfine,pos\nalso fine,\n", "f.csv:3: the label field 'label' is empty"),
    ("f.csv", "text,label\nfine,pos\nno label\n", "f.csv:3: the label field 'label' is missing"),
    ("f.csv", "text,tag\nfine,pos\n", r"f.csv: no column\(s\) \['label'\] in the header \['text', 'tag'\]"),
    ("f.jsonl", '{"text": "fine", "label": "pos"}\n{"text": "x"}\n', "f.jsonl:2: the label field 'label' is missing"),
    ("f.jsonl", '{"text": null, "label": "pos"}\n', "f.jsonl:1: the text field 'text' is missing"),
    ("f.jsonl", '{"text": 5, "label": "pos"}\n', "f.jsonl:1: the text field 'text' must be a string, got int"),
    ("f.jsonl", '{"text": "a", "label": ["x", "y"]}\n', "f.jsonl:1: the label field 'label' must be a string or a number, got list"),
    ("f.jsonl", '{"text": "a", "label": NaN}\n', "f.jsonl:1: the label nan is not a finite number"),
    ("f.jsonl", '\n{"text": "a", "label": \n', r"f.jsonl:2: not valid JSON"),
    ("f.txt", "text,label\n", "--task classify reads .csv and .jsonl files, not '.txt'"),
    ("f.csv", "text,label\n", "f.csv: no rows"),
])
def test_bad_rows_are_refused_naming_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        classify.read_rows(tmp_path / name, ("text",), "label")


@pytest.mark.parametrize("labels, message", [
    (("pos", "pos"), "every row has the label 'pos'; a classifier needs at least two classes"),
])
def test_one_class_is_refused(labels, message):
    with pytest.raises(ValueError, match=message):
        classify.discover_labels(_rows(*labels))


def test_regression_refuses_a_word_and_the_cli_says_it_in_one_line(tiny_model, tmp_path, capsys):
    with pytest.raises(ValueError, match="f.csv:3: the label 'high' is not a number; regression"):
        classify.discover_labels(_rows(0.5, "high"), "regression")
    bad = _write_csv(tmp_path / "bad.csv", [{"text": "fine", "label": "a"}, {"text": " ", "label": "b"}])
    assert cli.main(["train", "--task", "classify", "--model", tiny_model, "--train-file", bad, "--text-field", "text",
                     "--label-field", "label", "--out", str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err
    assert err == f"lorakit: error: {bad}:3: the text field 'text' is empty\n"


def test_dev_labels_unseen_in_training_are_refused_by_name(tiny_model, tmp_path, capsys):
    train_file = _write_csv(tmp_path / "train.csv", _pairs(12))
    dev = _pairs(4) + [{"premise": "x", "hypothesis": "y", "label": "unsure"}]
    dev_file = _write_csv(tmp_path / "dev.csv", dev)
    assert cli.main(["train", "--task", "classify", "--model", tiny_model, "--train-file", train_file, "--dev-file",
                     dev_file, "--text-field", "premise", "--text-pair-field", "hypothesis", "--label-field", "label",
                     "--out", str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err
    assert f"label(s) 'unsure' ({dev_file}:6) are not among the classes ['contradiction', 'entailment', 'neutral'] " \
           f"of {train_file}" in err and err.count("\n") == 1


@pytest.mark.parametrize("values, message", [
    (dict(task="classify"), "--task classify needs --train-file, --text-field, --label-field"),
    (dict(task="classify", dev_ratio=1.0), "dev_ratio must be between 0 and 1"),
    (dict(task="mrpc", text_field="sentence"), "--text-field applies to --task classify .* not to --task mrpc"),
    (dict(task="jsonl", train_file="t", dev_file="d", label_field="y"), "--label-field applies to --task classify"),
])
def test_classify_settings_are_checked(values, message):
    with pytest.raises(ValueError, match=message):
        train.tasks.create(train.resolve_config(None, **values))


def test_macro_f1_is_the_mean_of_each_class_f1():
    import numpy as np

    pred, gold = np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1])
    # class 0: tp 1, fp 1 -> 2/3; class 1: tp 1, fn 2 -> 2/4; class 2: fp 1 -> 0
    assert macro_f1(pred, gold) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert data.TASKS["mrpc"].metrics == ("accuracy", "f1")  # GLUE keeps the paper's binary F1


def test_task_json_of_a_classify_adapter_is_checked():
    good = {"task": "classify", "problem_type": "single_label_classification", "labels": ["a", "b"],
            "text_fields": ["t"], "label_field": "y"}
    assert classify.task_of(good).labels == ("a", "b")
    assert classify.task_of({"task": "sts-b"}).name == "stsb"
    for bad, message in [({"labels": ["a", "a"]}, "'labels' must be a list of at least two distinct class names"),
                         ({"text_fields": []}, "'text_fields' must be a list of one or two field names"),
                         ({"problem_type": None}, "--task classify needs the task.json that lorakit train --task classify writes")]:
        with pytest.raises(ValueError, match=message):
            classify.task_of({**good, **bad})


def test_the_readme_classify_commands_run_as_written(tiny_model, tmp_path, monkeypatch, capsys):
    """The README's own-data commands, in a folder holding the files they name; train gets the tiny model."""
    from test_readme import commands

    readme = commands(ROOT / "README.md")
    wanted = ["lorakit train --task classify --train-file reviews.csv --text-field review --label-field sentiment",
              "lorakit eval  --adapter runs/classify/seed0/adapter --dev-file reviews-test.csv",
              "lorakit merge --adapter runs/classify/seed0/adapter --out merged-reviews/"]
    for command in wanted:
        assert command in readme, f"the README no longer has `{command}`: update this test with it"
    monkeypatch.chdir(tmp_path)
    words = {"positive": ["great", "lovely", "superb"], "negative": ["awful", "dull", "poor"]}
    rows = [{"review": f"a {w} film, take {i}", "sentiment": s} for i in range(4) for s, ws in words.items() for w in ws]
    _write_csv(tmp_path / "reviews.csv", rows)
    _write_csv(tmp_path / "reviews-test.csv", rows[:6])
    for command in wanted:
        args = shlex.split(command)[1:] + (["--model", tiny_model, *TINY] if command.startswith("lorakit train") else [])
        assert cli.main(args) == 0, command
    assert "holding out 2 of the 24 rows of reviews.csv" in capsys.readouterr().out
    assert json.loads((tmp_path / "merged-reviews" / "config.json").read_text())["id2label"] == \
        {"0": "negative", "1": "positive"}


# ---- PEFT's SEQ_CLS adapters (no task.json): the task named with --task ------------------------------------------------


@pytest.fixture
def peft_seq_cls(tiny_model, tmp_path):
    """A LoRA adapter written by PEFT for a 2-label classifier (task_type SEQ_CLS: the head saved whole)."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                       task_type="SEQ_CLS"))
    randomize(theirs, std=0.3)
    with torch.no_grad():
        theirs.base_model.model.classifier.modules_to_save["default"].weight.normal_(0, 30)
    theirs.save_pretrained(tmp_path / "peft")
    return str(tmp_path / "peft"), theirs.eval()


@pytest.mark.skipif(not GLUE.is_dir(), reason="../shared/data/glue not present")
def test_a_peft_seq_cls_adapter_is_evaluated_and_merged_with_task(peft_seq_cls, tiny_model, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder, theirs = peft_seq_cls
    assert cli.main(["eval", "--adapter", folder, "--data-dir", str(GLUE), "--max-examples", "16"]) == 2
    assert "cannot tell the task and model of" in capsys.readouterr().err
    assert cli.main(["eval", "--adapter", folder, "--task", "mrpc", "--data-dir", str(GLUE), "--max-examples", "16",
                     "--max-length", "32"]) == 0
    assert set(json.loads(capsys.readouterr().out)["dev"]) == {"accuracy", "f1"}
    assert cli.main(["eval", "--adapter", folder, "--task", "mrpc", "--dev-file", "dev.csv"]) == 2
    assert "--dev-file applies to adapters of --task classify; the GLUE task mrpc reads --data-dir" in capsys.readouterr().err
    assert cli.main(["merge", "--adapter", folder, "--task", "mrpc", "--out", str(tmp_path / "merged")]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    pairs = [(p, h) for p, h in zip(PREMISES, HYPOTHESES)]
    torch.testing.assert_close(_logits(merged, tokenizer, pairs), _logits(theirs, tokenizer, pairs), rtol=1e-5, atol=1e-5)
    assert cli.main(["merge", "--adapter", folder, "--task", "classify", "--out", str(tmp_path / "m2")]) == 2
    assert "--task classify needs the task.json that lorakit train --task classify writes" in capsys.readouterr().err


def test_a_peft_seq_cls_adapter_is_served_with_task(peft_seq_cls, tiny_model, monkeypatch):
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer

    from lorakit.serving import server as serve
    from lorakit.serving.classify import Engine
    from lorakit.serving.config import ServeConfig
    from lorakit.serving.server import create_app

    folder, theirs = peft_seq_cls
    engine = Engine(tiny_model, "fp32")
    with pytest.raises(ValueError, match="has no task.json; give the adapter's GLUE task"):
        create_app(engine, ServeConfig(), {"p": folder})
    pairs = [[p, h] for p, h in zip(PREMISES, HYPOTHESES)]
    expected = _logits(theirs, AutoTokenizer.from_pretrained(tiny_model), pairs).softmax(-1)
    with TestClient(create_app(engine, ServeConfig(), {"p": folder}, task="mrpc")) as client:
        reply = client.post("/v1/classify", json={"adapter": "p", "inputs": pairs}).json()
        torch.testing.assert_close(torch.tensor(reply["scores"]), expected, rtol=1e-4, atol=1e-5)
        loaded = client.post("/v1/adapters", json={"name": "q", "path": folder, "task": "rte"})
        assert loaded.status_code == 201 and loaded.json()["labels"] == ["entailment", "not_entailment"]
    seen = {}
    monkeypatch.setattr(serve, "serve", lambda *args: seen.update(args=args))
    assert cli.main(["serve", "--model", tiny_model, "--adapter", f"p={folder}", "--task", "mrpc"]) == 0
    assert seen["args"][-1] == "mrpc"  # serve(..., quantize, task)
