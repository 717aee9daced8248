"""Answer strings: the official VQAv2 answer normalisation, VQA accuracy and exact match.

Used wherever an answer is scored: `vlm eval` (through `vlm.eval.metrics.score`) and the validation accuracy shown
during training. Plain Python, no imports from the rest of the project.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# ---------------------------------------------------------------------------------------------------------------------
# VQA accuracy
# Source: GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py at its current commit (a013f00, 2021):
# VQAEval.processPunctuation, processDigitArticle and evaluate. Re-implemented here, not copied; its quirks are
# kept on purpose (and commented) because reproducing its numbers is the point.
# ---------------------------------------------------------------------------------------------------------------------

# The official table (ASCII apostrophes, as in the script's current version; an older version wrote most of them as
# U+2019). Keys with an apostrophe can match: the official punctuation list leaves apostrophes alone.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
# "none" -> "0" is in the official table too.
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
# The official list, in its order (its current version: `{ } - !` added, `:` and `'` dropped from an older one).
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern is r"(?!<=\d)(\.)(?!\d)": its "(?!<=\d)" is a negative *lookahead* for the literal text "<="
# followed by a digit, which can never match where a "." starts, so it is a no-op. The effective rule is "delete
# every period not followed by a digit" ("3.5" survives, "yes." and "1." lose the period), which is what we write.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official call is periodStrip.sub("", text, re.UNICODE): re.UNICODE lands in the positional *count* slot, so at
# most int(re.UNICODE) == 32 periods are removed. Kept so that even absurd inputs score identically.
_OFFICIAL_PERIOD_SUB_COUNT = 32


def _process_punctuation(text: str) -> str:
    """Official ``processPunctuation``: drop or space-out punctuation, then delete periods not before a digit."""
    out = text
    # A comma between digits anywhere ("1,000") switches *every* punctuation mark to deletion, so "1,000" -> "1000".
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _PUNCT:
        # Both tests look at the original text, not the progressively edited one, exactly as the official loop does.
        if delete_all or (p + " " in text or " " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_OFFICIAL_PERIOD_SUB_COUNT)


def _process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lower-case, number words -> digits, drop articles, restore contractions."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """Normalise a VQA answer exactly as the official VQAv2 evaluation script normalises answers (when it does: see
    :func:`vqa_accuracy`).

    Steps, in order: newlines and tabs become spaces and the ends are stripped; each punctuation mark of ``; / [ ] "
    { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted if it touches a space anywhere in the text (or if the text contains a
    comma between two digits, as in "1,000") and otherwise replaced by a space; every period not followed by a digit
    is deleted ("yes." -> "yes", "3.5" kept); the text is lower-cased and split on whitespace; number words zero..ten
    (and "none") become digits; the articles a/an/the are dropped; apostrophe-less contractions are restored ("isnt"
    -> "isn't"); words are re-joined with single spaces. Colons and apostrophes are kept ("3:00", "isn't").

    Examples: "Red!" -> "red", "Two" -> "2", "the dog." -> "dog", "1,000" -> "1000", "t-shirt" -> "t shirt".
    """
    return _process_digit_article(_process_punctuation(_strip(text)))


def _strip(text: str) -> str:
    """What the official script does to every answer first: newlines and tabs become spaces, the ends are stripped."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _as_reference_list(references: str | Sequence[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("references must contain at least one reference answer")
    for r in refs:
        if not isinstance(r, str):
            raise TypeError(f"every reference must be a string, got {type(r).__name__}: {r!r}")
    return refs


def vqa_accuracy(prediction: str, references: str | Sequence[str], *, references_prenormalized: bool = False) -> float:
    """VQA accuracy of one predicted answer against its human reference answers, as in the official VQAv2 script.

    For each reference i, take the other references (leave-one-out; duplicates are distinct annotators, so references
    are left out by position, not by value), count those equal to the prediction, score ``min(count / 3, 1)``, and
    average over i. With 10 references this is the official metric: 1, 2, 3, >=4 matching references give 0.3, 0.6,
    0.9, 1.0.

    Other reference counts: with a single reference the result is normalised exact match (1.0 or 0.0). For n >= 2
    references the divisor is ``min(3, n - 1)`` (identical to the official 3 for n >= 4), so that a prediction agreeing
    with every reference always scores 1.0; with n = 2 or 3 a literal divisor of 3 would cap the score at (n - 1) / 3.

    By default the prediction and every reference go through :func:`normalize_vqa_answer`, so raw references such as
    "Two" or "the dog." work. The official script (its current version) normalises less: it strips newlines, tabs and
    the ends of every answer, and normalises the prediction and the references only when the references are not all
    the same; unanimous references ("red" ten times) are compared with the prediction as it is ("Red!" scores 0, "red"
    1). It relies on the released VQAv2 annotations being written the normalised way already.
    ``references_prenormalized=True`` does exactly that: with 4 or more references (VQAv2 has 10) the result is
    bit-for-bit the official script's.

    Returns a float in [0, 1].
    """
    refs = _as_reference_list(references)
    normalise = True
    if references_prenormalized:
        refs = [_strip(r) for r in refs]
        normalise = len(set(refs)) > 1
    pred = normalize_vqa_answer(prediction) if normalise else _strip(prediction)
    refs = [normalize_vqa_answer(r) for r in refs] if normalise else refs
    matches = [r == pred for r in refs]
    n = len(refs)
    if n == 1:
        return 1.0 if matches[0] else 0.0
    needed = min(3, n - 1)
    total_matches = sum(matches)
    # Leaving out reference i removes one match exactly when reference i itself matches; the official script sums
    # the per-subset scores in this order and divides by n, so the float result is the same to the last bit.
    per_subset = [min(1.0, (total_matches - int(m)) / needed) for m in matches]
    return sum(per_subset) / n


def _normalize_whitespace_case(text: str) -> str:
    return " ".join(text.split()).lower()


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 if the prediction equals any reference after light normalisation, else 0.0.

    The only normalisation is: leading/trailing whitespace removed, every internal run of whitespace (spaces, tabs,
    newlines, other Unicode whitespace) collapsed to one space, and ``str.lower()``. Punctuation, articles and number
    words are significant ("2" != "two", "yes." != "yes"); use :func:`vqa_accuracy` for the forgiving VQA rules.
    """
    refs = _as_reference_list(references)
    pred = _normalize_whitespace_case(prediction)
    return 1.0 if any(_normalize_whitespace_case(r) == pred for r in refs) else 0.0
