"""`vlm shapes-report`: read a model's relational Sort-of-CLEVR answers back against the scenes they are about.

Accuracy says how often a relational answer is right; this report says what the model does instead. Every image of
`vlm data shapes` can be rebuilt from its name and the seed (:func:`vlm.eval.benchmarks.shapes.scene_for`), so a
predictions file from `vlm eval --output` is enough to ask, for the closest and furthest questions:

* does the answer's last word (the shape) follow the shape most of the other five objects have (``majority``), and
  how often does it equal the shape of the 1st ... 5th closest object (``rank_shape``)? A model that compares
  distances agrees most with the object it is asked about; one that does not agrees with every rank about equally;
* for answers that name an object before its shape ("blue circle", `vlm data shapes --explain`), where does the named
  object stand among the others by distance (``named_rank``: 0 is the closest)?
* for those answers, is the named object the one asked for under other measures of distance (``named_by``): true
  distance, vertical distance alone, horizontal distance alone, or how far apart the patches holding the two centres
  are in the decoder's sequence (row-major patch order, ties broken by true distance)? A decoder that reads patches
  in sequence, with sequence positions, sees the patch below another a whole row of patches away. ``shape_by``
  counts, for every answer, how often its shape is that of the object each measure picks;
* is the answer right as often when the object asked for shares an image patch with the object asked about
  (``shares_patch``) as when it does not (``apart``)? Patches are the encoder's (15 px for the `shapes` preset).

For count questions: how often the answer is the larger of the square and circle counts (``larger_count``), the
guess of a model that ignores the object asked about. For caption rows: the mean fraction of objects whose shape and
whose position the caption gets right (:func:`vlm.eval.benchmarks.shapes.caption_scores`).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from vlm.eval.benchmarks.shapes import (
    _TEMPLATES,
    COLOR_NAMES,
    IMAGE_SIZE,
    SPLITS,
    Obj,
    _find,
    answer_question,
    by_distance,
    caption_scores,
    distance_rank,
    scene_for,
)

from vlm.data import json_lines
from vlm.errors import VLMError

# A `vlm data shapes` image path: its split and index, from which `scene_for` rebuilds its objects.
IMAGE_NAME = re.compile(r"(?:^|/)(" + "|".join(SPLITS) + r")_(\d+)\.png$")
_QUESTION = {
    subtype: re.compile("^" + re.escape(template).replace(re.escape("{c}"), "(" + "|".join(COLOR_NAMES) + ")") + "$")
    for subtype, template in _TEMPLATES.items()
}
_RANKED = ("closest_shape", "furthest_shape")
_MEASURES = ("distance", "vertical", "horizontal", "sequence")


def object_patches(obj: Obj, patch: int) -> set[tuple[int, int]]:
    """The (column, row) cells of a grid of `patch`-pixel squares that the object's bounding box touches."""
    x0, y0, x1, y1 = obj.bbox
    return {(px, py) for px in range(x0 // patch, x1 // patch + 1) for py in range(y0 // patch, y1 // patch + 1)}


def _measure(name: str, patch: int):
    """Distance between two objects' centres by one of `_MEASURES`, as a sort key (true squared distance breaks
    ties)."""
    width = -(-IMAGE_SIZE // patch)  # patches per row

    def key(a: Obj, b: Obj) -> tuple[int, int]:
        (ax, ay), (bx, by) = a.center, b.center
        true = (ax - bx) ** 2 + (ay - by) ** 2
        if name == "vertical":
            return abs(ay - by), true
        if name == "horizontal":
            return abs(ax - bx), true
        if name == "sequence":
            return abs((ay // patch - by // patch) * width + ax // patch - bx // patch), true
        return true, 0

    return key


def shapes_question(row: dict[str, Any]) -> tuple[str, str] | None:
    """``(subtype, colour)`` of a shapes question row, or None for any other row (a caption, another benchmark)."""
    question = row.get("question")
    if not isinstance(question, str):
        return None
    for subtype, rx in _QUESTION.items():
        m = rx.match(question.strip())
        if m:
            return subtype, m.group(1)
    return None


def _ranked(counts: Counter) -> dict[str, Any]:
    return {
        "questions": counts["questions"],
        "right": counts["right"],
        "majority": counts["majority"],
        "rank_shape": [counts[f"rank{k}"] for k in range(5)],
        "named_rank": [counts[f"named{k}"] for k in range(5)],
        "named_other": counts["named_other"],
        "named_by": {m: counts[f"by_{m}"] for m in _MEASURES},
        "shape_by": {m: counts[f"shape_by_{m}"] for m in _MEASURES},
        "shares_patch": {"questions": counts["shared"], "right": counts["shared_right"]},
        "apart": {"questions": counts["apart"], "right": counts["apart_right"]},
    }


def shapes_report(predictions: str, seed: int = 0, patch: int = 15) -> dict:
    """Read the closest, furthest and count answers (and the captions) of a `vlm eval --output` predictions file back
    against the scenes.

    Args:
        predictions: The predictions JSONL (`vlm eval --output REPORT` writes it beside the report) of a model on a
            `vlm data shapes` split; question rows need ``image``, ``question`` and ``prediction``, caption rows
            ``caption`` and ``prediction``. Other rows are skipped and counted, non-relational questions are left out,
            and a failed row (no prediction) counts as wrong.
        seed: The seed the data was generated with (`vlm data shapes --seed`).
        patch: The encoder's patch size in pixels, for ``shares_patch``.

    Returns:
        Per subtype (``closest_shape``, ``furthest_shape``, ``count``) the counts described in the module docstring;
        ``captions`` (``rows``, mean ``shape`` and ``position``); ``skipped_rows`` (neither shapes questions nor
        captions) and ``bad_rows`` (not JSON).
    """
    path = Path(predictions)
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise VLMError(f"patch must be a positive number of pixels, got {patch!r}")
    counts: dict[str, Counter] = {s: Counter() for s in (*_RANKED, "count")}
    measures = {m: _measure(m, patch) for m in _MEASURES}
    caption_rows, caption_sums = 0, Counter()
    skipped = bad = 0
    for line_number, _, row, error in json_lines(path, "predictions file"):
        if error is not None or not isinstance(row, dict):
            bad += 1
            continue
        said_text = str(row.get("prediction") or "").lower()
        if isinstance(row.get("caption"), str) and "question" not in row:
            try:
                caption_sums.update(caption_scores(said_text, row["caption"]))
            except ValueError as e:
                raise VLMError(f"{path}:{line_number}: {e}") from None
            caption_rows += 1
            continue
        asked = shapes_question(row)
        if asked is None or asked[0] not in counts:
            skipped += asked is None
            continue
        subtype, color = asked
        m = IMAGE_NAME.search(str(row.get("image", "")))
        if not m:
            raise VLMError(
                f"{path}:{line_number}: image {row.get('image')!r} is not named like a `vlm data shapes` image "
                "(images/SPLIT_INDEX.png)"
            )
        scene = scene_for(m.group(1), int(m.group(2)), seed)
        words = said_text.split()
        said = words[-1] if words else ""
        c = counts[subtype]
        c["questions"] += 1
        right = said == answer_question(scene, color, subtype)
        c["right"] += right
        if subtype == "count":
            squares = sum(o.shape == "square" for o in scene)
            c["larger_count"] += said == str(max(squares, len(scene) - squares))
            continue
        others = by_distance(scene, color)
        target = others[0] if subtype == "closest_shape" else others[-1]
        shapes = Counter(o.shape for o in others)
        c["majority"] += said == max(shapes, key=lambda s: shapes[s])  # 5 objects, 2 shapes: never a tie
        for rank, o in enumerate(others):
            c[f"rank{rank}"] += said == o.shape
        x, pick = _find(scene, color), min if subtype == "closest_shape" else max
        picked = {m: pick(others, key=lambda o, key=key: key(x, o)) for m, key in measures.items()}
        for m, o in picked.items():
            c[f"shape_by_{m}"] += said == o.shape
        if len(words) >= 2 and words[-2] in COLOR_NAMES:
            try:
                c[f"named{distance_rank(scene, color, words[-2])}"] += 1
            except ValueError:  # the asked-about object itself
                c["named_other"] += 1
            for m, o in picked.items():
                c[f"by_{m}"] += o.color == words[-2]
        where = "shared" if object_patches(x, patch) & object_patches(target, patch) else "apart"
        c[where] += 1
        c[f"{where}_right"] += right
    if not caption_rows and not any(c["questions"] for c in counts.values()):
        raise VLMError(f"{path} holds no Sort-of-CLEVR closest, furthest or count questions and no captions")
    report: dict[str, Any] = {"predictions": str(path), "seed": seed, "patch": patch}
    for subtype in _RANKED:
        report[subtype] = _ranked(counts[subtype])
    c = counts["count"]
    report["count"] = {"questions": c["questions"], "right": c["right"], "larger_count": c["larger_count"]}
    report["captions"] = {
        "rows": caption_rows,
        **{k: caption_sums[k] / max(caption_rows, 1) for k in ("shape", "position")},
    }
    report["skipped_rows"] = skipped
    report["bad_rows"] = bad
    return report
