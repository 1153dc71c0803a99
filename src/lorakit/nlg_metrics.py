"""E2E NLG Challenge metrics, scored as the official scorer (``tuetschek/e2e-metrics``) scores them.

* BLEU and NIST are mteval-v13a's (the Perl script the official scorer runs by default): its own
  tokenisation, corpus-level sums, BLEU-4 with the closest reference length and mteval's smoothing,
  NIST-5 with information weights ``info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn))`` from all
  references (Doddington 2002), written out in Python below.
* METEOR (1.5, ``-l en -norm``, statistics summed over the corpus), ROUGE-L (beta = 1.2) and CIDEr-D
  (document frequencies from the references) are coco-caption's, run through the ``pycocoevalcap``
  package (the same jars as the official scorer) on text lowercased and split by Stanford's
  PTBTokenizer, with punctuation tokens dropped.

METEOR and the PTBTokenizer are Java programs. Without ``java`` on PATH, :func:`score` warns, reports
``METEOR`` as ``None`` and splits text with :func:`ptb_tokenize`, a Python emulation of the PTBTokenizer
that gives the jar's output on every E2E reference (train, dev and test).
"""

from __future__ import annotations

import csv
import math
import re
import shutil
import warnings
from collections import Counter
from pathlib import Path

__all__ = ["METRICS", "score", "mteval_scores", "mteval_tokenize", "ptb_tokenize", "read_references", "read_predictions",
           "read_e2e_csv"]

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")


def _check(references: list[list[str]], predictions: list[str]) -> None:
    if len(references) != len(predictions):
        raise ValueError(f"references has {len(references)} groups but predictions has {len(predictions)} entries; "
                         "pass one reference group (a list of strings) per prediction")
    if not predictions:
        raise ValueError("predictions is empty; pass at least one prediction with its reference group")
    for i, group in enumerate(references):
        if isinstance(group, str) or not group:
            raise ValueError(f"references[{i}] is {group!r}; each entry must be a non-empty list of reference strings")


# --- mteval-v13a: tokenisation, BLEU, NIST --------------------------------------------------------

_PERL_SPACE = "[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+"  # Perl's \s
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")  # Perl's tr/[A-Z]/[a-z]/


def mteval_tokenize(text: str) -> list[str]:
    """mteval-v13a's default normalisation: entities, ASCII lowercase, punctuation split off (``.``, ``,``
    unless between digits; ``-`` after a digit); whitespace is collapsed first, as its SGML reader does."""
    t = re.sub(_PERL_SPACE, " ", text).replace("<skipped>", "")
    t = t.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    t = f" {t} ".translate(_ASCII_LOWER)
    t = re.sub(r"([{-~\[-` -&(-+:-@/])", r" \1 ", t)
    t = re.sub(r"([^0-9])([.,])", r"\1 \2 ", t)
    t = re.sub(r"([.,])([^0-9])", r" \1 \2", t)
    t = re.sub(r"([0-9])(-)", r"\1 \2 ", t)
    t = re.sub(_PERL_SPACE, " ", t).strip(" ")
    return t.split(" ") if t else []


def _ngrams(words: list[str], n_max: int = 5) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i:i + n]) for n in range(1, n_max + 1) for i in range(len(words) - n + 1))


def _closest_ref_length(hyp_len: int, ref_lens: list[int]) -> int:
    """mteval's closest reference length (ties to the shorter); empty references after the first are skipped."""
    candidates = ref_lens[:1] + [r for r in ref_lens[1:] if r]
    return min(candidates, key=lambda r: (abs(hyp_len - r), r))


def mteval_scores(references: list[list[str]], predictions: list[str]) -> dict[str, float]:
    """``{"BLEU", "NIST"}``: corpus BLEU-4 and NIST-5 as mteval-v13a computes them (no Java needed)."""
    _check(references, predictions)
    refs = [[mteval_tokenize(r) for r in group] for group in references]
    hyps = [mteval_tokenize(p) for p in predictions]
    counts: Counter[tuple[str, ...]] = Counter()
    for group in refs:
        for ref in group:
            counts.update(_ngrams(ref))
    total_words = sum(len(ref) for group in refs for ref in group)

    def info(gram: tuple[str, ...]) -> float:
        # mteval tests the (n-1)-gram string for truth, so a context that is the word "0" counts as none.
        context = counts[gram[:-1]] if gram[:-1] not in ((), ("0",)) else total_words
        return -math.log(counts[gram] / context) / math.log(2)

    match, tested, gained = [0] * 6, [0] * 6, [0.0] * 6  # index n = n-gram order
    ref_length = ref_words = nonempty_refs = 0
    for hyp, group in zip(hyps, refs):
        ref_max: Counter[tuple[str, ...]] = Counter()
        for ref in group:
            ref_max |= _ngrams(ref)
        for gram, count in _ngrams(hyp).items():
            clipped = min(count, ref_max[gram])
            if clipped:
                match[len(gram)] += clipped
                gained[len(gram)] += info(gram) * clipped
        for n in range(1, 6):
            tested[n] += max(len(hyp) - n + 1, 0)
        ref_length += _closest_ref_length(len(hyp), [len(ref) for ref in group])
        ref_words += sum(len(ref) for ref in group)
        nonempty_refs += sum(1 for ref in group if ref)

    log_bleu, smooth = 0.0, 1
    for n in range(1, 5):  # mteval's smoothing: a zero match count becomes 1/2^k for the k-th such order
        if tested[n] and not match[n]:
            smooth *= 2
            log_bleu += math.log(1 / (smooth * tested[n]))
        elif tested[n]:
            log_bleu += math.log(match[n] / tested[n])
    brevity = math.exp(min(0.0, 1 - ref_length / tested[1])) if tested[1] else 0.0
    ratio = tested[1] / (ref_words / (nonempty_refs / len(refs)))  # to the average reference length
    beta = -math.log(0.5) / math.log(1.5) ** 2  # NIST's length penalty is 0.5 at 2/3 of it
    penalty = 1.0 if ratio >= 1 else 0.0 if ratio <= 0 else math.exp(-beta * math.log(ratio) ** 2)
    nist = sum(gained[n] / max(tested[n], 1) for n in range(1, 6)) * penalty
    return {"BLEU": math.exp(log_bleu / 4) * brevity, "NIST": nist}


# --- Stanford PTBTokenizer emulation (coco-caption's tokenizer, for machines without java) ----------

_ABBREVIATIONS = (
    "mr|mrs|ms|dr|prof|st|rd|ave|blvd|jr|sr|inc|co|corp|ltd|bros|assn|univ|dept|mfg|est|ext|etc|vs|al|cf|esq|messrs|mme"
    "|mlle|ph|mt|ft|gen|gov|sen|rep|rev|col|lt|sgt|capt|cmdr|adm|sq|jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec"
    "|mon|tue|wed|thu|fri|calif|colo|conn|fla|ga|ind|kan|ky|md|mich|minn|mo|mont|neb|nev|okla|tenn|va|vt|wis|wyo"
)
# A single letter and a period is an initial ("L.") unless one of these capitalised words follows it.
_SENTENCE_STARTS = "|".join(
    w[0] + (f"(?i:{w[1:]})" if len(w) > 1 else "")
    for w in ("A About According Additionally After An As At But He Her Here However If In It Last Many More Now One Other"
              " Our She Since So Some Such That The Their Then There These They This We What When While Yet You").split()
)
_PTB_TOKEN = re.compile(rf"""
    \n
  | (?:[^\W\d_]\.){{2,}}(?!\w)                                    # u.s. e.g. p.m.
  | (?i:{_ABBREVIATIONS})\.(?!\w)                                 # st. rd. etc.
  | [^\W\d_]\.(?!\w)(?!\s+(?:{_SENTENCE_STARTS})(?!\w))           # initial: l.
  | (?i:n't|'(?:s|re|ll|ve|m|d))(?!\w)                            # clitics: n't 's 're
  | \w+(?=(?i:n't)(?!\w)) | (?i:can)(?=(?i:not)(?!\w))            # do|n't ca|n't can|not
  | (?i:[dol])'[^\W\d_]+                                          # d'oeuvres o'clock
  | (?:\w+,)+\w+(?:-\w+)+                                         # french,family-friendly (kept whole)
  | \d+(?:[.,:]\d+)+(?:\.(?=[,;:]))?                              # 20.00 1,000 3:30
  | [^\W\d_]+(?:\.[^\W\d_]+)+(?:\.(?=[,;:]))?                     # shop.the
  | \w+(?:[-/!?]\w+)*(?:\.(?=[,;:]))?                             # family-friendly 20-25 3/5 centre.,
  | [-+.,:]\d+(?:[.,:]\d+)*                                      # -25 +20 .6 :5
  | -+ | \.+ | [!?]+ | \S
""", re.X)
_PTB_TRANSLATE = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201b": "'", "\u201c": '"', "\u201d": '"', "\u2013": "--",
                                "\u2014": "--", "\u2026": "...", "\n": " "})
_PTB_MAP = {"£": "#", "€": "$", "(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-", '"': "''"}
# coco-caption drops these tokens after tokenising (the bracket tokens are compared before lowercasing, so "-lrb-" stays).
_COCO_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}


def ptb_tokenize(captions: list[str]) -> list[str]:
    """Each caption as coco-caption's tokenizer leaves it: PTBTokenizer 3.4.1 (``-preserveLines -lowerCase``)
    tokens joined by spaces, punctuation dropped. The captions go through as one text, one per line, because
    the jar looks past a line's end to decide whether ``L.`` ends a sentence."""
    lines: list[list[str]] = [[]]
    for match in _PTB_TOKEN.finditer("\n".join(c.translate(_PTB_TRANSLATE) for c in captions)):
        token = match.group()
        if token == "\n":
            lines.append([])
        elif token.strip("-") and token.strip("."):  # runs of dashes or dots are punctuation
            lines[-1].append(_PTB_MAP.get(token, token).lower())
    return [" ".join(t for t in line if t not in _COCO_PUNCTUATION) for line in lines]


# --- coco-caption: METEOR, ROUGE-L, CIDEr ----------------------------------------------------------

def _coco(references: list[list[str]], predictions: list[str], *, java: bool, meteor: bool) -> dict[str, float | None]:
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({i: [{"caption": r} for r in group] for i, group in enumerate(references)})
        res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(predictions)})
    else:
        tokenized = iter(ptb_tokenize([r for group in references for r in group]))
        gts = {i: [next(tokenized) for _ in group] for i, group in enumerate(references)}
        res = {i: [p] for i, p in enumerate(ptb_tokenize(predictions))}
    scores: dict[str, float | None] = {"METEOR": None}
    if java and meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()  # one JVM for the corpus; its statistics are summed before the score is taken
        try:
            scores["METEOR"] = float(scorer.compute_score(gts, res)[0])
        finally:
            scorer.meteor_p.kill()
            scorer.meteor_p.wait()
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores


def score(references: list[list[str]], predictions: list[str], *, meteor: bool = True) -> dict[str, float | None]:
    """The five E2E metrics of ``predictions[i]`` against ``references[i]`` (a list of strings), on the
    official scorer's scale: BLEU, METEOR and ROUGE_L as fractions in [0, 1], NIST and CIDEr raw.

    ``METEOR`` is ``None`` when ``meteor=False``, or when ``java`` is not on PATH (then with a warning).
    An empty prediction is scored, as the official scorer scores it; mismatched lengths raise ``ValueError``.
    """
    _check(references, predictions)
    java = shutil.which("java") is not None
    if not java:
        warnings.warn("java not found on PATH: METEOR not computed (reported as None); ROUGE_L and CIDEr use "
                      "lorakit's Python emulation of the PTB tokenizer", RuntimeWarning, stacklevel=2)
    scores = mteval_scores(references, predictions) | _coco(references, predictions, java=java, meteor=meteor)
    return {name: scores[name] for name in METRICS}


# --- readers for the official scorer's input files -------------------------------------------------

def _read_lines(path: str | Path) -> list[str]:
    """Stripped lines, split on every Unicode line boundary as the official scorer's ``codecs`` reader does."""
    try:
        return [line.strip() for line in Path(path).read_text(encoding="utf-8-sig").splitlines()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def read_predictions(path: str | Path) -> list[str]:
    """One prediction per line (a blank line is an empty prediction)."""
    return _read_lines(path)


def read_references(path: str | Path) -> list[list[str]]:
    """Reference groups separated by one blank line; a file without blank lines holds one reference per line."""
    groups: list[list[str]] = [[]]
    stray_blank = 0
    for number, line in enumerate(_read_lines(path), start=1):
        if line and stray_blank:
            raise ValueError(f"{path}:{stray_blank}: a blank line that opens an empty reference group; "
                             "separate groups with exactly one blank line")
        if line:
            groups[-1].append(line)
        elif groups[-1]:
            groups.append([])  # a blank line closes a group
        else:
            stray_blank = stray_blank or number  # an error unless only blank lines follow
    groups = groups[:-1] if not groups[-1] else groups
    if not groups:
        raise ValueError(f"{path}: no references")
    return [[ref] for ref in groups[0]] if len(groups) == 1 else groups


def read_e2e_csv(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """``(mrs, reference_groups)`` from an E2E CSV with ``mr`` and ``ref`` columns, with the references grouped
    by MR in order of first appearance (the official scorer groups consecutive rows with the same MR: the same
    groups for the E2E dev and test files, whose rows for one MR are adjacent). The scorer's fixes for
    mis-encoded pound signs and accents are applied."""
    fixes = (("Ł", "£"), ("Â£", "£"), ("Ã©", "é"), ("ã©", "é"))
    lines = [line for line in _read_lines(path) if line]
    for bad, good in fixes:
        lines = [line.replace(bad, good) for line in lines]
    rows = list(csv.reader(lines, delimiter="\t" if lines and "\t" in lines[0] else ","))
    header = [field.strip().lower() for field in rows[0]] if rows else []
    if "mr" not in header or "ref" not in header:
        raise ValueError(f"{path}: expected a header with 'mr' and 'ref' columns, got {rows[0] if rows else 'an empty file'}")
    mr_col, ref_col = header.index("mr"), header.index("ref")
    groups: dict[str, list[str]] = {}
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}: row {number} has {len(row)} fields, the header has {len(header)}")
        groups.setdefault(row[mr_col], []).append(row[ref_col])
    if not groups:
        raise ValueError(f"{path}: no rows below the header")
    return list(groups), list(groups.values())
