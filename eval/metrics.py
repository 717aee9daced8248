"""Standard VQA and image-captioning metrics on plain strings.

* VQA accuracy follows the official VQAv2 evaluation script (GT-Vision-Lab/VQA,
  ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``): same answer normalisation, same leave-one-out
  ``min(#matches / 3, 1)`` accuracy.
* Caption metrics (BLEU-1..4, ROUGE-L, CIDEr-D, METEOR) are computed with pycocoevalcap's individual scorers on
  PTB-tokenised text, i.e. the numbers the COCO caption evaluation reports.
* :func:`score` evaluates a list of the project's JSONL rows against model predictions (used by ``vlm eval``).

All scores are fractions as the underlying scorers return them (VQA accuracy and exact match in [0, 1]; BLEU,
ROUGE-L and METEOR in [0, 1]; CIDEr-D is unbounded, typically 0..~3). Nothing here imports torch; pycocoevalcap is
imported lazily, only when caption metrics are requested.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import threading
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from vlm.answers import exact_match, normalize_vqa_answer, vqa_accuracy

__all__ = [
    "CAPTION_METRIC_NAMES",
    "VQA_METRIC_NAMES",
    "caption_metrics",
    "detect_task",
    "exact_match",
    "normalize_vqa_answer",
    "score",
    "vqa_accuracy",
]

VQA_METRIC_NAMES = ("vqa_accuracy", "exact_match")
CAPTION_METRIC_NAMES = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "meteor")

# ---------------------------------------------------------------------------------------------------------------------
# Caption metrics (pycocoevalcap scorers, one by one; never COCOEvalCap, whose SPICE downloads jars at runtime)
# ---------------------------------------------------------------------------------------------------------------------

# Generous upper bounds, only there so that a wedged Java process can never hang an evaluation. METEOR's start-up
# (JVM + loading the paraphrase table) alone takes 5-25 s depending on machine load.
METEOR_TIMEOUT_BASE_S = 300.0
METEOR_TIMEOUT_PER_CAPTION_S = 0.05

_JAVA_MISSING_NOTE = (
    "METEOR not computed: no `java` executable on PATH (pycocoevalcap's METEOR runs meteor-1.5.jar and its PTB "
    "tokenizer runs Stanford CoreNLP). Captions were tokenized with the pure-Python PTB approximation instead, so the "
    "other metrics may differ slightly from official COCO numbers. Install a Java runtime (e.g. OpenJDK 11+) to fix."
)


def _java_available() -> bool:
    return shutil.which("java") is not None


def _clean_line(text: str) -> str:
    # The Java tokenizer reads one caption per line, so any character it might treat as a line break (\r, \x85,
    # \u2028, ...) would shift every later caption onto the wrong image; str.split() splits on all of them.
    return " ".join(text.split())


def _ptb_tokenize(texts: list[str]) -> list[str]:
    """Tokenise with pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, lower-cased, PTB punctuation dropped)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    cleaned = [_clean_line(t) for t in texts]
    # Empty lines are not sent: a trailing empty line produces no output line, which would drop a caption.
    todo = {i: [{"caption": c}] for i, c in enumerate(cleaned) if c}
    out = PTBTokenizer().tokenize(todo) if todo else {}
    if set(out) != set(todo) or any(len(v) != 1 for v in out.values()):
        raise RuntimeError(
            f"PTBTokenizer returned {len(out)} captions for {len(todo)} inputs; is `java` working? "
            "(run `java -version`)"
        )
    return [out[i][0] if i in out else "" for i in range(len(texts))]


# Tokens the Stanford tokenizer keeps whole even though they end in a period (abbreviations it knows). Only a
# common subset; see _fallback_tokenize's docstring.
_FALLBACK_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "jr", "sr", "st", "mt", "ft", "vs", "etc", "inc", "ltd", "co", "corp", "jan",
    "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "no", "ave", "blvd", "rd", "gen",
    "col", "lt", "sgt", "capt", "gov", "sen", "rep",
})  # fmt: skip
_FALLBACK_SPLIT_WORDS = {
    "cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"], "wanna": ["wan", "na"],
    "gimme": ["gim", "me"], "lemme": ["lem", "me"],
}  # fmt: skip
_FALLBACK_CLITICS = ("n't", "'s", "'m", "'d", "'ll", "'re", "'ve")
_FALLBACK_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_FALLBACK_SUBS = [
    (re.compile(r"[\u2018\u2019\u201a\u201b]"), "'"),
    (re.compile(r"[\u201c\u201d\u201e\u201f]"), '"'),
    (re.compile(r'"'), " '' "),  # PTB turns double quotes into `` / '', both of which are then dropped
    (re.compile(r"-{2,}"), " -- "),
    (re.compile(r"(?<!\S)-(?=\S)|(?<=\S)-(?!\S)"), " - "),
    (re.compile(r"\.{3,}"), " ... "),
    (re.compile(r"(?<!\d),|,(?!\d)"), " , "),
    (re.compile(r"(?<!\d)[:;]|[:;](?!\d)"), lambda m: f" {m.group(0)} "),
    (re.compile(r"(?<!\S)([?!]+)|([?!]+)(?!\S)"), lambda m: f" {m.group(0)} "),
    (re.compile(r"([&$%=+])"), r" \1 "),
    (re.compile(r"(?<!\S)#(?=\d)"), "# "),
    # Last, so that the hyphen rules above do not split the "-lrb-" style tokens.
    (re.compile(r"([()\[\]{}])"), lambda m: f" {_FALLBACK_BRACKETS[m.group(1)]} "),
]


def _fallback_split_word(word: str) -> list[str]:
    # Opening single quote: PTB makes it a ` token (dropped) unless it starts a clitic or a year ('90s).
    if word.startswith("'") and len(word) > 1 and word not in _FALLBACK_CLITICS and word != "'n'":
        if word.startswith(("'tis", "'twas")):
            return ["'t", word[2:]]
        if not word[1].isdigit():
            word = word[1:]
    # Trailing periods and closing quotes, repeatedly ("fun'." / "dogs'."), except on abbreviations and acronyms.
    while word.endswith((".", "'")) and len(word) > 1 and word != "'n'":
        core = word[:-1]
        if word.endswith(".") and (
            re.fullmatch(r"[a-z]", core) or re.fullmatch(r"([a-z]\.)+[a-z]", core) or core in _FALLBACK_ABBREVIATIONS
        ):
            break
        word = core
    if word in _FALLBACK_SPLIT_WORDS:
        return list(_FALLBACK_SPLIT_WORDS[word])
    tail: list[str] = []
    changed = True
    while changed:  # "he'd've" -> he 'd 've
        changed = False
        for clitic in _FALLBACK_CLITICS:
            if word.endswith(clitic) and len(word) > len(clitic):
                word, tail = word[: -len(clitic)], [clitic, *tail]
                changed = True
                break
    return [word, *tail]


def _fallback_tokenize(text: str) -> str:
    """Pure-Python stand-in for PTBTokenizer, used only when Java is missing.

    Lower-cases; maps curly quotes to straight ones; splits off punctuation, brackets (as -lrb-/-rrb-/-lsb-/-rsb-/
    -lcb-/-rcb-, as PTB does), the clitics n't 's 'm 'd 'll 're 've ("isn't" -> "is n't", "can't" -> "ca n't") and the
    PTB word splits cannot/gonna/gotta/wanna/gimme/lemme; keeps commas/colons between digits ("1,000", "5:30"),
    decimal points, intra-word hyphens and slashes, and final periods of single letters, dotted acronyms ("u.s.a.")
    and a short list of common abbreviations ("mr.", "etc."); then drops the tokens in pycocoevalcap's PUNCTUATIONS
    list, exactly as its PTBTokenizer wrapper does. It agrees with PTBTokenizer on ordinary English captions; rarer
    constructions (emoticons, URLs, abbreviations outside the list, odd symbol runs) may tokenize differently.

    nltk's PTB-style tokenizers (TreebankWordTokenizer, word_tokenize without its downloaded sentence splitter) are not
    faithful enough to take its place: they leave a period inside a line on its word ("shirt. he"), take the period
    off a line-final abbreviation ("st."), and split quotes, 'n' and '90s differently (HARDER_TOKENIZED in
    tests/test_metrics.py).
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    text = _clean_line(text).lower()
    for pattern, repl in _FALLBACK_SUBS:
        text = pattern.sub(repl, text)
    tokens = [t for word in text.split() for t in _fallback_split_word(word)]
    return " ".join(t for t in tokens if t and t not in PUNCTUATIONS)


def _call_with_timeout(fn: Callable[[], Any], timeout_s: float) -> Any:
    """Run ``fn`` in a daemon thread; raise TimeoutError if it has not returned after ``timeout_s`` seconds."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 -- re-raised in the calling thread below
            box["error"] = exc

    thread = threading.Thread(target=target, name="meteor-scorer", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"METEOR did not answer within {timeout_s:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _close_meteor(meteor: Any) -> str:
    """Kill METEOR's Java process and release its pipes; returns whatever it wrote to stderr (for error notes)."""
    proc = meteor.meteor_p
    # Kill first: a scorer thread blocked on stdout.readline() holds the reader's lock until the pipe hits EOF.
    proc.kill()
    # Nothing more can be done about a process that survives SIGKILL; do not hang on it.
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    err = ""
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        try:
            if stream is proc.stderr and stream is not None:
                err = stream.read().decode("utf-8", "replace")
            if stream is not None:
                stream.close()
        except (OSError, ValueError):
            pass
    # Meteor.compute_score takes a lock and only releases it on success, and Meteor.__del__ takes the same lock, so
    # a failed or timed-out call would otherwise deadlock the garbage collector. The process is dead, so a fresh lock
    # is safe.
    if meteor.lock.locked():
        meteor.lock = threading.Lock()
    return err.strip()


def _compute_caption_metrics(
    predictions: Sequence[str],
    references: Sequence[Sequence[str] | str],
    groups: dict[Hashable, list[int]],
    with_meteor: bool = True,
) -> tuple[dict[str, float | None], dict[Hashable, dict[str, float | None]], list[str]]:
    """Tokenise once, then score all captions and every group (a subset of indices), sharing one METEOR process."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} reference lists; they must match")
    if not predictions:
        raise ValueError("caption metrics need at least one prediction")
    ref_lists: list[list[str]] = []
    for i, (pred, refs) in enumerate(zip(predictions, references, strict=True)):
        if not isinstance(pred, str):
            raise TypeError(f"prediction {i} must be a string, got {type(pred).__name__}")
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"item {i} needs a non-empty list of reference strings, got {refs!r}")
        ref_lists.append(refs)

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    notes: list[str] = []
    java = _java_available()
    flat = list(predictions) + [r for refs in ref_lists for r in refs]
    tokenized = _ptb_tokenize(flat) if java else [_fallback_tokenize(t) for t in flat]
    res: dict[int, list[str]] = {}
    gts: dict[int, list[str]] = {}
    pos = len(predictions)
    for i, refs in enumerate(ref_lists):
        res[i] = [tokenized[i]]
        # A reference that is pure punctuation tokenizes to nothing; it carries no words to match and would give
        # ROUGE-L a spurious one-empty-token LCS, so it is dropped.
        gts[i] = [t for t in tokenized[pos : pos + len(refs)] if t]
        pos += len(refs)
        if not gts[i]:
            raise ValueError(f"item {i}: every reference is empty after tokenization: {refs!r}")

    subsets: dict[str | None, list[int]] = {None: list(range(len(predictions))), **groups}
    results: dict[str | None, dict[str, float | None]] = {}
    for key, idx in subsets.items():
        sub_gts = {i: gts[i] for i in idx}
        sub_res = {i: res[i] for i in idx}
        bleu, _ = Bleu(4).compute_score(sub_gts, sub_res, verbose=0)
        rouge, _ = Rouge().compute_score(sub_gts, sub_res)
        cider, _ = Cider().compute_score(sub_gts, sub_res)
        results[key] = {
            "bleu_1": float(bleu[0]),
            "bleu_2": float(bleu[1]),
            "bleu_3": float(bleu[2]),
            "bleu_4": float(bleu[3]),
            "rouge_l": float(rouge),
            "cider": float(cider),
            "meteor": None,
        }

    if with_meteor and not java:
        notes.append(_JAVA_MISSING_NOTE)
    elif with_meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        try:
            meteor = Meteor()  # spawns `java -jar meteor-1.5.jar`
        except OSError as exc:
            raise RuntimeError(f"could not start METEOR's java process: {exc}") from exc
        err = ""
        try:
            for key, idx in subsets.items():
                # METEOR's line protocol uses " ||| " as a separator; pycocoevalcap only scrubs it from hypotheses.
                sub_gts = {i: [r.replace("|||", " ") for r in gts[i]] for i in idx}
                sub_res = {i: res[i] for i in idx}
                timeout = METEOR_TIMEOUT_BASE_S + METEOR_TIMEOUT_PER_CAPTION_S * len(idx)
                value, _ = _call_with_timeout(lambda g=sub_gts, r=sub_res: meteor.compute_score(g, r), timeout)
                results[key]["meteor"] = float(value)
        except Exception as exc:  # noqa: BLE001 -- METEOR is optional; the other metrics are still valid
            err = f"{type(exc).__name__}: {exc}"
        finally:
            stderr = _close_meteor(meteor)
        if err:
            for metrics in results.values():
                metrics["meteor"] = None
            detail = f"; java stderr: {stderr[:500]}" if stderr else ""
            notes.append(f"METEOR failed and is reported as None ({err}{detail}).")

    for note in notes:
        warnings.warn(note, RuntimeWarning, stacklevel=3)
    overall = results.pop(None)
    return overall, {k: v for k, v in results.items() if k is not None}, notes


def caption_metrics(
    predictions: list[str], references: list[list[str]], *, meteor: bool = True
) -> dict[str, float | None]:
    """COCO caption metrics of ``predictions[i]`` against the reference captions ``references[i]``.

    Returns ``{"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "meteor"}`` as computed by pycocoevalcap's
    Bleu(4) (corpus-level, "closest" reference length), Rouge (ROUGE-L F with beta=1.2, averaged over images), Cider
    (this is CIDEr-D: clipped n-gram counts, Gaussian length penalty, sigma=6, x10 scaling; IDF from the references of
    the evaluated set, so it depends on the whole set and is degenerate for a single image) and Meteor (METEOR 1.5),
    after PTB tokenisation with pycocoevalcap's PTBTokenizer, as COCO does.

    When ``java`` is not on PATH, "meteor" is None, a RuntimeWarning explains that Java is missing, and captions are
    tokenized with a pure-Python PTB approximation (see ``_fallback_tokenize``). If METEOR's Java process fails or
    does not answer within a generous timeout it is killed and "meteor" is None with a warning. The METEOR process is
    always closed before returning. ``meteor=False`` skips METEOR ("meteor" is None, no warning), which saves the
    5-25 s METEOR start-up, e.g. for validation during training.

    A single string in place of a reference list is accepted as one reference. Raises ValueError when the lengths
    differ, the input is empty, or an item has no non-empty reference; TypeError when a prediction is not a string.
    """
    overall, _, _ = _compute_caption_metrics(predictions, references, {}, with_meteor=meteor)
    return overall


# ---------------------------------------------------------------------------------------------------------------------
# Scoring dataset rows
# ---------------------------------------------------------------------------------------------------------------------


def detect_task(rows: list[dict]) -> str:
    """Return "vqa" if every row has an ``answer`` field, "caption" if every row has a ``caption`` field.

    Raises ValueError for an empty list or rows that have neither field (or a mix).
    """
    if not rows:
        raise ValueError("cannot detect the task of an empty list of rows")
    if all("answer" in row for row in rows):
        return "vqa"
    if all("caption" in row for row in rows):
        return "caption"
    raise ValueError(
        "cannot detect the task: VQA rows need an 'answer' field and caption rows a 'caption' field in every row "
        f"(first row has fields {sorted(rows[0])})"
    )


GROUP_FIELDS = ("type", "subtype")
"""Row fields whose values group the metrics: ``by_type`` and ``by_subtype`` in :func:`score`."""


def _groups(rows: list[dict]) -> dict[tuple[str, str], list[int]]:
    """Row indices per (field, value) for each of GROUP_FIELDS, values sorted within a field."""
    groups: dict[tuple[str, str], list[int]] = {}
    for field in GROUP_FIELDS:
        found: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            if row.get(field) is not None:
                found.setdefault(str(row[field]), []).append(i)
        groups.update({(field, value): idx for value, idx in sorted(found.items())})
    return groups


def _row_refs(row: dict, field: str, index: int) -> list[str]:
    if field not in row:
        raise ValueError(f"row {index} has no {field!r} field (fields: {sorted(row)})")
    value = row[field]
    refs = [value] if isinstance(value, str) else value
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise ValueError(f"row {index}: {field!r} must be a string or a non-empty list of strings, got {value!r}")
    return refs


def score(task: str, rows: list[dict], predictions: list[str]) -> dict:
    """Score ``predictions[i]`` against dataset row ``rows[i]``.

    ``task`` is "vqa" (rows carry ``answer``: a string or a list of reference answers) or "caption" (rows carry
    ``caption``: a string or a list of reference captions); see :func:`detect_task`. Returns::

        {"task": task, "num_rows": n, "metrics": {...}, "by_type": {type: {...}}, "type_counts": {type: rows},
         "by_subtype": {subtype: {...}}, "subtype_counts": {subtype: rows}, "notes": [str, ...]}

    For "vqa", metrics are ``vqa_accuracy`` (see :func:`vqa_accuracy`) and ``exact_match`` (see :func:`exact_match`),
    each the mean over rows, in [0, 1]. For "caption", they are those of :func:`caption_metrics`. ``by_type`` holds
    the same metrics computed on the rows sharing each ``type`` value (type names as strings, sorted; rows without a
    ``type`` count only in the overall metrics; ``{}`` when no row has one); ``by_subtype`` does the same for the rows'
    ``subtype`` (e.g. the shapes benchmark's "closest_shape" or "count"). Caption metrics per group are computed on that
    subset alone (CIDEr's IDF then comes from the subset). ``type_counts`` and ``subtype_counts`` give each group's
    number of rows. ``notes`` lists caveats such as a missing Java (METEOR None); it is empty otherwise.

    Raises ValueError on an unknown task, mismatched lengths, no rows, or malformed rows; TypeError when a
    prediction is not a string.
    """
    if task not in ("vqa", "caption"):
        raise ValueError(f"unknown task {task!r}; expected 'vqa' or 'caption'")
    if len(rows) != len(predictions):
        raise ValueError(f"got {len(predictions)} predictions for {len(rows)} rows; they must match one to one")
    if not rows:
        raise ValueError("no rows to score")
    for i, pred in enumerate(predictions):
        if not isinstance(pred, str):
            raise TypeError(f"prediction {i} must be a string, got {type(pred).__name__}")
    groups = _groups(rows)
    notes: list[str] = []

    if task == "vqa":
        refs = [_row_refs(row, "answer", i) for i, row in enumerate(rows)]
        per_row = {
            "vqa_accuracy": [vqa_accuracy(p, r) for p, r in zip(predictions, refs, strict=True)],
            "exact_match": [exact_match(p, r) for p, r in zip(predictions, refs, strict=True)],
        }

        def mean_over(idx: list[int]) -> dict[str, float]:
            return {name: sum(values[i] for i in idx) / len(idx) for name, values in per_row.items()}

        metrics: dict[str, Any] = mean_over(list(range(len(rows))))
        by_group: dict[Hashable, Any] = {key: mean_over(idx) for key, idx in groups.items()}
    else:
        refs = [_row_refs(row, "caption", i) for i, row in enumerate(rows)]
        metrics, by_group, notes = _compute_caption_metrics(predictions, refs, groups)

    result: dict[str, Any] = {"task": task, "num_rows": len(rows), "metrics": metrics}
    for field in GROUP_FIELDS:
        result[f"by_{field}"] = {value: m for (f, value), m in by_group.items() if f == field}
        result[f"{field}_counts"] = {value: len(idx) for (f, value), idx in groups.items() if f == field}
    return {**result, "notes": notes}
