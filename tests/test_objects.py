"""Tests for the objects VQA generator (eval/benchmarks/objects.py).

Every image's objects are re-derived from its pixels (colour mask -> bounding box, centroid, and the shape from how
much of its bounding box the mask fills) and every answer and caption is recomputed from those, so the answers are
checked against the pictures rather than against the generator's own bookkeeping.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import run_vlm
from PIL import Image
from vlm.eval.benchmarks.objects import (
    COLOR_NAMES,
    COLORS,
    MAX_SIZE,
    MIN_SIZE,
    QUESTIONS_PER_IMAGE,
    SHAPES,
    SPLITS,
    SUBTYPES,
    Obj,
    caption_for_scene,
    generate_objects,
    questions_for_scene,
    random_scene,
    render_scene,
    scene_for,
)

COUNTS = {"train": 12, "val": 4, "test": 4}
SEED = 5
SIZE = 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("objects")
    return out, generate_objects(out, seed=SEED, **COUNTS)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pixel_objects(img: Image.Image) -> dict[str, dict]:
    """Each colour's object from the pixels alone: bounding box, centroid x, shape (by fill ratio of the box)."""
    a = np.asarray(img.convert("RGB"))
    known = (a == 255).all(-1)
    objects = {}
    for name, rgb in COLORS.items():
        mask = (a == rgb).all(-1)
        known |= mask
        if not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        box = (xs.min(), ys.min(), xs.max(), ys.max())
        fill = mask.sum() / ((box[2] - box[0] + 1) * (box[3] - box[1] + 1))
        shape = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
        objects[name] = {"box": tuple(int(v) for v in box), "x": xs.mean(), "shape": shape}
    assert known.all(), "every pixel is white or one of the object colours"
    return objects


def _answer_from_pixels(question: str, objs: dict[str, dict]) -> str:
    mid = (SIZE - 1) / 2
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        return objs[m[1]]["shape"]
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        (color,) = [c for c, o in objs.items() if o["shape"] == m[1]]
        return color
    if question == "How many objects are there?":
        return str(len(objs))
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return str(sum(o["shape"] == m[1] for o in objs.values()))
    if m := re.fullmatch(r"Is the (\w+) object on the left or on the right\?", question):
        return "left" if objs[m[1]]["x"] < mid else "right"
    if m := re.fullmatch(r"Is there a (\w+) (\w+)\?", question):
        return "yes" if m[1] in objs and objs[m[1]]["shape"] == m[2] else "no"
    raise AssertionError(f"unknown question {question!r}")


def test_answers_match_the_pixels(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    for split in SPLITS:
        rows = _read_jsonl(out / f"{split}.jsonl")
        assert len(rows) == QUESTIONS_PER_IMAGE * COUNTS[split]
        for row in rows:
            objs = _pixel_objects(Image.open(out / row["image"]))
            assert row["type"] == row["subtype"] and row["subtype"] in SUBTYPES
            assert row["answer"] == _answer_from_pixels(row["question"], objs), row


def test_scene_for_matches_the_pixels(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    for split in SPLITS:
        for index in range(COUNTS[split]):
            img = Image.open(out / f"images/{split}_{index:05d}.png")
            assert img.mode == "RGB" and img.size == (SIZE, SIZE)
            scene = scene_for(split, index, seed=SEED)
            objs = _pixel_objects(img)
            assert sorted(objs) == sorted(o.color for o in scene)
            for o in scene:
                x, y = o.center
                assert img.getpixel((round(x), round(y))) == o.rgb, "the object's colour is at its centre"
                assert objs[o.color]["box"] == o.bbox and objs[o.color]["shape"] == o.shape
                assert abs(x - (SIZE - 1) / 2) > 2, "no centre within 2 px of the middle column"


def test_caption_lists_the_objects_left_to_right(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    for row in _read_jsonl(out / "train_captions.jsonl"):
        objs = _pixel_objects(Image.open(out / row["image"]))
        left_to_right = sorted(objs, key=lambda c: objs[c]["x"])
        expected = [
            f"a {c} {objs[c]['shape']} on the {'left' if objs[c]['x'] < (SIZE - 1) / 2 else 'right'}"
            for c in left_to_right
        ]
        assert re.split(r", | and ", row["caption"]) == expected


def test_caption_wording() -> None:
    red, blue = Obj("red", "circle", 40, 5, 12), Obj("blue", "triangle", 2, 30, 14)
    assert caption_for_scene([red]) == "a red circle on the right"
    assert caption_for_scene([red, blue]) == "a blue triangle on the left and a red circle on the right"
    green = Obj("green", "square", 14, 2, 12)
    assert caption_for_scene([red, blue, green]) == (
        "a blue triangle on the left, a green square on the left and a red circle on the right"
    )


def test_chat_rows_hold_each_images_questions(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    for split in SPLITS:
        questions = _read_jsonl(out / f"{split}.jsonl")
        chats = _read_jsonl(out / f"{split}_chat.jsonl")
        assert len(chats) == COUNTS[split]
        for i, chat in enumerate(chats):
            mine = [r for r in questions if r["image"] == chat["image"]]
            assert chat["image"] == f"images/{split}_{i:05d}.png"
            assert chat["conversations"] == [
                {"role": role, "content": r[key]}
                for r in mine
                for role, key in (("user", "question"), ("assistant", "answer"))
            ]


def test_layout_and_summary(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    assert summary["seed"] == SEED and summary["image_size"] == SIZE
    for split in SPLITS:
        info = summary["splits"][split]
        assert info["images"] == info["captions"] == COUNTS[split]
        assert info["questions"] == QUESTIONS_PER_IMAGE * COUNTS[split]
        for key in ("questions_file", "captions_file", "chat_file"):
            assert Path(info[key]).is_file()
        assert len(list((out / "images").glob(f"{split}_*.png"))) == COUNTS[split]


def test_same_seed_same_bytes_other_seed_differs(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = dataset
    generate_objects(tmp_path / "same", seed=SEED, **COUNTS)
    assert _all_files(tmp_path / "same") == _all_files(out)
    generate_objects(tmp_path / "other", seed=SEED + 1, **COUNTS)
    ours, other = _all_files(out), _all_files(tmp_path / "other")
    assert other.keys() == ours.keys()
    assert sum(other[k] != ours[k] for k in ours) > len(ours) // 2


def test_scenes_questions_and_balance() -> None:
    """Many scenes without files: valid scenes, 8 distinct questions, subtypes as even as each scene allows."""
    subtypes, exists, n_objects = Counter(), Counter(), Counter()
    for i in range(300):
        rng = np.random.default_rng(i)
        scene = random_scene(rng, SIZE)
        n_objects[len(scene)] += 1
        assert len({o.color for o in scene}) == len(scene)
        assert all(o.shape in SHAPES and MIN_SIZE <= o.size <= MAX_SIZE for o in scene)
        assert all(0 <= v < SIZE for o in scene for v in o.bbox)
        rows = questions_for_scene(scene, rng, SIZE)
        assert len(rows) == QUESTIONS_PER_IMAGE == len({r["question"] for r in rows})
        per_image = Counter(r["subtype"] for r in rows)
        shapes = Counter(o.shape for o in scene)
        available = {
            "shape": len(scene),
            "color": sum(n == 1 for n in shapes.values()),
            "count": 1 + len(SHAPES),
            "position": len(scene),
            "exists": len(COLOR_NAMES) * len(SHAPES),
        }
        # Round-robin: only a subtype that ran out of questions falls more than one behind the others.
        for s in SUBTYPES:
            assert per_image[s] <= available[s]
            assert per_image[s] == available[s] or per_image[s] >= max(per_image.values()) - 1, (per_image, available)
        subtypes.update(per_image)
        exists.update(r["answer"] for r in rows if r["subtype"] == "exists")
    assert set(n_objects) == {1, 2, 3, 4}
    assert all(subtypes[s] > 0.1 * 300 * QUESTIONS_PER_IMAGE for s in SUBTYPES), subtypes
    assert 0.4 < exists["yes"] / sum(exists.values()) < 0.6


def test_smallest_images_match_their_scenes(tmp_path: Path) -> None:
    generate_objects(tmp_path, train=30, val=0, test=0, seed=1, image_size=48)
    for index in range(30):
        img = Image.open(tmp_path / f"images/train_{index:05d}.png")
        scene = scene_for("train", index, seed=1, image_size=48)
        assert img.size == (48, 48) and img.tobytes() == render_scene(scene, 48).tobytes()
        assert all(abs(o.center[0] - 23.5) > 2 for o in scene)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"train": -1}, "train"),
        ({"val": 1.5}, "val"),
        ({"test": "2"}, "test"),
        ({"train": True}, "train"),
        ({"seed": -1}, "seed"),
        ({"seed": None}, "seed"),
        ({"image_size": 47}, "image_size"),
        ({"image_size": 64.0}, "image_size"),
        ({"out": None}, "out"),
        ({"out": ""}, "out"),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path: Path, kwargs: dict, name: str) -> None:
    args = {"out": tmp_path / "x", "train": 1, "val": 1, "test": 1, **kwargs}
    with pytest.raises(ValueError, match=name) as info:
        generate_objects(**args)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "x").exists(), "nothing should be written when the arguments are bad"


def test_out_must_not_be_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file.txt"
    path.write_text("x")
    with pytest.raises(ValueError, match="out must be a folder"):
        generate_objects(path, train=1, val=0, test=0)


def test_colours_are_distinct_from_white_and_each_other() -> None:
    assert len(set(COLORS.values())) == len(COLOR_NAMES) == 5
    assert (255, 255, 255) not in COLORS.values()


def test_cli(tmp_path: Path) -> None:
    done = run_vlm(["data", "objects", "--out", tmp_path, "--train", "3", "--val", "1", "--test", "1"])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["splits"]["train"]["questions"] == 3 * QUESTIONS_PER_IMAGE
    assert len(_read_jsonl(tmp_path / "train_chat.jsonl")) == 3
    done = run_vlm(["data", "objects", "--out", tmp_path, "--train=-1"])
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("vlm: error: "), done.stderr
    assert "train must be a non-negative integer" in lines[0]
