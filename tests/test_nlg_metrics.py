"""E2E NLG metrics: the official scorer's figures on ../shared/data/e2e/metrics-example, small cases by hand,
the readers on hand-written files."""

import math
import re
import shutil
import warnings
from itertools import groupby
from pathlib import Path

import pytest

from lorakit import nlg_metrics
from lorakit.nlg_metrics import (
    METRICS,
    mteval_scores,
    mteval_tokenize,
    ptb_tokenize,
    read_e2e_csv,
    read_predictions,
    read_references,
    score,
)

E2E = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e"
EXAMPLE = E2E / "metrics-example"
needs_e2e = pytest.mark.skipif(not EXAMPLE.is_dir(), reason="../shared/data/e2e not present")
HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="java not on PATH")

# `measure_scores.py devel-conc.txt baseline-output.txt` (Perl mteval-v13a), from metrics-example/README.md.
OFFICIAL = {"BLEU": 0.7203, "NIST": 7.8212, "METEOR": 0.4801, "ROUGE_L": 0.7910, "CIDEr": 2.3039}


@pytest.fixture(scope="module")
def example():
    return read_references(EXAMPLE / "devel-conc.txt"), read_predictions(EXAMPLE / "baseline-output.txt")


@pytest.fixture(scope="module")
def example_scores(example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # without java: METEOR is None, its test skips
        return score(*example)


@needs_e2e
@pytest.mark.parametrize("metric", METRICS)
def test_example_matches_the_official_scorer(example_scores, metric):
    if metric == "METEOR" and not HAS_JAVA:
        pytest.skip("METEOR needs java")
    assert round(example_scores[metric], 4) == OFFICIAL[metric]


@needs_e2e
def test_without_java_meteor_is_none_and_the_rest_still_match(example, monkeypatch):
    monkeypatch.setattr(nlg_metrics.shutil, "which", lambda name: None)
    with pytest.warns(RuntimeWarning, match="java not found on PATH: METEOR not computed"):
        got = score(*example)
    assert list(got) == list(METRICS) and got["METEOR"] is None
    assert {k: round(v, 4) for k, v in got.items() if v is not None} == {k: v for k, v in OFFICIAL.items() if k != "METEOR"}


@needs_e2e
@needs_java
def test_meteor_false_reports_none_without_warning(example):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = score(*example, meteor=False)
    assert got["METEOR"] is None and round(got["CIDEr"], 4) == OFFICIAL["CIDEr"]


def test_bleu_by_hand():
    bleu = lambda ref, hyp: mteval_scores([[ref]], [hyp])["BLEU"]  # noqa: E731
    # precisions 5/6, 3/5, 2/4, 1/3; equal lengths
    assert bleu("the cat sat on a mat", "the cat sat on the mat") == pytest.approx((1 / 12) ** 0.25)
    # no 3- or 4-grams to test: mteval counts those orders as precision 1; brevity penalty exp(1 - 3/2)
    assert bleu("the cat sat", "the cat") == pytest.approx(math.exp(-0.5))
    # smoothing: the k-th order with no match counts 1 / (2^k * tested): 3/4, 1/3, 1/(2*2), 1/(4*1)
    assert bleu("a b x d", "a b c d") == pytest.approx((1 / 64) ** 0.25)
    # closest reference length, ties to the shorter: 2 and 4 words around 3, so no penalty
    assert mteval_scores([["a b c d", "a b"]], ["a b c"])["BLEU"] == pytest.approx(1.0)


def test_nist_by_hand():
    # counts over both references (6 words): a 2, b 2, c 1, "a b" 2, "b c" 1, "a b c" 1
    # info(a) = info(b) = log2(6/2), info(c) = log2(6), info(a b) = 0, info(b c) = log2(2), info(a b c) = log2(2)
    want = (2 * math.log2(3) + math.log2(6)) / 3 + (0 + 1) / 2 + 1 / 1
    assert mteval_scores([["a b c", "a b d"]], ["a b c"])["NIST"] == pytest.approx(want)


def test_mteval_tokenize_matches_mteval_v13a():
    # checked against mteval-v13a's own `tokenization` subroutine under Perl
    got = mteval_tokenize("It's £20-25, e.g. 3.5 stars.  AT&amp;T <skipped> Café")
    assert got == ["it's", "£20", "-", "25", ",", "e", ".", "g", ".", "3.5", "stars", ".", "at", "&", "t", "café"]


def test_ptb_tokenize_matches_the_jar_on_tricky_cases():
    # outputs of stanford-corenlp-3.4.1's PTBTokenizer (-preserveLines -lowerCase) less coco-caption's punctuation;
    # "L." stays an initial unless a sentence-opening word follows it, even on the next line
    captions = ["The Eagle's £20-25 menu (cheap), near St. John's College.",
                'It isn\'t family-friendly; it\'s in the city center., near "Café Rouge"...',
                "Prices are 20-25 L.", "The food is French.", "Prices are 20-25 L.", "near the river."]
    assert ptb_tokenize(captions) == [
        "the eagle 's # 20-25 menu -lrb- cheap -rrb- near st. john 's college",
        "it is n't family-friendly it 's in the city center. near café rouge",
        "prices are 20-25 l", "the food is french", "prices are 20-25 l.", "near the river"]


@needs_e2e
@needs_java
def test_ptb_tokenize_matches_the_jar_on_the_dev_references():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = [ref for group in read_e2e_csv(E2E / "devset.csv")[1] for ref in group]
    jar = PTBTokenizer().tokenize({i: [{"caption": ref}] for i, ref in enumerate(refs)})
    assert ptb_tokenize(refs) == [jar[i][0] for i in range(len(refs))]


def test_length_mismatch_and_empty_input_are_rejected():
    with pytest.raises(ValueError, match="references has 2 groups but predictions has 1 entries"):
        score([["a"], ["b"]], ["a"])
    with pytest.raises(ValueError, match="predictions is empty"):
        score([], [])
    with pytest.raises(ValueError, match=r"references\[1\] is 'b'; each entry must be a non-empty list"):
        mteval_scores([["a"], "b"], ["a", "b"])
    with pytest.raises(ValueError, match=r"references\[0\] is \[\]"):
        mteval_scores([[]], ["a"])


def test_read_references_groups_on_blank_lines(tmp_path):
    path = tmp_path / "refs.txt"
    path.write_text("a one\n a two \n\nb one\n\n\n", encoding="utf-8")  # trailing blank lines are fine
    assert read_references(path) == [["a one", "a two"], ["b one"]]
    path.write_text("a\nb\nc\n", encoding="utf-8")  # no blank line at all: one reference per instance
    assert read_references(path) == [["a"], ["b"], ["c"]]
    path.write_text("a\n\n\nb\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: a blank line that opens an empty reference group")):
        read_references(path)


def test_read_predictions_keeps_blank_lines(tmp_path):
    path = tmp_path / "pred.txt"
    path.write_text("one \n\nthree\n", encoding="utf-8")
    assert read_predictions(path) == ["one", "", "three"]


def test_read_e2e_csv_groups_by_mr_in_order_of_first_appearance(tmp_path):
    path = tmp_path / "set.csv"
    path.write_text('mr,ref\n"name[A], food[French]","A serves French food."\n"name[B]","B, near A."\n'
                    '"name[A], food[French]",A again.\n', encoding="utf-8")
    assert read_e2e_csv(path) == (["name[A], food[French]", "name[B]"], [["A serves French food.", "A again."], ["B, near A."]])
    path.write_text("meaning,text\nx,y\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}: expected a header with 'mr' and 'ref' columns")):
        read_e2e_csv(path)


@needs_e2e
def test_dev_csv_groups_equal_the_official_consecutive_grouping():
    import csv

    with open(E2E / "devset.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    runs = [[row["ref"] for row in run] for _, run in groupby(rows, key=lambda row: row["mr"])]
    mrs, groups = read_e2e_csv(E2E / "devset.csv")
    assert groups == runs and len(mrs) == len(set(mrs)) == 547
