"""Tests for `vlm shapes-report` (eval/benchmarks/shapes_report.py) on predictions of a small generated set.

The predictions are the generator's own answers (right by construction), a fixed guess, or the majority shape as
this file computes it from the rebuilt scenes; the report must count each the way its definition says.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from vlm.eval.benchmarks.shapes import generate_shapes, scene_for
from vlm.eval.benchmarks.shapes_report import shapes_report

from vlm.cli import main

SEED = 3
TEST_IMAGES = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """The test split's question rows, with answers plain and explained (same questions: same seed), and captions."""
    rows = {}
    for name, explain in (("plain", False), ("explained", True)):
        out = tmp_path_factory.mktemp(name)
        generate_shapes(out, train=0, val=0, test=TEST_IMAGES, seed=SEED, explain=explain)
        rows[name] = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    rows["captions"] = [json.loads(line) for line in (out / "test_captions.jsonl").read_text().splitlines()]
    return rows


def _write(path: Path, rows: list[dict], predict) -> Path:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps({**row, "prediction": predict(row)}) + "\n")
    return path


def _n(rows: list[dict], subtype: str) -> int:
    return sum(r["subtype"] == subtype for r in rows)


def test_right_answers_agree_with_the_asked_for_rank(data: dict, tmp_path: Path) -> None:
    rows = data["plain"]
    report = shapes_report(str(_write(tmp_path / "p.jsonl", rows, lambda r: r["answer"])), seed=SEED)
    closest, furthest, count = report["closest_shape"], report["furthest_shape"], report["count"]
    assert closest["questions"] == _n(rows, "closest_shape") > 0
    assert furthest["questions"] == _n(rows, "furthest_shape") > 0
    assert count["questions"] == count["right"] == _n(rows, "count") > 0
    assert closest["right"] == closest["rank_shape"][0] == closest["questions"]
    assert furthest["right"] == furthest["rank_shape"][4] == furthest["questions"]
    # the other ranks agree only where their shape happens to be the same
    assert min(closest["rank_shape"][1:]) < closest["questions"]
    assert closest["named_rank"] == [0] * 5 and closest["named_other"] == 0  # one-word answers name no object
    assert report["skipped_rows"] == report["bad_rows"] == 0


def test_explained_answers_name_the_closest_and_furthest_object(data: dict, tmp_path: Path) -> None:
    rows = data["explained"]
    report = shapes_report(str(_write(tmp_path / "p.jsonl", rows, lambda r: r["answer"])), seed=SEED)
    n_closest, n_furthest = _n(rows, "closest_shape"), _n(rows, "furthest_shape")
    assert report["closest_shape"]["named_rank"] == [n_closest, 0, 0, 0, 0]
    assert report["furthest_shape"]["named_rank"] == [0, 0, 0, 0, n_furthest]
    assert report["closest_shape"]["right"] == n_closest and report["count"]["right"] == _n(rows, "count")
    # naming the asked-about object itself (or no object of the scene) is counted apart
    wrong = lambda r: r["question"].split()[-2] + " square" if "closest" in r["question"] else r["answer"]  # noqa: E731
    named_self = shapes_report(str(_write(tmp_path / "w.jsonl", rows, wrong)), seed=SEED)["closest_shape"]
    assert named_self["named_other"] == n_closest and sum(named_self["named_rank"]) == 0


def _nearest_in_sequence(row: dict) -> str:
    """The object named by a model that takes "closest" to mean closest in row-major order of 15 px patches (the
    `shapes` preset's 5x5 grid), the true distance breaking ties; an explained answer naming it."""
    split, index = Path(row["image"]).stem.split("_")
    color = row["question"].split()[-2]
    scene = scene_for(split, int(index), SEED)
    x = next(o for o in scene if o.color == color)

    def apart(o):
        cells = [(c[1] // 15) * 5 + c[0] // 15 for c in (o.center, x.center)]
        return abs(cells[0] - cells[1]), (o.center[0] - x.center[0]) ** 2 + (o.center[1] - x.center[1]) ** 2

    y = min((o for o in scene if o is not x), key=apart)
    return f"{y.color} {y.shape}"


def test_named_objects_are_read_by_several_measures_of_distance(data: dict, tmp_path: Path) -> None:
    rows = [r for r in data["explained"] if r["subtype"] == "closest_shape"]
    right = shapes_report(str(_write(tmp_path / "r.jsonl", rows, lambda r: r["answer"])), seed=SEED)["closest_shape"]
    n = len(rows)
    assert right["named_by"]["distance"] == right["shape_by"]["distance"] == n
    assert right["named_by"]["vertical"] < n and right["named_by"]["horizontal"] < n
    in_sequence = shapes_report(str(_write(tmp_path / "q.jsonl", rows, _nearest_in_sequence)), seed=SEED)
    by = in_sequence["closest_shape"]["named_by"]
    assert by["sequence"] == n and by["distance"] == in_sequence["closest_shape"]["named_rank"][0] < n
    assert in_sequence["closest_shape"]["shape_by"]["sequence"] == n  # its shape is the sequence-closest one's
    # One-word answers name nothing, but their shapes are read by every measure all the same.
    plain = [r for r in data["plain"] if r["subtype"] == "closest_shape"]
    one_word = shapes_report(str(_write(tmp_path / "o.jsonl", plain, lambda r: r["answer"])), seed=SEED)
    assert one_word["closest_shape"]["named_by"] == dict.fromkeys(by, 0)
    assert one_word["closest_shape"]["shape_by"]["distance"] == len(plain)
    assert one_word["closest_shape"]["shape_by"]["horizontal"] < len(plain)
    # Furthest questions count the named object that is furthest by each measure.
    far = [r for r in data["explained"] if r["subtype"] == "furthest_shape"]
    far_report = shapes_report(str(_write(tmp_path / "f.jsonl", far, lambda r: r["answer"])), seed=SEED)
    assert far_report["furthest_shape"]["named_by"]["distance"] == len(far)


def _majority_shape(row: dict) -> str:
    split, index = Path(row["image"]).stem.split("_")
    color = row["question"].split()[-2]
    shapes = Counter(o.shape for o in scene_for(split, int(index), SEED) if o.color != color)
    return shapes.most_common(1)[0][0]


def test_majority_and_fixed_guesses(data: dict, tmp_path: Path) -> None:
    rows = [r for r in data["plain"] if r["subtype"] in ("closest_shape", "furthest_shape")]
    report = shapes_report(str(_write(tmp_path / "m.jsonl", rows, _majority_shape)), seed=SEED)
    for subtype in ("closest_shape", "furthest_shape"):
        assert report[subtype]["majority"] == report[subtype]["questions"] == _n(rows, subtype)
    assert report["count"]["questions"] == 0
    squares = shapes_report(str(_write(tmp_path / "s.jsonl", rows, lambda r: "square")), seed=SEED)["closest_shape"]
    truth = sum(r["answer"] == "square" for r in rows if r["subtype"] == "closest_shape")
    assert squares["right"] == squares["rank_shape"][0] == truth
    assert squares["shares_patch"]["right"] + squares["apart"]["right"] == truth


def test_larger_count(data: dict, tmp_path: Path) -> None:
    rows = [r for r in data["plain"] if r["subtype"] == "count"]

    def larger(row: dict) -> str:
        split, index = Path(row["image"]).stem.split("_")
        squares = sum(o.shape == "square" for o in scene_for(split, int(index), SEED))
        return str(max(squares, 6 - squares))

    count = shapes_report(str(_write(tmp_path / "c.jsonl", rows, larger)), seed=SEED)["count"]
    assert count["larger_count"] == count["questions"] == len(rows)
    assert count["right"] == sum(r["answer"] == larger(r) for r in rows) < len(rows)


def test_captions_are_read_back_object_by_object(data: dict, tmp_path: Path) -> None:
    rows = data["captions"]

    def half_wrong(row: dict) -> str:  # every second object's shape swapped, positions kept
        parts = row["caption"].split(", ")
        swap = {"square": "circle", "circle": "square"}
        return ", ".join(" ".join(swap.get(w, w) for w in p.split()) if i % 2 else p for i, p in enumerate(parts))

    right = shapes_report(str(_write(tmp_path / "r.jsonl", rows, lambda r: r["caption"])))["captions"]
    assert right == {"rows": len(rows), "shape": 1.0, "position": 1.0}
    half = shapes_report(str(_write(tmp_path / "h.jsonl", rows, half_wrong)))["captions"]
    assert half == {"rows": len(rows), "shape": 0.5, "position": 1.0}
    failed = shapes_report(str(_write(tmp_path / "f.jsonl", rows, lambda r: None)))
    assert failed["captions"] == {"rows": len(rows), "shape": 0.0, "position": 0.0}
    assert failed["closest_shape"]["questions"] == 0


def test_patch_sharing_follows_the_patch_size(data: dict, tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", data["plain"], lambda r: r["answer"])
    whole = shapes_report(str(path), seed=SEED, patch=75)  # one patch: everything shares it
    single = shapes_report(str(path), seed=SEED, patch=1)  # pixels: objects never touch
    for subtype in ("closest_shape", "furthest_shape"):
        n = whole[subtype]["questions"]
        assert whole[subtype]["shares_patch"] == {"questions": n, "right": n}
        assert single[subtype]["apart"] == {"questions": n, "right": n}
    default = shapes_report(str(path), seed=SEED)["closest_shape"]
    assert default["shares_patch"]["questions"] + default["apart"]["questions"] == default["questions"]


def test_broken_rows_are_counted_and_failed_rows_are_wrong(data: dict, tmp_path: Path) -> None:
    rows = [r for r in data["plain"] if r["subtype"] == "closest_shape"]
    path = _write(tmp_path / "p.jsonl", rows, lambda r: None)  # every row failed, as `vlm eval` writes it
    with path.open("a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"image": "images/test_00000.png", "text": "a red square", "prediction": "x"}) + "\n")
    report = shapes_report(str(path), seed=SEED)
    assert report["closest_shape"]["questions"] == len(rows) and report["closest_shape"]["right"] == 0
    assert report["bad_rows"] == 1 and report["skipped_rows"] == 1


def test_the_wrong_seed_changes_the_scenes(data: dict, tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", data["plain"], lambda r: r["answer"])
    other = shapes_report(str(path), seed=SEED + 1)["closest_shape"]
    assert other["right"] < other["questions"]


def test_cli_prints_the_report_and_bad_input_is_one_line(data: dict, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("VLM_DEBUG", raising=False)
    path = _write(tmp_path / "p.jsonl", data["plain"], lambda r: r["answer"])

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["shapes-report", *args])
        out, err = capsys.readouterr()
        return e.value.code, out, err

    code, out, _ = run(str(path), "--seed", str(SEED))
    assert code == 0 and json.loads(out) == shapes_report(str(path), seed=SEED)
    bad_image = tmp_path / "b.jsonl"
    relational = next(r for r in data["plain"] if r["subtype"] == "count")
    bad_image.write_text(json.dumps({**relational, "image": "photo.png", "prediction": "x"}) + "\n")
    empty_caption = tmp_path / "e.jsonl"
    empty_caption.write_text(json.dumps({"image": "images/test_00000.png", "caption": "", "prediction": "x"}) + "\n")
    other = tmp_path / "o.jsonl"
    other.write_text(json.dumps({"image": "images/test_00000.png", "text": "x", "prediction": "x"}) + "\n")
    for args, words in (
        ((str(tmp_path / "missing.jsonl"),), "not found"),
        ((str(bad_image),), "is not named like"),
        ((str(other),), "holds no Sort-of-CLEVR"),
        ((str(empty_caption),), "e.jsonl:1: the reference caption describes no object"),
        ((str(path), "--patch", "0"), "patch must be"),
    ):
        code, out, err = run(*args)
        lines = err.strip().splitlines()
        assert code == 2 and out == "" and len(lines) == 1 and words in lines[0], (args, err)
        assert "Traceback" not in err
