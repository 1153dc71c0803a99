"""GLUE readers on the real files in ../shared/data/glue and on hand-written tsv."""

from pathlib import Path

import pytest

from helpers import GLUE
from lorakit import data

needs_glue = pytest.mark.skipif(not GLUE.is_dir(), reason="../shared/data/glue not present")


@needs_glue
@pytest.mark.parametrize("task, split, rows, positives", [
    ("mrpc", "train", 3668, 2474), ("mrpc", "dev", 408, 279),
    ("rte", "train", 2490, 1241), ("rte", "dev", 277, 131),  # label 1 = not_entailment
    ("cola", "train", 8551, 6023), ("cola", "dev", 1043, 721),
    ("sst2", "dev", 872, 444), ("qnli", "dev", 5463, 2761),
    ("stsb", "train", 5749, None), ("stsb", "dev", 1500, None),
])
def test_official_row_counts(task, split, rows, positives):
    examples = data.read_split(data.get_task(task), split, GLUE)
    assert len(examples) == rows
    if positives is not None:
        assert sum(e.label for e in examples) == positives
    else:
        assert all(0.0 <= e.label <= 5.0 for e in examples)


@needs_glue
def test_pair_texts_and_bom_are_handled():
    first = data.read_split(data.get_task("mrpc"), "dev", GLUE)[0]
    assert first.label == 1 and first.texts[0].startswith("He said the foodservice pie business")
    assert len(first.texts) == 2 and first.texts[1].startswith('" The foodservice pie business')


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_mnli_and_qqp_layouts(tmp_path):
    mnli_cols = ["index", "promptID", "pairID", "genre", "s1bp", "s2bp", "s1p", "s2p", "sentence1", "sentence2", "label1", "gold_label"]
    row = ["0", "1", "2", "g", "", "", "", "", "A man.", "A person.", "entailment", "neutral"]
    _write(tmp_path / "MNLI" / "dev_mismatched.tsv", "\t".join(mnli_cols) + "\n" + "\t".join(row) + "\n")
    [ex] = data.read_split(data.get_task("mnli"), "dev_mismatched", tmp_path)
    assert ex.texts == ("A man.", "A person.") and ex.label == 1
    _write(tmp_path / "QQP" / "train.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t2\t3\tq a?\tq b?\t1\n")
    [ex] = data.read_split(data.get_task("qqp"), "train", tmp_path)
    assert ex.texts == ("q a?", "q b?") and ex.label == 1


def test_bad_inputs_name_the_path_and_expectation(tmp_path):
    with pytest.raises(ValueError, match=r"missing train split of mnli: expected the file .*MNLI/train.tsv"):
        data.read_split(data.get_task("mnli"), "train", tmp_path)
    _write(tmp_path / "RTE" / "dev.tsv", "index\tsentence1\thypothesis\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(ValueError, match=r"RTE/dev.tsv: missing column\(s\) \['sentence2'\]; expected \['label', 'sentence1', 'sentence2'\]"):
        data.read_split(data.get_task("rte"), "dev", tmp_path)
    _write(tmp_path / "RTE" / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match=r"RTE/dev.tsv:2: unknown label 'maybe'; expected one of \['entailment', 'not_entailment'\]"):
        data.read_split(data.get_task("rte"), "dev", tmp_path)
    _write(tmp_path / "STS-B" / "dev.tsv", "sentence1\tsentence2\tscore\na\tb\n")
    with pytest.raises(ValueError, match=r"STS-B/dev.tsv:2: expected at least 3 tab-separated fields, got 2"):
        data.read_split(data.get_task("stsb"), "dev", tmp_path)
    with pytest.raises(ValueError, match="unknown task 'wnli2'; choose one of cola, sst2"):
        data.get_task("wnli2")
    with pytest.raises(ValueError, match="no GLUE data found: pass --data-dir"):
        data.read_split(data.get_task("rte"), "dev", None)


def test_length_grouped_batches_cover_everything_once_and_group_lengths():
    lengths = [(i * 37) % 101 for i in range(1000)]
    batches = data.length_grouped_batches(lengths, 16, seed=0, epoch=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000))
    assert batches == data.length_grouped_batches(lengths, 16, seed=0, epoch=0)
    assert batches != data.length_grouped_batches(lengths, 16, seed=0, epoch=1)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 10  # random batches of 16 would span ~90


def test_collate_pads_to_the_longest_rounded_up():
    features = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]}, {"input_ids": [5], "attention_mask": [1]}]
    batch = data.collate(features, [1, 0], pad_id=0, regression=False, multiple=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].dtype.is_floating_point is False
    batch = data.collate(features, [1, 0], pad_id=0, regression=False)  # default: a multiple of 8
    assert batch["input_ids"].tolist() == [[5, 6, 7] + [0] * 5, [5] + [0] * 7]
    assert batch["attention_mask"].tolist() == [[1, 1, 1] + [0] * 5, [1] + [0] * 7]
    assert data.padded_width([8, 3]) == 8 and data.padded_width([9]) == 16


def test_the_hub_without_the_datasets_package_is_a_one_line_error(tiny_llama, tmp_path, monkeypatch, capsys):
    import sys

    from lorakit import cli

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: import raises ImportError
    for args in (["train", "--task", "rte", "--data-dir", "hub"],
                 ["train", "--task", "e2e", "--model", tiny_llama, "--data-dir", "hub"]):
        assert cli.main([*args, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "with the `datasets` package, which is not installed: pip install 'lorakit[hub]'" in err
