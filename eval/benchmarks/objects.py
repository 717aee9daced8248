"""Objects: a small synthetic VQA set about colours, shapes, counts and positions.

Unlike Sort-of-CLEVR (:mod:`vlm.eval.benchmarks.shapes`: always six objects, one per colour, same size) each image
here shows 1 to 4 objects, of distinct colours drawn from five (red, green, blue, yellow, purple), each a circle, a
square or an upward triangle 12 to 18 px across, on a white background. The questions are drawn per image from five
subtypes (the ``type`` of a row is its subtype): ``shape`` (of the object of a colour), ``color`` (of the only object
of a shape), ``count`` (all objects, or those of a shape), ``position`` (left or right) and ``exists`` (is there a
colour+shape).

So that every answer is unambiguous from the pixels: objects' bounding boxes are at least one white pixel apart, no
object centre lies within 2 px of the image's middle column (left/right never ties), and shapes are drawn without
anti-aliasing (every object pixel has its colour's exact RGB value).

Layout on disk (image paths in the JSONL files are relative to ``out``)::

    out/images/{split}_{index:05d}.png
    out/{split}.jsonl            question rows: image, question, answer, type, subtype
    out/{split}_captions.jsonl   caption rows ("a red circle on the left and a blue square on the right")
    out/{split}_chat.jsonl       each image's questions as one multi-turn conversation

Every image is drawn from its own random stream ``SeedSequence(seed, spawn_key=(split_id, index))``, as in
:mod:`vlm.eval.benchmarks.shapes`, so :func:`scene_for` rebuilds any image's objects without reading files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from vlm.eval.benchmarks.datagen import SPLITS, check_int, conversation, image_rng, output_folder, split_counts

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 200, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 220, 0),
    "purple": (140, 0, 200),
}
"""The object colours and their RGB values."""

COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SUBTYPES: tuple[str, ...] = ("shape", "color", "count", "position", "exists")
BACKGROUND = (255, 255, 255)

MIN_OBJECTS, MAX_OBJECTS = 1, 4
MIN_SIZE, MAX_SIZE = 12, 18
"""Object width and height in pixels (square side, circle diameter, triangle base and height), inclusive range."""

QUESTIONS_PER_IMAGE = 8
MIN_IMAGE_SIZE = 48
"""The smallest image that fits four of the largest objects apart and off the middle column."""

_MID_MARGIN = 2  # no object centre lies within this many pixels of the image's centre line
_MIN_GAP = 1  # white pixels required between the bounding boxes of two objects
_MAX_TRIES = 1000


@dataclass(frozen=True)
class Obj:
    """One object.

    Attributes:
        color: Colour name, one of :data:`COLOR_NAMES`.
        shape: One of :data:`SHAPES`.
        x0: Left pixel column of the bounding box.
        y0: Top pixel row of the bounding box.
        size: Width and height of the bounding box in pixels.
    """

    color: str
    shape: str
    x0: int
    y0: int
    size: int

    @property
    def rgb(self) -> tuple[int, int, int]:
        """The object's fill colour."""
        return COLORS[self.color]

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """Inclusive pixel bounding box ``(x0, y0, x1, y1)``."""
        return (self.x0, self.y0, self.x0 + self.size - 1, self.y0 + self.size - 1)

    @property
    def center(self) -> tuple[float, float]:
        """``(x, y)`` centre of the bounding box in pixel coordinates (a half pixel for even sizes)."""
        return (self.x0 + (self.size - 1) / 2, self.y0 + (self.size - 1) / 2)

    def side(self, image_size: int) -> str:
        """``"left"`` or ``"right"``: which half of the image the object's centre lies in."""
        return "left" if self.center[0] < (image_size - 1) / 2 else "right"


def random_scene(rng: np.random.Generator, image_size: int = 64) -> list[Obj]:
    """Draw one scene: 1 to 4 objects of distinct colours, uniform shapes and sizes, uniform positions.

    Positions are drawn uniformly over those that keep the object inside the image, rejecting any whose centre is
    within 2 px of the middle column or whose bounding box comes within a pixel of an earlier object's.

    Args:
        rng: Random generator; the scene is a deterministic function of its state.
        image_size: Width and height of the image in pixels (at least :data:`MIN_IMAGE_SIZE`).

    Returns:
        The objects, in the order drawn.
    """
    mid = (image_size - 1) / 2
    for _ in range(_MAX_TRIES):
        n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
        colors = rng.choice(len(COLOR_NAMES), size=n, replace=False).tolist()
        shapes = rng.integers(0, len(SHAPES), size=n).tolist()
        sizes = rng.integers(MIN_SIZE, MAX_SIZE + 1, size=n).tolist()
        scene: list[Obj] = []
        for c, s, size in zip(colors, shapes, sizes, strict=True):
            for _ in range(_MAX_TRIES):
                x0, y0 = rng.integers(0, image_size - size + 1, size=2).tolist()
                obj = Obj(COLOR_NAMES[c], SHAPES[s], x0, y0, size)
                if abs(obj.center[0] - mid) > _MID_MARGIN and all(_apart(obj, o) for o in scene):
                    scene.append(obj)
                    break
            else:
                break  # no room left: draw the whole scene again
        if len(scene) == n:
            return scene
    raise RuntimeError("could not place the objects")  # pragma: no cover - practically unreachable


def _apart(a: Obj, b: Obj) -> bool:
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return ax1 + _MIN_GAP < bx0 or bx1 + _MIN_GAP < ax0 or ay1 + _MIN_GAP < by0 or by1 + _MIN_GAP < ay0


def render_scene(scene: list[Obj], image_size: int = 64) -> Image.Image:
    """Draw a scene on a white RGB canvas, without anti-aliasing (triangles point up)."""
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene:
        x0, y0, x1, y1 = obj.bbox
        if obj.shape == "square":
            draw.rectangle(obj.bbox, fill=obj.rgb)
        elif obj.shape == "circle":
            draw.ellipse(obj.bbox, fill=obj.rgb)
        elif obj.shape == "triangle":
            draw.polygon([(x0, y1), (x1, y1), (obj.center[0], y0)], fill=obj.rgb)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
    return img


def _candidates(scene: list[Obj], image_size: int, rng: np.random.Generator) -> dict[str, list[tuple[str, str]]]:
    """Every question each subtype can ask about the scene, as ``(question, answer)`` pairs in a random order."""
    shape_count = {s: sum(o.shape == s for o in scene) for s in SHAPES}
    present = {(o.color, o.shape) for o in scene}
    yes = [(f"Is there a {c} {s}?", "yes") for c, s in sorted(present)]
    no = [(f"Is there a {c} {s}?", "no") for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
    cands = {
        "shape": [(f"What shape is the {o.color} object?", o.shape) for o in scene],
        "color": [(f"What colour is the {o.shape}?", o.color) for o in scene if shape_count[o.shape] == 1],
        "count": [("How many objects are there?", str(len(scene)))]
        + [(f"How many {s}s are there?", str(shape_count[s])) for s in SHAPES],
        "position": [(f"Is the {o.color} object on the left or on the right?", o.side(image_size)) for o in scene],
    }
    cands = {k: [v[i] for i in rng.permutation(len(v))] for k, v in cands.items()}
    # Alternate true and false "exists" questions (first one drawn by a coin), so about half are true.
    yes, no = ([v[i] for i in rng.permutation(len(v))] for v in (yes, no))
    first, second = (yes, no) if rng.random() < 0.5 else (no, yes)
    k = min(len(first), len(second))
    cands["exists"] = [q for pair in zip(first[:k], second[:k], strict=True) for q in pair] + first[k:] + second[k:]
    return cands


def questions_for_scene(
    scene: list[Obj], rng: np.random.Generator, image_size: int = 64, n: int = QUESTIONS_PER_IMAGE
) -> list[dict[str, str]]:
    """Draw ``n`` distinct questions about a scene, the subtypes as even as the scene allows.

    The subtypes take turns in a random order; a subtype with nothing left to ask (e.g. ``color`` when no shape
    occurs exactly once) passes its turn.

    Returns:
        Dicts with keys ``question``, ``answer``, ``type`` and ``subtype`` (``type`` equals ``subtype``).
    """
    cands = _candidates(scene, image_size, rng)
    order = [SUBTYPES[i] for i in rng.permutation(len(SUBTYPES))]
    rows: list[dict[str, str]] = []
    while len(rows) < n and any(cands.values()):
        for subtype in order:
            if cands[subtype] and len(rows) < n:
                question, answer = cands[subtype].pop(0)
                rows.append({"question": question, "answer": answer, "type": subtype, "subtype": subtype})
    return rows


def caption_for_scene(scene: list[Obj], image_size: int = 64) -> str:
    """Describe the objects left to right, e.g. ``"a red circle on the left and a blue triangle on the right"``."""
    parts = [f"a {o.color} {o.shape} on the {o.side(image_size)}" for o in sorted(scene, key=lambda o: o.center[0])]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def scene_for(split: str, index: int, seed: int = 0, image_size: int = 64) -> list[Obj]:
    """Rebuild the objects of image ``images/{split}_{index:05d}.png`` as written by :func:`generate_objects`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    rng = image_rng(check_int("seed", seed), split, check_int("index", index))
    return random_scene(rng, check_int("image_size", image_size, MIN_IMAGE_SIZE))


def generate_objects(
    out: str | Path,
    train: int = 10000,
    val: int = 500,
    test: int = 1000,
    seed: int = 0,
    image_size: int = 64,
) -> dict:
    """Generate a synthetic colour/shape/count/position VQA set as PNG images and JSONL files.

    Writes ``images/{split}_{index:05d}.png`` (1 to 4 objects on white), question files ``{split}.jsonl`` (8
    questions per image over the subtypes shape, color, count, position and exists), caption files
    ``{split}_captions.jsonl`` (the objects left to right) and ``{split}_chat.jsonl`` (each image's 8 questions as one
    conversation) for the train, val and test splits. The output is fully determined by the seed; existing files
    are overwritten.

    Args:
        out: Output folder; created if missing.
        train: Number of training images.
        val: Number of validation images.
        test: Number of test images.
        seed: Random seed (non-negative integer); each image uses its own stream derived from it.
        image_size: Width and height of the images in pixels (at least 48).

    Returns:
        Summary dict: ``out``, ``seed``, ``image_size``, ``images_dir``, and per split (``splits[name]``) the numbers
        of ``images``, ``questions`` and ``captions`` and the paths of its ``questions_file``, ``captions_file`` and
        ``chat_file``.

    Raises:
        ValueError: If a count or the seed is not a non-negative integer, ``image_size`` is not an integer of at
            least 48, or ``out`` is not a path or is a file.
    """
    out_dir = output_folder(out)
    counts = split_counts(train, val, test)
    seed = check_int("seed", seed)
    image_size = check_int("image_size", image_size, MIN_IMAGE_SIZE)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)

    summary: dict[str, Any] = {
        "out": str(out_dir),
        "seed": seed,
        "image_size": image_size,
        "images_dir": str(out_dir / "images"),
        "splits": {},
    }
    for split, n in counts.items():
        q_path, c_path, chat_path = (out_dir / f"{split}{suffix}.jsonl" for suffix in ("", "_captions", "_chat"))
        n_questions = 0
        with (
            q_path.open("w", encoding="utf-8", newline="\n") as fq,
            c_path.open("w", encoding="utf-8", newline="\n") as fc,
            chat_path.open("w", encoding="utf-8", newline="\n") as fchat,
        ):
            for index in range(n):
                rng = image_rng(seed, split, index)
                scene = random_scene(rng, image_size)
                rel = f"images/{split}_{index:05d}.png"
                render_scene(scene, image_size).save(out_dir / rel, format="PNG")
                questions = questions_for_scene(scene, rng, image_size)
                fq.writelines(json.dumps({"image": rel, **row}) + "\n" for row in questions)
                n_questions += len(questions)
                fc.write(json.dumps({"image": rel, "caption": caption_for_scene(scene, image_size)}) + "\n")
                fchat.write(json.dumps({"image": rel, "conversations": conversation(questions)}) + "\n")
        summary["splits"][split] = {
            "images": n,
            "questions": n_questions,
            "captions": n,
            "questions_file": str(q_path),
            "captions_file": str(c_path),
            "chat_file": str(chat_path),
        }
    return summary


__all__ = [
    "COLORS",
    "COLOR_NAMES",
    "MIN_IMAGE_SIZE",
    "QUESTIONS_PER_IMAGE",
    "SHAPES",
    "SPLITS",
    "SUBTYPES",
    "Obj",
    "caption_for_scene",
    "generate_objects",
    "questions_for_scene",
    "random_scene",
    "render_scene",
    "scene_for",
]
