"""Tests for the Sort-of-CLEVR generator (eval/benchmarks/shapes.py).

The central check re-derives every object from the rendered pixels (colour mask -> centroid, and square vs circle by
whether the mask fills its bounding box) and recomputes every answer from that, so the answers are checked against
the pictures rather than against the generator's own bookkeeping.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from vlm.eval.benchmarks.shapes import (
    CAPTION_PROMPT,
    COLOR_NAMES,
    COLORS,
    IMAGE_SIZE,
    NON_RELATIONAL_SUBTYPES,
    RELATIONAL_SUBTYPES,
    SPLITS,
    answer_question,
    caption_for_scene,
    caption_scores,
    distance_rank,
    generate_shapes,
    questions_for_scene,
    random_scene,
    render_scene,
    scene_for,
)

from vlm.config import VLMConfig

COUNTS = {"train": 6, "val": 3, "test": 3}
SEED = 7
WHITE = (255, 255, 255)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes")
    summary = generate_shapes(out, seed=SEED, **COUNTS)
    return out, summary


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pixel_objects(img: Image.Image) -> dict[str, dict]:
    """Find each colour's object in an image: centroid (continuous coordinates) and shape, from pixels only."""
    a = np.asarray(img.convert("RGB")).astype(np.int16)
    known = np.zeros(a.shape[:2], dtype=bool)
    objects = {}
    for name, rgb in COLORS.items():
        mask = (a == rgb).all(-1)
        known |= mask
        ys, xs = np.nonzero(mask)
        assert len(xs) > 0, f"no {name} pixels"
        w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        assert (w, h) == (11, 11), f"{name} object is {w}x{h} px; expected an unoccluded 11x11 object"
        # A square fills its bounding box; a circle leaves the corners white.
        shape = "square" if mask.sum() == w * h else "circle"
        # Pixel i covers [i, i + 1), so its centre is at i + 0.5; the image centre is then IMAGE_SIZE / 2.
        objects[name] = {"center": (xs.mean() + 0.5, ys.mean() + 0.5), "shape": shape, "count": int(mask.sum())}
    background = (a == WHITE).all(-1)
    assert (known | background).all(), "pixels of an unexpected colour (anti-aliasing or overlap?)"
    return objects


def _answer_from_pixels(objects: dict[str, dict], color: str, subtype: str) -> str:
    x = objects[color]
    cx, cy = x["center"]
    mid = IMAGE_SIZE / 2
    if subtype == "shape":
        return x["shape"]
    if subtype == "horizontal":
        assert cx != mid, "object centred on the middle column: left/right is ambiguous"
        return "left" if cx < mid else "right"
    if subtype == "vertical":
        assert cy != mid, "object centred on the middle row: top/bottom is ambiguous"
        return "top" if cy < mid else "bottom"
    if subtype in ("closest_shape", "furthest_shape"):
        dist = sorted(
            ((ox - cx) ** 2 + (oy - cy) ** 2, other["shape"])
            for name, other in objects.items()
            if name != color
            for ox, oy in [other["center"]]
        )
        pick, runner_up = (dist[0], dist[1]) if subtype == "closest_shape" else (dist[-1], dist[-2])
        assert pick[0] != runner_up[0], f"{subtype} of {color} is tied"
        return pick[1]
    if subtype == "count":
        return str(sum(o["shape"] == x["shape"] for o in objects.values()))
    raise AssertionError(f"unknown subtype {subtype}")


def _color_in(question: str) -> str:
    named = [c for c in COLOR_NAMES if re.search(rf"\b{c}\b", question)]
    assert len(named) == 1, f"question should name exactly one colour: {question!r}"
    return named[0]


def test_answers_match_the_pixels(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    checked = 0
    for split in SPLITS:
        rows = _read_jsonl(out / f"{split}.jsonl")
        by_image: dict[str, list[dict]] = {}
        for row in rows:
            by_image.setdefault(row["image"], []).append(row)
        for image, questions in by_image.items():
            objects = _pixel_objects(Image.open(out / image))
            for row in questions:
                expected = _answer_from_pixels(objects, _color_in(row["question"]), row["subtype"])
                assert row["answer"] == expected, (image, row)
                checked += 1
    assert checked == 20 * sum(COUNTS.values())


def test_scene_for_matches_the_pixels(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    for split, n in COUNTS.items():
        for index in range(n):
            scene = scene_for(split, index, seed=SEED)
            objects = _pixel_objects(Image.open(out / f"images/{split}_{index:05d}.png"))
            assert [o.color for o in scene] == list(COLOR_NAMES)
            for obj in scene:
                assert objects[obj.color]["shape"] == obj.shape
                assert objects[obj.color]["center"] == (obj.center[0] + 0.5, obj.center[1] + 0.5)


def test_counts_splits_and_layout(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    assert sorted(summary["splits"]) == sorted(SPLITS)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        f"{split}_{i:05d}.png" for split, n in COUNTS.items() for i in range(n)
    )
    for split, n in COUNTS.items():
        info = summary["splits"][split]
        assert (info["images"], info["questions"], info["captions"]) == (n, 20 * n, n)
        questions = _read_jsonl(Path(info["questions_file"]))
        captions = _read_jsonl(Path(info["captions_file"]))
        assert Path(info["questions_file"]) == out / f"{split}.jsonl"
        assert Path(info["captions_file"]) == out / f"{split}_captions.jsonl"
        assert len(questions) == 20 * n and len(captions) == n
        images = [f"images/{split}_{i:05d}.png" for i in range(n)]
        assert [c["image"] for c in captions] == images
        assert sorted({q["image"] for q in questions}) == images
        relational = _read_jsonl(Path(info["relational_file"]))
        assert Path(info["relational_file"]) == out / f"{split}_relational.jsonl"
        assert relational == [q for q in questions if q["type"] == "relational"] and len(relational) == 10 * n
        chats = _read_jsonl(Path(info["chat_file"]))
        assert [c["image"] for c in chats] == [i for i in images for _ in range(4)]
        for image in images:
            rows = [q for q in questions if q["image"] == image]
            # Its 4 conversations hold the same 20 question/answer pairs, 5 each, alternating user/assistant.
            turns = [t for c in chats if c["image"] == image for t in c["conversations"]]
            assert [t["role"] for t in turns] == ["user", "assistant"] * 20
            pairs = sorted((turns[i]["content"], turns[i + 1]["content"]) for i in range(0, 40, 2))
            assert pairs == sorted((q["question"], q["answer"]) for q in rows)
        for image in images:
            rows = [q for q in questions if q["image"] == image]
            assert [q["type"] for q in rows].count("non_relational") == 10
            assert [q["type"] for q in rows].count("relational") == 10
            with Image.open(out / image) as img:  # paths are relative to the JSONL folder
                assert (img.size, img.mode) == ((IMAGE_SIZE, IMAGE_SIZE), "RGB")
        for q in questions:
            assert set(q) == {"image", "question", "answer", "type", "subtype"}
            allowed = NON_RELATIONAL_SUBTYPES if q["type"] == "non_relational" else RELATIONAL_SUBTYPES
            assert q["subtype"] in allowed
            assert q["question"].endswith("?")
            assert re.fullmatch(r"[a-z0-9]+", q["answer"]), q


def test_same_seed_same_bytes_other_seed_differs(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = dataset
    generate_shapes(tmp_path / "again", seed=SEED, **COUNTS)
    generate_shapes(tmp_path / "other", seed=SEED + 1, **COUNTS)
    first, again, other = _all_files(out), _all_files(tmp_path / "again"), _all_files(tmp_path / "other")
    assert first == again
    assert first.keys() == other.keys()
    for name in first:  # every file, images and JSONL alike, changes with the seed
        assert first[name] != other[name], name


def test_splits_use_independent_streams(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = dataset
    firsts = {(out / f"images/{split}_00000.png").read_bytes() for split in SPLITS}
    assert len(firsts) == 3
    # Each image has its own stream: growing one split changes neither its prefix nor the other splits.
    generate_shapes(tmp_path, train=COUNTS["train"] + 2, val=0, test=COUNTS["test"], seed=SEED)
    for split, n in (("train", COUNTS["train"]), ("test", COUNTS["test"])):
        for i in range(n):
            name = f"images/{split}_{i:05d}.png"
            assert (tmp_path / name).read_bytes() == (out / name).read_bytes()


def test_scenes_are_valid_and_unambiguous() -> None:
    rng = np.random.default_rng(123)
    for _ in range(200):
        scene = random_scene(rng)
        assert sorted(o.color for o in scene) == sorted(COLOR_NAMES)  # 6 distinct colours
        assert {o.shape for o in scene} <= {"square", "circle"}
        for o in scene:
            x0, y0, x1, y1 = o.bbox
            assert min(x0, y0) >= 0 and max(x1, y1) < IMAGE_SIZE
        for i, a in enumerate(scene):
            for b in scene[i + 1 :]:
                ax0, ay0, ax1, ay1 = a.bbox
                bx0, by0, bx1, by1 = b.bbox
                assert ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0, f"{a} overlaps {b}"
        # The pixel reader asserts 11x11 unoccluded objects, no stray colours and no ties in any answer.
        objects = _pixel_objects(render_scene(scene))
        for color in COLOR_NAMES:
            for subtype in NON_RELATIONAL_SUBTYPES + RELATIONAL_SUBTYPES:
                assert answer_question(scene, color, subtype) == _answer_from_pixels(objects, color, subtype)
        assert {o["count"] for o in objects.values() if o["shape"] == "square"} <= {121}


def _explained_from_pixels(objects: dict[str, dict], color: str, subtype: str, cell: int = 0) -> str:
    """The explained answer from pixels alone: the colour of the closest/furthest object (after the asked-about
    object's grid cell, with ``cell``), or the counted shape."""
    x = objects[color]
    if subtype in ("closest_shape", "furthest_shape"):
        cx, cy = x["center"]
        dist = {n: (o["center"][0] - cx) ** 2 + (o["center"][1] - cy) ** 2 for n, o in objects.items() if n != color}
        name = (min if subtype == "closest_shape" else max)(dist, key=dist.__getitem__)
        where = f"{int(cx // cell)} {int(cy // cell)} " if cell else ""  # centre pixel i is at i + 0.5
        return f"{where}{name} {objects[name]['shape']}"
    if subtype == "count":
        return f"{x['shape']}s: {_answer_from_pixels(objects, color, subtype)}"
    return _answer_from_pixels(objects, color, subtype)


def test_explained_answers_match_the_pixels(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = dataset
    summary = generate_shapes(tmp_path, seed=SEED, explain=True, **COUNTS)
    assert summary["explain"] == list(RELATIONAL_SUBTYPES)
    # The same benchmark: images, captions and questions are those written without explain.
    plain, explained = _all_files(out), _all_files(tmp_path)
    assert set(plain) == set(explained)
    for name in plain:
        if name.startswith("images/") or "captions" in name:
            assert explained[name] == plain[name], name
    checked = 0
    for split in SPLITS:
        rows, plain_rows = _read_jsonl(tmp_path / f"{split}.jsonl"), _read_jsonl(out / f"{split}.jsonl")
        assert len(rows) == len(plain_rows)
        for row, plain_row in zip(rows, plain_rows, strict=True):
            assert {k: v for k, v in row.items() if k != "answer"} == {
                k: v for k, v in plain_row.items() if k != "answer"
            }
            objects = _pixel_objects(Image.open(tmp_path / row["image"]))
            assert row["answer"] == _explained_from_pixels(objects, _color_in(row["question"]), row["subtype"])
            # The last word is the paper's answer; relational answers have one more word before it.
            assert row["answer"].split()[-1] == plain_row["answer"]
            assert len(row["answer"].split()) == (2 if row["type"] == "relational" else 1)
            checked += 1
            if row["subtype"] in ("closest_shape", "furthest_shape"):  # distance_rank reads the answer back
                scene = scene_for(split, int(row["image"][-9:-4]), SEED)
                rank = distance_rank(scene, _color_in(row["question"]), row["answer"].split()[0])
                assert rank == (0 if row["subtype"] == "closest_shape" else 4)
    assert checked == 20 * sum(COUNTS.values())
    scene = scene_for("train", 0, SEED)
    for x in scene:
        ranks = {o.color: distance_rank(scene, x.color, o.color) for o in scene if o is not x}
        by_rank = sorted(ranks, key=ranks.__getitem__)
        d2 = [
            (o.center[0] - x.center[0]) ** 2 + (o.center[1] - x.center[1]) ** 2
            for c in by_rank
            for o in scene
            if o.color == c
        ]
        assert sorted(ranks.values()) == [0, 1, 2, 3, 4] and d2 == sorted(d2)
    with pytest.raises(ValueError, match="not one of the other"):
        distance_rank(scene, "red", "red")
    chat = _read_jsonl(tmp_path / "train_chat.jsonl")
    explained_turns = {t["content"] for r in chat for t in r["conversations"] if t["role"] == "assistant"}
    assert any(":" in a for a in explained_turns) and any(a.split()[0] in COLOR_NAMES for a in explained_turns)


def test_explain_cell_names_the_asked_about_objects_cell(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    explained_dir, cell_dir = tmp_path / "explained", tmp_path / "cell"
    generate_shapes(explained_dir, seed=SEED, explain=True, **COUNTS)
    summary = generate_shapes(cell_dir, seed=SEED, explain=True, explain_cell=15, **COUNTS)
    assert summary["explain_cell"] == 15
    cells = set()
    for split in SPLITS:
        rows, explained = _read_jsonl(cell_dir / f"{split}.jsonl"), _read_jsonl(explained_dir / f"{split}.jsonl")
        for row, other in zip(rows, explained, strict=True):
            if row["subtype"] not in ("closest_shape", "furthest_shape"):
                assert row == other
                continue
            objects = _pixel_objects(Image.open(cell_dir / row["image"]))
            assert row["answer"] == _explained_from_pixels(objects, _color_in(row["question"]), row["subtype"], 15)
            assert row["answer"].split()[2:] == other["answer"].split()  # the cell, then the explained answer
            cells.add(tuple(row["answer"].split()[:2]))
    assert len(cells) > 5 and all(x in "01234" and y in "01234" for x, y in cells)  # the 5x5 patch grid
    chat = _read_jsonl(cell_dir / "train_chat.jsonl")
    turns = [t["content"] for r in chat for t in r["conversations"] if t["role"] == "assistant"]
    assert any(len(t.split()) == 4 for t in turns)


def test_explain_can_name_the_subtypes(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = dataset
    for explain in (["count"], "count"):
        summary = generate_shapes(tmp_path, seed=SEED, explain=explain, **COUNTS)
        assert summary["explain"] == ["count"]
        rows, plain_rows = _read_jsonl(tmp_path / "test.jsonl"), _read_jsonl(out / "test.jsonl")
        for row, plain_row in zip(rows, plain_rows, strict=True):
            if row["subtype"] == "count":
                assert row["answer"].endswith(f"s: {plain_row['answer']}") and row["answer"] != plain_row["answer"]
            else:
                assert row["answer"] == plain_row["answer"]
        assert {r["subtype"] for r in rows} >= {"count", "closest_shape"}


def test_question_colours_and_subtypes_are_uniform() -> None:
    rng = np.random.default_rng(0)
    colors: dict[str, int] = {}
    subtypes: dict[str, int] = {}
    n_scenes = 300
    for _ in range(n_scenes):
        scene = random_scene(rng)
        rows = questions_for_scene(scene, rng)
        assert [r["type"] for r in rows] == ["non_relational"] * 10 + ["relational"] * 10
        for r in rows:
            colors[_color_in(r["question"])] = colors.get(_color_in(r["question"]), 0) + 1
            subtypes[r["subtype"]] = subtypes.get(r["subtype"], 0) + 1
    assert set(colors) == set(COLOR_NAMES)
    assert set(subtypes) == set(NON_RELATIONAL_SUBTYPES + RELATIONAL_SUBTYPES)
    # 6000 questions: about 1000 per colour and per subtype; bounds are > 5 standard deviations wide.
    assert all(800 < c < 1200 for c in colors.values()), colors
    assert all(800 < c < 1200 for c in subtypes.values()), subtypes


_CAPTION_ITEM = re.compile(
    r"(a|an) (?P<color>\w+) (?P<shape>square|circle) "
    r"(?:in the (?P<center>center)|at the (?P<v>top|middle|bottom) (?P<h>left|center|right))"
)


def test_caption_names_every_object_in_colour_order(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    for split in SPLITS:
        for row in _read_jsonl(out / f"{split}_captions.jsonl"):
            objects = _pixel_objects(Image.open(out / row["image"]))
            items = row["caption"].split(", ")
            assert len(items) == 6, row
            matches = [_CAPTION_ITEM.fullmatch(item) for item in items]
            assert all(matches), row
            assert [m["color"] for m in matches] == list(COLOR_NAMES)
            for m in matches:
                obj = objects[m["color"]]
                assert m["shape"] == obj["shape"]
                assert m[1] == ("an" if m["color"] == "orange" else "a")
                cx, cy = obj["center"]
                third = IMAGE_SIZE / 3
                v = ("top", "middle", "bottom")[int(cy // third)]
                h = ("left", "center", "right")[int(cx // third)]
                assert (m["v"], m["h"]) == ((None, None) if (v, h) == ("middle", "center") else (v, h)), row
            assert row["caption"] == caption_for_scene(scene_for(split, int(row["image"][-9:-4]), seed=SEED))


def test_caption_scores_read_back_every_caption(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    rows = _read_jsonl(out / "train_captions.jsonl")
    for row in rows:
        assert caption_scores(row["caption"], row["caption"]) == {"shape": 1.0, "position": 1.0}
    truth = "a red square at the top left, a green circle in the center, a blue circle at the bottom right"
    said = "a green square in the center, a red square at the top right, a blue"  # red: shape; green: place
    assert caption_scores(said, truth) == {"shape": 1 / 3, "position": 1 / 3}
    assert caption_scores("", truth) == {"shape": 0.0, "position": 0.0}
    with pytest.raises(ValueError, match="describes no object"):
        caption_scores(truth, "nothing here")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"train": -1}, "train"),
        ({"val": -3}, "val"),
        ({"test": -1}, "test"),
        ({"seed": -1}, "seed"),
        ({"train": 1.5}, "train"),
        ({"val": "10"}, "val"),
        ({"test": True}, "test"),
        ({"seed": None}, "seed"),
        ({"out": None}, "out"),
        ({"out": ""}, "out"),
        ({"explain": "yes"}, "explain"),
        ({"explain": ["count", "shape"]}, "explain"),
        ({"explain": 1}, "explain"),
        ({"explain": True, "explain_cell": -1}, "explain_cell"),
        ({"explain": True, "explain_cell": 76}, "explain_cell"),
        ({"explain_cell": 15}, "explain_cell"),
        ({"explain": "count", "explain_cell": 15}, "explain_cell"),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path: Path, kwargs: dict, name: str) -> None:
    args = {"out": tmp_path / "x", "train": 1, "val": 1, "test": 1, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=name) as info:
        generate_shapes(**args)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "x").exists(), "nothing should be written when the arguments are bad"


def test_out_must_not_be_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file.txt"
    path.write_text("x")
    with pytest.raises(ValueError, match="out"):
        generate_shapes(path, train=1, val=0, test=0)


def test_zero_images_writes_empty_files(tmp_path: Path) -> None:
    summary = generate_shapes(tmp_path, train=0, val=0, test=1)
    assert summary["splits"]["train"]["images"] == 0
    assert (tmp_path / "train.jsonl").read_text() == ""
    assert len(_read_jsonl(tmp_path / "test.jsonl")) == 20


def test_chat_rows_hold_every_question_of_an_image_and_its_caption(tmp_path: Path) -> None:
    """`chat_turns=20, chat_caption=True`: one conversation row per image, its 20 questions (the same as the question
    file's, in another order) and then its caption asked for with vlm's default caption prompt."""
    generate_shapes(tmp_path, seed=SEED, train=2, val=0, test=0, chat_turns=20, chat_caption=True)
    chat = _read_jsonl(tmp_path / "train_chat.jsonl")
    questions, captions = _read_jsonl(tmp_path / "train.jsonl"), _read_jsonl(tmp_path / "train_captions.jsonl")
    assert len(chat) == 2
    for row, caption in zip(chat, captions, strict=True):
        turns = row["conversations"]
        pairs = [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns), 2)]
        asked = sorted((q["question"], q["answer"]) for q in questions if q["image"] == row["image"])
        assert sorted(pairs[:-1]) == asked
        assert pairs[-1] == (CAPTION_PROMPT, caption["caption"])
    assert CAPTION_PROMPT == VLMConfig.from_name("shapes").caption_prompt  # what the model is asked at inference
    with pytest.raises(ValueError, match="chat_turns"):
        generate_shapes(tmp_path / "bad", train=1, val=0, test=0, chat_turns=21)
