"""Training rows from any source (lorakit.training.datasets): each file format, save_to_disk
folders, the Hub path (load_dataset's arguments), the column mapping and its errors, and the
seeded dev hold-out of the jsonl task."""

import json
import sys
import types

import pytest

from lorakit import train
from lorakit.tasks import lm
from lorakit.training import datasets as ds

ALPACA = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
          {"instruction": "Say hello.", "input": "", "output": "Hello!"},
          {"instruction": "Name a colour.", "input": "", "output": "Blue"}]
MAPPED = [{"prompt": "Add the numbers.\n\n2 and 3", "completion": "5"},
          {"prompt": "Say hello.", "completion": "Hello!"},
          {"prompt": "Name a colour.", "completion": "Blue"}]
ALPACA_FIELDS = ds.Fields(prompt="instruction,input", completion="output")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_alpaca_rows_map_without_datasets(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # JSONL never needs the optional package
    assert lm.read_rows(_jsonl(tmp_path / "a.jsonl", ALPACA), ALPACA_FIELDS) == MAPPED
    only_instruction = lm.read_rows(str(tmp_path / "a.jsonl"), ds.Fields(prompt="instruction", completion="output"))
    assert only_instruction[0] == {"prompt": "Add the numbers.", "completion": "5"}


def test_other_formats_need_datasets_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    (tmp_path / "a.csv").write_text("instruction,input,output\nx,,y\n")
    with pytest.raises(ValueError, match=r"needs the `datasets` package, which is not installed: pip install 'lorakit\[hub\]'"):
        lm.read_rows(str(tmp_path / "a.csv"), ALPACA_FIELDS)


@pytest.mark.parametrize("kind", ["json", "csv", "parquet", "save_to_disk"])
def test_each_format_gives_the_same_rows(tmp_path, kind):
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_list(ALPACA)
    if kind == "json":
        path = tmp_path / "a.json"
        path.write_text(json.dumps(ALPACA))
    elif kind == "csv":
        path = tmp_path / "a.csv"
        table.to_csv(str(path), index=False)
    elif kind == "parquet":
        path = tmp_path / "a.parquet"
        table.to_parquet(str(path))
    else:
        path = tmp_path / "saved"
        datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(path))
        assert lm.read_rows(str(path), ALPACA_FIELDS, split="test") == MAPPED[:1]
        with pytest.raises(ValueError, match=r"has no split 'dev'; its splits: train, test"):
            lm.read_rows(str(path), ALPACA_FIELDS, split="dev")
    assert lm.read_rows(str(path), ALPACA_FIELDS) == MAPPED


def test_a_hub_name_goes_to_load_dataset_with_config_and_split(monkeypatch):
    calls = []

    def load_dataset(name, config=None, split=None, **kw):
        calls.append((name, config, split))
        return [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": split}]}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    rows = lm.read_rows("HuggingFaceH4/no_robots", ds.Fields(), split="test", config="default")
    assert calls == [("HuggingFaceH4/no_robots", "default", "test")]
    assert rows[0]["messages"][1]["content"] == "test"


@pytest.mark.parametrize("fields, message", [
    (dict(prompt="question", completion="output"), r"a\.jsonl:1: no column 'question'; its columns: 'instruction', "
                                                   r"'input', 'output' \(map them with --prompt-field"),
    (dict(messages="conversation"), r"a\.jsonl:1: no column 'conversation'; its columns: 'instruction'"),
    (dict(), r"a\.jsonl:1: .*'prompt' is missing; its columns: 'instruction', 'input', 'output'"),
])
def test_a_missing_column_names_the_columns_there_are(tmp_path, fields, message):
    path = _jsonl(tmp_path / "a.jsonl", ALPACA)
    with pytest.raises(ValueError, match=message):
        lm.read_rows(path, ds.Fields(**fields))


@pytest.mark.parametrize("name, message", [
    ("rows.txt", r"rows\.txt: unknown file type '\.txt'; --train-file and --dev-file take \.jsonl, \.json, \.csv, "
                 r"\.parquet files, a datasets save_to_disk folder or a Hub dataset name"),
    ("missing.parquet", r"no such file: .*missing\.parquet"),
    ("no_robots", r"no such file or folder: no_robots \(a Hub dataset is named owner/name"),
])
def test_sources_that_cannot_be_read_say_why(tmp_path, monkeypatch, name, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.txt").write_text("x\n")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace())
    with pytest.raises(ValueError, match=message):
        lm.read_rows(name)


def test_messages_field_and_mixing_with_prompt_fields_is_refused(tmp_path):
    rows = [{"chat": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    assert lm.read_rows(_jsonl(tmp_path / "c.jsonl", rows), ds.Fields(messages="chat")) == [{"messages": rows[0]["chat"]}]
    with pytest.raises(ValueError, match="cannot be combined with --prompt-field"):
        ds.Fields(prompt="a", messages="chat")


def test_jsonl_task_without_dev_holds_out_a_seeded_share(tiny_llama, tmp_path):
    rows = [{"instruction": f"count {i}", "output": str(i)} for i in range(20)]
    cfg = train.TrainConfig(task="jsonl", model=tiny_llama, train_file=_jsonl(tmp_path / "r.jsonl", rows),
                            prompt_field="instruction", completion_field="output", dev_ratio=0.25, progress=False)
    splits = []
    for _ in range(2):
        task = lm.create(cfg)
        tokenizer, _ = task.load_model(tiny_llama)
        training, dev = task.read(tokenizer)
        splits.append(([r["prompt"] for r in training.targets], [r["prompt"] for r in dev["dev"].targets]))
    (train_prompts, dev_prompts), again = splits
    assert again == (train_prompts, dev_prompts) and len(dev_prompts) == 5 and len(train_prompts) == 15
    assert sorted(train_prompts + dev_prompts) == sorted(f"count {i}" for i in range(20))


def test_dev_split_reads_the_same_source(tmp_path, monkeypatch):
    calls = []

    def load_dataset(name, config=None, split=None, **kw):
        calls.append(split)
        return [{"q": f"{split} question", "a": "answer"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    cfg = train.TrainConfig(task="jsonl", train_file="org/qa", dev_split="validation", prompt_field="q",
                            completion_field="a")
    task = lm.create(cfg)
    assert task._rows("dev") == [{"prompt": "validation question", "completion": "answer"}]
    assert task._rows("train") == [{"prompt": "train question", "completion": "answer"}]
    assert calls == ["validation", "train"]
