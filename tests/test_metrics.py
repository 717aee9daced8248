"""Tests for vlm.eval.metrics: official VQA accuracy, COCO caption metrics and the dataset-row scorer."""

from __future__ import annotations

import math
import shutil
import warnings
from collections import Counter
from functools import cache

import pytest
from vlm.eval import metrics
from vlm.eval.metrics import (
    caption_metrics,
    detect_task,
    exact_match,
    normalize_vqa_answer,
    score,
    vqa_accuracy,
)

HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="`java` is not on PATH: PTBTokenizer and METEOR need Java")


# ---------------------------------------------------------------------------------------------------------------------
# VQA answer normalisation (rules of GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),
        ("two", "2"),
        ("none", "0"),  # the official number map includes none -> 0
        ("the dog.", "dog"),
        ("A dog", "dog"),
        ("an apple", "apple"),
        ("yes.", "yes"),
        ("Yes", "yes"),
        ("1,000", "1000"),  # a comma between digits switches every punctuation mark to deletion
        ("3.5", "3.5"),  # a period followed by a digit is kept
        ("1.", "1"),
        ("isnt", "isn't"),  # apostrophe-less contraction restored
        ("isn't", "isn't"),  # apostrophes are not in the official punctuation list
        ("dont", "don't"),
        ("Im", "im"),  # the table's key "Im" is capitalised, and words are lower-cased first: it never matches
        ("dog ?", "dog"),  # punctuation touching a space is deleted...
        ("cat,dog", "cat dog"),  # ...otherwise it becomes a space
        ("yes , no", "yes no"),
        ("red/white", "red white"),
        ("Red!", "red"),  # "!" becomes a space, and the space is split away
        ("t-shirt", "t shirt"),
        ("t - shirt", "t shirt"),  # "-" touches a space somewhere: every "-" is deleted
        ("half-and-half -", "halfandhalf"),
        ("{red}", "red"),
        ("3:00", "3:00"),  # colons are not in the list either
        ("1,000 dogs!", "1000 dogs"),  # a comma between digits deletes every mark, "!" included
        ("a, b", "b"),  # ", " deletes the comma; then "a" is an article
        ("mr. smith.", "mr smith"),
        ("." * 40, "." * 8),  # at most 32 periods are deleted (re.UNICODE passed as the count)
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("none of the above", "0 of above"),
        ("  lots\tof\nspace  ", "lots of space"),
        ("The", ""),
    ],
)
def test_normalize_vqa_answer(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


def test_normalization_equivalences() -> None:
    assert normalize_vqa_answer("Two") == normalize_vqa_answer("2")
    assert normalize_vqa_answer("the dog.") == normalize_vqa_answer("dog")
    assert normalize_vqa_answer("yes.") == normalize_vqa_answer("yes")
    assert normalize_vqa_answer("1,000") == normalize_vqa_answer("1000")
    assert normalize_vqa_answer("isnt") == normalize_vqa_answer("isn't")
    assert normalize_vqa_answer("Red!") == normalize_vqa_answer("red")


# ---------------------------------------------------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------------------------------------------------


def _ten_refs(matching: list[str], n_match: int) -> list[str]:
    """10 references of which the first ``n_match`` are (spellings of) the answer and the rest are 'cat'."""
    return [matching[i % len(matching)] for i in range(n_match)] + ["cat"] * (10 - n_match)


# Official formula with 10 references: average over the 10 leave-one-out subsets of min(#matches in subset / 3, 1).
# With m matching references, the m subsets that leave out a match contain m-1 matches, the other 10-m contain m:
#   m=0: 0
#   m=1: (1 * min(0/3, 1) + 9 * min(1/3, 1)) / 10 = (0 + 3) / 10       = 0.3
#   m=2: (2 * min(1/3, 1) + 8 * min(2/3, 1)) / 10 = (2/3 + 16/3) / 10  = 0.6
#   m=3: (3 * min(2/3, 1) + 7 * min(3/3, 1)) / 10 = (2 + 7) / 10       = 0.9
#   m=4: (4 * min(3/3, 1) + 6 * min(4/3, 1)) / 10 = (4 + 6) / 10       = 1.0
@pytest.mark.parametrize(("n_match", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_ten_references(n_match: int, expected: float) -> None:
    # Matching references are spelled differently ("Two", "2", "two.", "2 ") so normalisation is exercised too, and
    # duplicates are present so leave-one-out must go by position, not by value.
    refs = _ten_refs(["Two", "2", "two.", "2 "], n_match)
    assert vqa_accuracy("2", refs) == pytest.approx(expected, abs=1e-12)
    assert vqa_accuracy("two", refs) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_mixed_realistic_set() -> None:
    # 10 annotators: 5x "yes", 3x "no", 2x "maybe" (with noise in spelling).
    refs = ["yes", "Yes.", "yes", "YES", "yes", "no", "No", "no.", "maybe", "Maybe"]
    assert vqa_accuracy("yes", refs) == pytest.approx(1.0)  # 5 matches: every subset has >= 4
    assert vqa_accuracy("no", refs) == pytest.approx(0.9)  # 3 matches -> 0.9 (see table above)
    assert vqa_accuracy("maybe", refs) == pytest.approx(0.6)  # 2 matches -> 0.6
    assert vqa_accuracy("perhaps", refs) == 0.0


def test_vqa_accuracy_single_reference_is_normalized_exact_match() -> None:
    for pred, ref in [
        ("Two", "2"),
        ("the dog.", "dog"),
        ("yes.", "yes"),
        ("1,000", "1000"),
        ("no", "No"),
        ("Red!", "red"),
    ]:
        assert vqa_accuracy(pred, ref) == 1.0
        assert vqa_accuracy(pred, [ref]) == 1.0
    assert vqa_accuracy("2", "3") == 0.0
    assert vqa_accuracy("dog", "dogs") == 0.0


def test_vqa_accuracy_few_references() -> None:
    # n=2: divisor min(3, n-1) = 1. Matching both: each subset (1 ref) matches -> 1.0. Matching one: the subset
    # that keeps the match scores 1, the other 0 -> 0.5.
    assert vqa_accuracy("red", ["red", "Red"]) == 1.0
    assert vqa_accuracy("red", ["red", "blue"]) == pytest.approx(0.5)
    # n=3: divisor 2. Matching 2 of 3: leaving out a match leaves 1/2 (twice), leaving out the non-match leaves
    # 2/2 -> (0.5 + 0.5 + 1) / 3 = 2/3.
    assert vqa_accuracy("red", ["red", "red", "blue"]) == pytest.approx(2 / 3)
    assert vqa_accuracy("red", ["red"] * 3) == 1.0
    # n=12 (more than 10): divisor 3 as in the official script; 2 matches ->
    # (2 * 1/3 + 10 * 2/3) / 12 = (2/3 + 20/3) / 12 = 22/36.
    assert vqa_accuracy("red", ["red", "red"] + ["blue"] * 10) == pytest.approx(22 / 36)


def test_vqa_accuracy_prenormalized_mode_matches_official_reference_handling() -> None:
    # The official script (GT-Vision-Lab/VQA a013f00) strips every answer, then normalises the prediction and the
    # references only when the references disagree. Unanimous references are compared with the prediction as it is.
    assert vqa_accuracy("Red!", ["red"] * 10, references_prenormalized=True) == 0.0
    assert vqa_accuracy(" red\n", ["red"] * 10, references_prenormalized=True) == 1.0
    assert vqa_accuracy("isnt", ["isn't"] * 10, references_prenormalized=True) == 0.0
    assert vqa_accuracy("1000", ["1,000"] * 10, references_prenormalized=True) == 0.0
    assert vqa_accuracy("two", ["Two"], references_prenormalized=True) == 0.0
    # One reference spelled otherwise makes them disagree: now everything is normalised, "Red!" included.
    assert vqa_accuracy("Red!", ["red"] * 9 + ["Red"], references_prenormalized=True) == 1.0
    assert vqa_accuracy("1000", ["1,000"] * 9 + ["1000"], references_prenormalized=True) == 1.0
    # Normalised "red" matches 1 of 10: the 9 subsets that keep it score 1/3, the one without it 0, summed in order.
    assert vqa_accuracy("Red.", ["red"] + ["blue"] * 9, references_prenormalized=True) == (0 + 9 * (1 / 3)) / 10
    # The default mode normalises both sides always.
    assert vqa_accuracy("Red!", ["red"] * 10) == 1.0
    assert vqa_accuracy("isnt", ["isn't"] * 10) == 1.0
    assert vqa_accuracy("isn't", ["isnt"] * 10) == 1.0
    assert vqa_accuracy("isnt", ["is"] * 10) == 0.0


def test_vqa_accuracy_rejects_empty_references() -> None:
    with pytest.raises(ValueError, match="at least one reference"):
        vqa_accuracy("yes", [])


def test_exact_match() -> None:
    assert exact_match("A  Red\tcar ", ["a red car"]) == 1.0
    assert exact_match("blue", ["red", " BLUE "]) == 1.0
    assert exact_match("blue", "blue") == 1.0
    # Only whitespace and case are normalised.
    assert exact_match("two", ["2"]) == 0.0
    assert exact_match("yes.", ["yes"]) == 0.0
    assert exact_match("the dog", ["dog"]) == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Caption metrics
# ---------------------------------------------------------------------------------------------------------------------

PREDICTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs are playing with a red frisbee in the park.",
    "A cat sitting on a couch next to a remote.",
    "A kitchen with a stove and a refrigerator.",
]
REFERENCES = [
    [
        "A surfer riding a large wave in the ocean.",
        "A man on a surfboard rides a wave.",
        "Someone surfing on a big wave.",
        "A person riding a surf board on a wave.",
    ],
    [
        "Two dogs play with a frisbee on the grass.",
        "A pair of dogs chasing a red frisbee in a park.",
        "Dogs playing in the park with a toy.",
        "Two brown dogs run after a frisbee!",
    ],
    [
        "A cat is lying on the sofa.",
        "A gray cat sitting on a couch.",
        "A cat rests on a couch near a TV remote.",
        "The cat isn't moving; it's sleeping on the couch.",
    ],
    [
        "A small kitchen with white appliances.",
        "A kitchen that has a stove, a sink and a fridge.",
        "An old kitchen with a refrigerator and an oven.",
        "The kitchen's stove is next to the refrigerator.",
    ],
]
# pycocoevalcap 1.2 PTBTokenizer output for the fixture (recorded once; Stanford CoreNLP 3.4.1, -lowerCase, PTB
# punctuation dropped).
PREDICTIONS_TOKENIZED = [
    "a man riding a wave on top of a surfboard",
    "two dogs are playing with a red frisbee in the park",
    "a cat sitting on a couch next to a remote",
    "a kitchen with a stove and a refrigerator",
]
REFERENCES_TOKENIZED = [
    [
        "a surfer riding a large wave in the ocean",
        "a man on a surfboard rides a wave",
        "someone surfing on a big wave",
        "a person riding a surf board on a wave",
    ],
    [
        "two dogs play with a frisbee on the grass",
        "a pair of dogs chasing a red frisbee in a park",
        "dogs playing in the park with a toy",
        "two brown dogs run after a frisbee",
    ],
    [
        "a cat is lying on the sofa",
        "a gray cat sitting on a couch",
        "a cat rests on a couch near a tv remote",
        "the cat is n't moving it 's sleeping on the couch",
    ],
    [
        "a small kitchen with white appliances",
        "a kitchen that has a stove a sink and a fridge",
        "an old kitchen with a refrigerator and an oven",
        "the kitchen 's stove is next to the refrigerator",
    ],
]
# Captions on which nltk's PTB-style tokenizers (TreebankWordTokenizer, word_tokenize), tried as a stand-in, depart
# from Stanford's: several sentences on a line, abbreviations kept whole at the end of a line, quotes, 'n' and '90s,
# curly quotes, "!!", brackets. PTBTokenizer output, recorded once like the fixture's.
HARDER_TOKENIZED = {
    "A man in a red shirt. He is holding a bat.": "a man in a red shirt he is holding a bat",
    "A stop sign at 5th Ave. and Main St.": "a stop sign at 5th ave. and main st.",
    "A plane flying over a city at 3,000 ft.": "a plane flying over a city at 3,000 ft.",
    "He cannot see the 'big' wave.": "he can not see the big wave",
    "Rock 'n' roll band playing on stage.": "rock 'n' roll band playing on stage",
    "An old photo from the '90s of a house.": "an old photo from the '90s of a house",
    "The sign says \u201cNo Parking\u201d in red letters.": "the sign says no parking in red letters",
    "It\u2019s a dog\u2019s life!!": "it 's a dog 's life !!",
    "A boy (age 5) on a swing.": "a boy -lrb- age 5 -rrb- on a swing",
}
# Expected values: computed once (pycocoevalcap 1.2, Java 17) exactly the way COCOEvalCap.evaluate() does, but without
# SPICE: PTBTokenizer().tokenize() on the COCO-style gts and res dicts, then Bleu(4), Rouge(), Cider(), Meteor()
# .compute_score(gts, res), each called directly on this fixture (script not kept; the calls are the ones named).
EXPECTED_ALL = {
    "bleu_1": 0.8717948717501643,
    "bleu_2": 0.7402603244315736,
    "bleu_3": 0.49831248022039254,
    "bleu_4": 0.3424251824105568,
    "rouge_l": 0.6442383231002357,
    "cider": 1.7932373223718798,
    "meteor": 0.35610320266405776,
}
# Same procedure restricted to images {1, 2} ("animals") and {0, 3} ("scenes") (METEOR "animals" re-checked in a fresh
# Meteor process: same value, so one process can serve several subsets).
EXPECTED_BY_TYPE = {
    "animals": {
        "bleu_1": 0.8571428570612245,
        "bleu_2": 0.735767207310042,
        "bleu_3": 0.5759627475450979,
        "bleu_4": 0.44213337049383344,
        "rouge_l": 0.6979724172640676,
        "cider": 2.084086549098523,
        "meteor": 0.3738191038233955,
    },
    "scenes": {
        "bleu_1": 0.8888888887901234,
        "bleu_2": 0.7453559924145245,
        "bleu_3": 0.34108803599077825,
        "bleu_4": 4.264366797290262e-05,
        "rouge_l": 0.5905042289364038,
        "cider": 1.651599179845805,
        "meteor": 0.33991987426552867,
    },
}
TYPES = ["scenes", "animals", "animals", "scenes"]
NON_METEOR = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider")


def _assert_metrics(got: dict, expected: dict, names: tuple[str, ...]) -> None:
    for name in names:
        assert got[name] == pytest.approx(expected[name], rel=1e-9, abs=1e-12), name


def _independent_corpus_bleu(hyps: list[str], refs: list[list[str]], n_max: int) -> float:
    """Papineni et al. corpus BLEU with the closest reference length (ties -> shorter), no smoothing."""
    correct, guess = [0] * n_max, [0] * n_max
    hyp_len = ref_len = 0
    for hyp, rs in zip(hyps, refs, strict=True):
        h, rs_tok = hyp.split(), [r.split() for r in rs]
        hyp_len += len(h)
        ref_len += min((len(r) for r in rs_tok), key=lambda n: (abs(n - len(h)), n))
        for n in range(1, n_max + 1):
            h_grams = Counter(tuple(h[i : i + n]) for i in range(len(h) - n + 1))
            max_ref: Counter = Counter()
            for r in rs_tok:
                max_ref |= Counter(tuple(r[i : i + n]) for i in range(len(r) - n + 1))
            correct[n - 1] += sum(min(c, max_ref[g]) for g, c in h_grams.items())
            guess[n - 1] += max(len(h) - n + 1, 0)
    brevity = min(1.0, math.exp(1 - ref_len / hyp_len))
    return brevity * math.exp(sum(math.log(c / g) for c, g in zip(correct, guess, strict=True)) / n_max)


def _independent_rouge_l(hyps: list[str], refs: list[list[str]], beta: float = 1.2) -> float:
    """ROUGE-L as defined by pycocoevalcap: F_beta of the best precision and best recall over references."""

    def lcs(a: tuple[str, ...], b: tuple[str, ...]) -> int:
        @cache
        def go(i: int, j: int) -> int:
            if i == len(a) or j == len(b):
                return 0
            return 1 + go(i + 1, j + 1) if a[i] == b[j] else max(go(i + 1, j), go(i, j + 1))

        return go(0, 0)

    scores = []
    for hyp, rs in zip(hyps, refs, strict=True):
        h = tuple(hyp.split())
        p = max(lcs(h, tuple(r.split())) / len(h) for r in rs)
        r_ = max(lcs(h, tuple(r.split())) / len(r.split()) for r in rs)
        scores.append(0.0 if p == 0 or r_ == 0 else (1 + beta**2) * p * r_ / (r_ + beta**2 * p))
    return sum(scores) / len(scores)


def test_independent_implementations_reproduce_recorded_values() -> None:
    # Guards the recorded numbers themselves: BLEU and ROUGE-L re-derived from scratch on the tokenized fixture.
    # Counts behind BLEU: 39 hypothesis tokens, closest reference lengths sum to 39 (brevity penalty 1), clipped
    # n-gram matches 34/39, 22/35, 7/31, 3/27; e.g. BLEU-1 = 34/39 and BLEU-4 = (34/39 * 22/35 * 7/31 * 3/27) ** (1/4).
    assert EXPECTED_ALL["bleu_1"] == pytest.approx(34 / 39, rel=1e-8)
    assert EXPECTED_ALL["bleu_4"] == pytest.approx((34 / 39 * 22 / 35 * 7 / 31 * 3 / 27) ** 0.25, rel=1e-8)
    for n in range(1, 5):
        expected = _independent_corpus_bleu(PREDICTIONS_TOKENIZED, REFERENCES_TOKENIZED, n)
        assert EXPECTED_ALL[f"bleu_{n}"] == pytest.approx(expected, rel=1e-8)
    rouge = _independent_rouge_l(PREDICTIONS_TOKENIZED, REFERENCES_TOKENIZED)
    assert EXPECTED_ALL["rouge_l"] == pytest.approx(rouge, rel=1e-12)


def test_fallback_tokenizer_matches_recorded_ptb_output() -> None:
    assert [metrics._fallback_tokenize(p) for p in PREDICTIONS] == PREDICTIONS_TOKENIZED
    assert [[metrics._fallback_tokenize(r) for r in refs] for refs in REFERENCES] == REFERENCES_TOKENIZED
    assert {text: metrics._fallback_tokenize(text) for text in HARDER_TOKENIZED} == HARDER_TOKENIZED
    assert (
        metrics._fallback_tokenize("Two dogs (brown) can't wait -- really...")
        == "two dogs -lrb- brown -rrb- ca n't wait really"
    )


@needs_java
def test_ptb_tokenizer_wrapper_matches_recorded_output() -> None:
    flat = PREDICTIONS + ["", "..."] + [r for refs in REFERENCES for r in refs] + list(HARDER_TOKENIZED)
    expected = PREDICTIONS_TOKENIZED + ["", ""] + [r for refs in REFERENCES_TOKENIZED for r in refs]
    expected += list(HARDER_TOKENIZED.values())
    assert metrics._ptb_tokenize(flat) == expected


def test_caption_metrics_hand_computed_tiny_case(monkeypatch: pytest.MonkeyPatch) -> None:
    # One image, hypothesis "a dog runs" (3 tokens), reference "the dog runs fast" (4 tokens).
    # BLEU-1: clipped unigram matches {dog, runs} = 2 of 3 -> p1 = 2/3; brevity penalty exp(1 - 4/3) = exp(-1/3);
    #   BLEU-1 = exp(-1/3) * 2/3 = 0.71653 * 0.66667 = 0.47769.
    # ROUGE-L: LCS("a dog runs", "the dog runs fast") = 2 ("dog runs"); P = 2/3, R = 2/4;
    #   F = (1 + 1.2^2) P R / (R + 1.2^2 P) = 2.44 * (1/3) / (0.5 + 0.96) = 0.55708.
    results = []
    if HAS_JAVA:  # PTBTokenizer path
        results.append(caption_metrics(["a dog runs"], [["the dog runs fast"]], meteor=False))
    monkeypatch.setattr(metrics, "_java_available", lambda: False)  # pure-Python tokenizer path
    results.append(caption_metrics(["a dog runs"], [["the dog runs fast"]], meteor=False))
    for result in results:
        assert result["bleu_1"] == pytest.approx(math.exp(-1 / 3) * 2 / 3, rel=1e-8)
        assert result["rouge_l"] == pytest.approx(2.44 * (2 / 3) * (1 / 2) / (1 / 2 + 1.44 * (2 / 3)), rel=1e-12)
        assert result["meteor"] is None


@pytest.fixture(scope="module")
def java_score_run() -> tuple[dict, list]:
    """score("caption", ...) on the typed fixture with Java, plus the Meteor objects it created.

    Module scope, and the only METEOR run in this file: METEOR's JVM start-up (loading its paraphrase table) costs
    5-20 s. score() covers caption_metrics' METEOR path too (both go through the same internal function), and adds
    the by_type subsets sharing one METEOR process.
    """
    from pycocoevalcap.meteor import meteor as meteor_module

    created = []

    class RecordingMeteor(meteor_module.Meteor):
        def __init__(self) -> None:
            super().__init__()
            created.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(meteor_module, "Meteor", RecordingMeteor)
        return score("caption", _typed_caption_rows(), PREDICTIONS), created


def _typed_caption_rows() -> list[dict]:
    return [
        {"image": f"{i}.png", "caption": refs, "type": t}
        for i, (refs, t) in enumerate(zip(REFERENCES, TYPES, strict=True))
    ]


@needs_java
def test_caption_metrics_match_pycocoevalcap() -> None:
    got = caption_metrics(PREDICTIONS, REFERENCES, meteor=False)  # PTBTokenizer path; METEOR is checked below
    assert set(got) == set(metrics.CAPTION_METRIC_NAMES)
    _assert_metrics(got, EXPECTED_ALL, NON_METEOR)
    assert got["meteor"] is None


@needs_java
def test_score_caption_with_meteor_matches_pycocoevalcap(java_score_run: tuple[dict, list]) -> None:
    result, _ = java_score_run
    assert result["notes"] == []
    _assert_metrics(result["metrics"], EXPECTED_ALL, metrics.CAPTION_METRIC_NAMES)
    assert set(result["by_type"]) == {"animals", "scenes"}
    for name, expected in EXPECTED_BY_TYPE.items():
        _assert_metrics(result["by_type"][name], expected, metrics.CAPTION_METRIC_NAMES)


@needs_java
def test_meteor_process_is_closed(java_score_run: tuple[dict, list]) -> None:
    result, created = java_score_run
    assert result["metrics"]["meteor"] is not None
    assert len(created) == 1  # one process served the overall set and both type subsets
    assert created[0].meteor_p.poll() is not None  # the java process has exited
    assert created[0].meteor_p.stdin.closed


def test_caption_metrics_without_java(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_java_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="java"):
        got = caption_metrics(PREDICTIONS, REFERENCES)
    assert got["meteor"] is None
    # The fallback tokenizer gives PTB's tokens on this fixture, so the other metrics are the official ones.
    _assert_metrics(got, EXPECTED_ALL, NON_METEOR)


def test_caption_metrics_skip_meteor_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_java_available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = caption_metrics(PREDICTIONS, REFERENCES, meteor=False)
    assert got["meteor"] is None


def test_caption_metrics_rejects_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_java_available", lambda: False)
    with pytest.raises(ValueError, match="3 predictions but 4"):
        caption_metrics(PREDICTIONS[:3], REFERENCES, meteor=False)
    with pytest.raises(ValueError, match="at least one"):
        caption_metrics([], [], meteor=False)
    with pytest.raises(ValueError, match="non-empty list"):
        caption_metrics(["a dog"], [[]], meteor=False)
    with pytest.raises(ValueError, match="empty after tokenization"):
        caption_metrics(["a dog"], [["..."]], meteor=False)


# ---------------------------------------------------------------------------------------------------------------------
# score() and detect_task()
# ---------------------------------------------------------------------------------------------------------------------

VQA_ROWS = [
    {"question": "How many dogs?", "answer": "Two", "type": "count"},
    {"question": "How many cats?", "answer": ["3"] * 3 + ["three"] + ["4"] * 6, "type": "count"},
    {"question": "Is it red?", "answer": "yes", "type": "yes/no"},
    {"question": "What is it?", "answer": ["a dog", "dog", "puppy"]},
]
VQA_PREDICTIONS = ["2", "3", "no", "Dog"]
# VQA accuracy per row: row 1: "2" == normalised "Two" -> 1.0. Row 2: "3" matches "3", "3", "3", "three" = 4 of 10
# -> 1.0 (>= 4 matches). Row 3: 0.0. Row 4: references normalise to "dog", "dog", "puppy"; n=3 so divisor 2, and
# 2 matches -> (1/2 + 1/2 + 2/2) / 3 = 2/3. Exact match: 0 ("2" vs "Two"), 1 ("3"), 0, 1 ("Dog" vs "dog").
VQA_ACC = [1.0, 1.0, 0.0, 2 / 3]
VQA_EM = [0.0, 1.0, 0.0, 1.0]


def test_score_vqa_with_types() -> None:
    result = score("vqa", VQA_ROWS, VQA_PREDICTIONS)
    assert result["task"] == "vqa"
    assert result["num_rows"] == 4
    assert result["notes"] == []
    assert result["metrics"]["vqa_accuracy"] == pytest.approx(sum(VQA_ACC) / 4)
    assert result["metrics"]["exact_match"] == pytest.approx(sum(VQA_EM) / 4)
    # The untyped row counts only in the overall metrics.
    assert result["by_type"] == {
        "count": {"vqa_accuracy": pytest.approx(1.0), "exact_match": pytest.approx(0.5)},
        "yes/no": {"vqa_accuracy": 0.0, "exact_match": 0.0},
    }


def test_score_vqa_by_subtype() -> None:
    # Subtypes group independently of types: "dogs" spans two types, and the row without a subtype is left out.
    rows = [{**row, "subtype": sub} for row, sub in zip(VQA_ROWS, ["dogs", "cats", "dogs", None], strict=True)]
    result = score("vqa", rows, VQA_PREDICTIONS)
    assert result["by_subtype"] == {
        "cats": {"vqa_accuracy": 1.0, "exact_match": 1.0},
        "dogs": {"vqa_accuracy": pytest.approx(0.5), "exact_match": 0.0},
    }
    assert result["by_type"] == score("vqa", VQA_ROWS, VQA_PREDICTIONS)["by_type"]
    assert result["subtype_counts"] == {"cats": 1, "dogs": 2} and result["type_counts"] == {"count": 2, "yes/no": 1}


def test_score_vqa_without_types_has_empty_by_type() -> None:
    rows = [{"question": "q", "answer": "yes"}, {"question": "q", "answer": "no"}]
    result = score("vqa", rows, ["Yes", "yes"])
    assert result["by_type"] == {} and result["by_subtype"] == {}
    assert result["metrics"] == {"vqa_accuracy": 0.5, "exact_match": 0.5}


def test_score_caption_with_types_without_java(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_java_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="java"):
        result = score("caption", _typed_caption_rows(), PREDICTIONS)
    assert result["task"] == "caption"
    assert result["num_rows"] == 4
    assert any("java" in note for note in result["notes"])
    assert set(result["by_type"]) == {"animals", "scenes"}
    _assert_metrics(result["metrics"], EXPECTED_ALL, NON_METEOR)
    for name, expected in EXPECTED_BY_TYPE.items():
        _assert_metrics(result["by_type"][name], expected, NON_METEOR)
        assert result["by_type"][name]["meteor"] is None
    # The same groups named by "subtype" instead get the same figures.
    rows = [{**{k: v for k, v in row.items() if k != "type"}, "subtype": row["type"]} for row in _typed_caption_rows()]
    with pytest.warns(RuntimeWarning, match="java"):
        by_subtype = score("caption", rows, PREDICTIONS)
    assert by_subtype["by_type"] == {} and by_subtype["by_subtype"] == result["by_type"]


def test_score_caption_single_string_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_java_available", lambda: False)
    rows = [{"image": "a.png", "caption": "the dog runs fast"}]
    with pytest.warns(RuntimeWarning):
        result = score("caption", rows, ["a dog runs"])
    assert result["by_type"] == {}
    assert result["metrics"]["bleu_1"] == pytest.approx(math.exp(-1 / 3) * 2 / 3, rel=1e-8)


def test_score_rejects_mismatched_lengths_and_bad_input() -> None:
    with pytest.raises(ValueError, match="3 predictions for 4 rows"):
        score("vqa", VQA_ROWS, VQA_PREDICTIONS[:3])
    with pytest.raises(ValueError, match="5 predictions for 4 rows"):
        score("caption", [{"caption": "x"}] * 4, ["x"] * 5)
    with pytest.raises(ValueError, match="unknown task"):
        score("retrieval", VQA_ROWS, VQA_PREDICTIONS)
    with pytest.raises(ValueError, match="no rows"):
        score("vqa", [], [])
    with pytest.raises(ValueError, match="has no 'answer' field"):
        score("vqa", [{"question": "q", "caption": "c"}], ["x"])
    with pytest.raises(ValueError, match="non-empty list of strings"):
        score("vqa", [{"question": "q", "answer": []}], ["x"])
    with pytest.raises(TypeError, match="prediction 0 must be a string"):
        score("vqa", [{"question": "q", "answer": "a"}], [None])  # type: ignore[list-item]


def test_detect_task() -> None:
    assert detect_task(VQA_ROWS) == "vqa"
    assert detect_task([{"image": "a.png", "caption": "x"}]) == "caption"
    with pytest.raises(ValueError, match="cannot detect the task"):
        detect_task([{"image": "a.png", "label": 3}])
    with pytest.raises(ValueError, match="cannot detect the task"):
        detect_task([{"answer": "x"}, {"caption": "y"}])
    with pytest.raises(ValueError, match="empty"):
        detect_task([])
