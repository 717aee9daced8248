"""Sort-of-CLEVR: a small synthetic visual question answering benchmark.

Reference: A. Santoro, D. Raposo, D. G. T. Barrett, M. Malinowski, R. Pascanu, P. Battaglia, T. Lillicrap,
"A simple neural network module for relational reasoning", NeurIPS 2017, section 5.3 ("Sort-of-CLEVR") and the
supplementary material. Each 75x75 image shows 6 non-overlapping objects of 6 distinct colours (red, green, blue,
orange, gray, yellow) on a white background, each a square or a circle. Each image gets 10 non-relational questions
(shape of X / is X left or right / is X top or bottom) and 10 relational questions (shape of the object closest to X /
shape of the object furthest from X / how many objects have the same shape as X). X's colour and the question
sub-type are drawn uniformly per question.

Details the paper leaves open follow the widely used public generator
github.com/kimhc6028/relational-networks (``sort_of_clevr_generator.py``; the authors released no code): objects are
11 px across (centre +/- 5 px), colours have the same RGB values, centres are uniform over the positions that keep the
object inside the image, and the count answer includes X itself ("1".."6").

Deviations from that generator, chosen so that every answer is unambiguous from the pixels:

* Any two objects' bounding boxes are separated by at least one white pixel (the public generator only requires
  centres 10 px apart, which lets diagonal squares overlap).
* No object centre lies on the image's middle row or column (pixel 37), so left/right and top/bottom never tie.
* Scenes where some object has two equally close (or two equally far) other objects are re-drawn, so the closest
  and furthest objects are always unique.

Layout on disk (image paths in the JSONL files are relative to ``out``)::

    out/images/{split}_{index:05d}.png
    out/{split}.jsonl            question rows: image, question, answer, type, subtype
    out/{split}_captions.jsonl   caption rows: image, caption
    out/{split}_relational.jsonl the relational rows of {split}.jsonl, in the same order (to weight them in a mix)
    out/{split}_chat.jsonl       the questions as multi-turn conversations (see generate_shapes)

Every image is drawn from its own random stream ``SeedSequence(seed, spawn_key=(split_id, index))``, i.e. the
``index``-th child of the ``split_id``-th child of the root seed sequence; the three splits therefore use
independent, non-overlapping streams, and :func:`scene_for` can rebuild any image's objects without reading files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from vlm.eval.benchmarks.datagen import SPLITS, check_int, conversation, image_rng, output_folder, split_counts

IMAGE_SIZE = 75
"""Image width and height in pixels."""

OBJECT_SIZE = 11
"""Object width/height (square side, circle diameter) in pixels; must be odd so centres are whole pixels."""

BACKGROUND = (255, 255, 255)

CAPTION_PROMPT = "Describe the image."
"""The question of a caption turn in a conversation row (``chat_caption``): vlm's default caption prompt."""

CHAT_TURNS = 5
"""Questions per conversation row in ``{split}_chat.jsonl``."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "orange": (255, 156, 0),
    "gray": (128, 128, 128),
    "yellow": (255, 255, 0),
}
"""The six object colours, in the canonical order used for captions (RGB values of the public generator)."""

COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SHAPES: tuple[str, ...] = ("square", "circle")
QUESTIONS_PER_TYPE = 10

NON_RELATIONAL_SUBTYPES: tuple[str, ...] = ("shape", "horizontal", "vertical")
RELATIONAL_SUBTYPES: tuple[str, ...] = ("closest_shape", "furthest_shape", "count")

_TEMPLATES: dict[str, str] = {
    "shape": "What is the shape of the {c} object?",
    "horizontal": "Is the {c} object on the left or on the right of the image?",
    "vertical": "Is the {c} object at the top or at the bottom of the image?",
    "closest_shape": "What is the shape of the object closest to the {c} object?",
    "furthest_shape": "What is the shape of the object furthest from the {c} object?",
    "count": "How many objects have the same shape as the {c} object, counting the {c} object itself?",
}

_HALF = OBJECT_SIZE // 2
_MID = IMAGE_SIZE // 2  # middle pixel row/column (37); no centre is placed on it
_MIN_GAP = 1  # white pixels required between the bounding boxes of two objects
_MAX_SCENE_TRIES = 1000


@dataclass(frozen=True)
class Obj:
    """One Sort-of-CLEVR object.

    Attributes:
        color: Colour name, one of :data:`COLOR_NAMES`.
        shape: ``"square"`` or ``"circle"``.
        center: ``(x, y)`` pixel of the object's centre; x grows to the right, y grows downwards.
        size: Width and height in pixels (square side, circle diameter); odd.
    """

    color: str
    shape: str
    center: tuple[int, int]
    size: int = OBJECT_SIZE

    @property
    def rgb(self) -> tuple[int, int, int]:
        """The object's fill colour."""
        return COLORS[self.color]

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """Inclusive pixel bounding box ``(x0, y0, x1, y1)``."""
        h = self.size // 2
        x, y = self.center
        return (x - h, y - h, x + h, y + h)


def _ambiguous_extremes(centers: list[tuple[int, int]]) -> bool:
    """Return True if some object has two equally close, or two equally far, other objects."""
    for i, (x, y) in enumerate(centers):
        # Exact integer squared distances, so ties are detected exactly. Plain Python beats numpy for 6 points.
        d2 = [(x - u) ** 2 + (y - v) ** 2 for j, (u, v) in enumerate(centers) if j != i]
        if d2.count(min(d2)) > 1 or d2.count(max(d2)) > 1:
            return True
    return False


def random_scene(rng: np.random.Generator) -> list[Obj]:
    """Draw one scene: 6 objects, one per colour, in :data:`COLOR_NAMES` order.

    Shapes are uniform over square/circle. Centres are uniform over the positions that keep the object inside the
    image and off the middle row/column, rejecting positions whose bounding box would come within ``_MIN_GAP`` pixels
    of an earlier object; whole scenes with ambiguous closest/furthest objects are re-drawn.

    Args:
        rng: Random generator; the scene is a deterministic function of its state.

    Returns:
        The six objects.
    """
    lo, hi = _HALF, IMAGE_SIZE - 1 - _HALF  # inclusive range of centre coordinates
    min_sep = OBJECT_SIZE + _MIN_GAP  # Chebyshev distance between centres keeping boxes apart
    for _ in range(_MAX_SCENE_TRIES):
        shapes = rng.integers(0, len(SHAPES), size=len(COLOR_NAMES))
        centers: list[tuple[int, int]] = []
        while len(centers) < len(COLOR_NAMES):
            x, y = rng.integers(lo, hi + 1, size=2).tolist()
            if x == _MID or y == _MID:
                continue
            if all(max(abs(x - cx), abs(y - cy)) >= min_sep for cx, cy in centers):
                centers.append((x, y))
        if not _ambiguous_extremes(centers):
            return [Obj(c, SHAPES[s], xy) for c, s, xy in zip(COLOR_NAMES, shapes.tolist(), centers, strict=True)]
    raise RuntimeError("could not draw an unambiguous scene")  # pragma: no cover - practically unreachable


def render_scene(scene: list[Obj], image_size: int = IMAGE_SIZE) -> Image.Image:
    """Draw a scene on a white RGB canvas, without anti-aliasing.

    Args:
        scene: Objects to draw.
        image_size: Width and height of the image in pixels.

    Returns:
        The rendered image.
    """
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene:
        if obj.shape == "square":
            draw.rectangle(obj.bbox, fill=obj.rgb)
        elif obj.shape == "circle":
            draw.ellipse(obj.bbox, fill=obj.rgb)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
    return img


def _find(scene: list[Obj], color: str) -> Obj:
    for obj in scene:
        if obj.color == color:
            return obj
    raise ValueError(f"no {color!r} object in the scene")


def _dist2(a: Obj, b: Obj) -> int:
    return (a.center[0] - b.center[0]) ** 2 + (a.center[1] - b.center[1]) ** 2


def answer_question(scene: list[Obj], color: str, subtype: str, explain: bool = False, cell: int = 0) -> str:
    """Compute the answer to a Sort-of-CLEVR question about the object of a given colour.

    Args:
        scene: The scene's objects.
        color: Colour of the object the question is about.
        subtype: One of :data:`NON_RELATIONAL_SUBTYPES` or :data:`RELATIONAL_SUBTYPES`.
        explain: Name the step before the answer in relational answers: the colour of the closest/furthest object
            (``"blue circle"``), or the shape being counted (``"squares: 3"``). The last word is always the plain
            answer; non-relational answers are the same either way.
        cell: With ``explain``, closest/furthest answers first name the cell of the object asked about on a grid
            of ``cell``-pixel squares, column then row from 0 at the top left (``"4 1 green circle"``: X's centre
            is in column 4, row 1); 0 names no cell.

    Returns:
        The lower-case answer: one word, or with ``explain`` two words (four with ``cell``) ending in the one-word
        answer.
    """
    x = _find(scene, color)
    others = [o for o in scene if o is not x]
    if subtype == "shape":
        return x.shape
    # Centres never lie on the middle pixel row/column, so "< _MID" is the same as "left of the image centre".
    if subtype == "horizontal":
        return "left" if x.center[0] < _MID else "right"
    if subtype == "vertical":
        return "top" if x.center[1] < _MID else "bottom"
    if subtype in ("closest_shape", "furthest_shape"):
        pick = min if subtype == "closest_shape" else max
        y = pick(others, key=lambda o: _dist2(x, o))
        if not explain:
            return y.shape
        where = f"{x.center[0] // cell} {x.center[1] // cell} " if cell else ""
        return f"{where}{y.color} {y.shape}"
    if subtype == "count":
        n = str(sum(o.shape == x.shape for o in scene))
        return f"{x.shape}s: {n}" if explain else n
    raise ValueError(f"unknown question subtype {subtype!r}")


def by_distance(scene: list[Obj], color: str) -> list[Obj]:
    """The other five objects of the ``color`` object's scene, closest first (distances never tie)."""
    x = _find(scene, color)
    return sorted((o for o in scene if o is not x), key=lambda o: _dist2(x, o))


def distance_rank(scene: list[Obj], color: str, named: str) -> int:
    """Where the object of colour ``named`` stands among the others when they are sorted by their distance from the
    ``color`` object: 0 is the closest, 4 the furthest. Reads an explained answer ("blue circle") back against the
    scene, to see whether a model that names the wrong object at least names a near (or far) one.

    Raises:
        ValueError: If ``named`` is ``color`` itself or not in the scene.
    """
    for rank, o in enumerate(by_distance(scene, color)):
        if o.color == named:
            return rank
    raise ValueError(f"{named!r} is not one of the other objects of the {color} object's scene")


def questions_for_scene(
    scene: list[Obj], rng: np.random.Generator, explain: tuple[str, ...] = (), cell: int = 0
) -> list[dict[str, str]]:
    """Draw the 10 non-relational and then the 10 relational questions for a scene.

    For each question the colour and the sub-type are drawn uniformly, as in the paper.

    Args:
        scene: The scene's objects.
        rng: Random generator used to pick colours and sub-types.
        explain: The relational subtypes whose answers are explained (see :func:`answer_question`); the questions
            are the same either way.
        cell: Grid cell size for explained closest/furthest answers (see :func:`answer_question`); 0 for none.

    Returns:
        20 dicts with keys ``question``, ``answer``, ``type`` (``"non_relational"`` or ``"relational"``) and
        ``subtype``.
    """
    colors = [o.color for o in scene]
    rows: list[dict[str, str]] = []
    for qtype, subtypes in (("non_relational", NON_RELATIONAL_SUBTYPES), ("relational", RELATIONAL_SUBTYPES)):
        color_ids = rng.integers(0, len(colors), size=QUESTIONS_PER_TYPE).tolist()
        subtype_ids = rng.integers(0, len(subtypes), size=QUESTIONS_PER_TYPE).tolist()
        for ci, si in zip(color_ids, subtype_ids, strict=True):
            color, subtype = colors[ci], subtypes[si]
            rows.append(
                {
                    "question": _TEMPLATES[subtype].format(c=color),
                    "answer": answer_question(scene, color, subtype, subtype in explain, cell),
                    "type": qtype,
                    "subtype": subtype,
                }
            )
    return rows


def position_words(center: tuple[int, int], image_size: int = IMAGE_SIZE) -> tuple[str, str]:
    """Rough position of a point on a 3x3 grid.

    Args:
        center: ``(x, y)`` pixel.
        image_size: Width and height of the image in pixels.

    Returns:
        ``(vertical, horizontal)`` with vertical in top/middle/bottom and horizontal in left/center/right.
    """
    third = image_size / 3
    x, y = center
    vertical = ("top", "middle", "bottom")[min(int(y // third), 2)]
    horizontal = ("left", "center", "right")[min(int(x // third), 2)]
    return vertical, horizontal


def _position_phrase(center: tuple[int, int]) -> str:
    vertical, horizontal = position_words(center)
    if (vertical, horizontal) == ("middle", "center"):
        return "in the center"
    return f"at the {vertical} {horizontal}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for_scene(scene: list[Obj]) -> str:
    """Describe every object with its colour, shape and rough position, in :data:`COLOR_NAMES` order.

    Example: ``"a red circle at the top left, a green square in the center, a blue circle at the bottom center, ..."``.

    Args:
        scene: The scene's objects.

    Returns:
        The caption.
    """
    order = {c: i for i, c in enumerate(COLOR_NAMES)}
    objs = sorted(scene, key=lambda o: order[o.color])
    return ", ".join(f"{_article(o.color)} {o.color} {o.shape} {_position_phrase(o.center)}" for o in objs)


def caption_facts(caption: str) -> dict[str, tuple[str, str]]:
    """The inverse of :func:`caption_for_scene` on any text: ``{colour: (shape, position phrase)}`` for every
    "a <colour> <shape> at the <position>" / "... in the center" the caption holds (the first mention of a colour wins).
    """
    facts: dict[str, tuple[str, str]] = {}
    for part in caption.split(","):
        words = part.split()
        if len(words) >= 5 and words[0] in ("a", "an") and words[1] in COLOR_NAMES and words[3] in ("at", "in"):
            facts.setdefault(words[1], (words[2], " ".join(words[3:])))
    return facts


def caption_scores(prediction: str, reference: str) -> dict[str, float]:
    """How much of a reference caption's content a predicted caption gets right: the fraction of the reference's
    objects whose shape (``shape``) and whose position phrase (``position``) the prediction gives for that colour."""
    truth, said = caption_facts(reference), caption_facts(prediction)
    if not truth:
        raise ValueError(f"the reference caption describes no object: {reference!r}")
    return {
        "shape": sum(said.get(c, ("", ""))[0] == shape for c, (shape, _) in truth.items()) / len(truth),
        "position": sum(said.get(c, ("", ""))[1] == where for c, (_, where) in truth.items()) / len(truth),
    }


def _explained_subtypes(explain: Any) -> tuple[str, ...]:
    if isinstance(explain, bool):
        return RELATIONAL_SUBTYPES if explain else ()
    if isinstance(explain, str) and explain.strip():
        explain = [x.strip() for x in explain.split(",")]
    if isinstance(explain, (list, tuple)) and all(isinstance(x, str) for x in explain):
        unknown = [x for x in explain if x not in RELATIONAL_SUBTYPES]
        if not unknown:
            return tuple(x for x in RELATIONAL_SUBTYPES if x in explain)
    choices = ", ".join(RELATIONAL_SUBTYPES)
    raise ValueError(f"explain must be true, false or a list of relational subtypes ({choices}), got {explain!r}")


def scene_for(split: str, index: int, seed: int = 0) -> list[Obj]:
    """Rebuild the objects of image ``images/{split}_{index:05d}.png`` as written by :func:`generate_shapes`.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        index: Image index within the split.
        seed: The seed passed to :func:`generate_shapes`.

    Returns:
        The image's six objects.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return random_scene(image_rng(check_int("seed", seed), split, check_int("index", index)))


def image_name(split: str, index: int) -> str:
    """Path of an image relative to the output folder, e.g. ``images/train_00000.png``."""
    return f"images/{split}_{index:05d}.png"


def generate_shapes(
    out: str | Path,
    train: int = 10000,
    val: int = 200,
    test: int = 200,
    seed: int = 0,
    explain: bool | list[str] | str = False,
    explain_cell: int = 0,
    chat_turns: int = CHAT_TURNS,
    chat_caption: bool = False,
) -> dict:
    """Generate the Sort-of-CLEVR benchmark (Santoro et al. 2017) as PNG images and JSONL files.

    Writes ``images/{split}_{index:05d}.png``, question files ``{split}.jsonl`` (20 questions per image: 10
    non-relational, 10 relational), their relational rows alone in ``{split}_relational.jsonl`` (a recipe lists
    that file beside the full one to weight relational questions up), caption files ``{split}_captions.jsonl``
    (one caption per image) and ``{split}_chat.jsonl`` (the same 20 questions per image as multi-turn
    conversations of `chat_turns`, in shuffled order: with 5, training reads each image once per 5 answers, in rows
    about as long as a caption row; with 20 and `data.independent_turns`, once per 20) for the train, val and test
    splits. The output is fully determined by the seed; existing files are overwritten.

    Args:
        out: Output folder; created if missing.
        train: Number of training images.
        val: Number of validation images.
        test: Number of test images.
        seed: Random seed (non-negative integer); each split uses its own independent stream derived from it.
        explain: Relational answers name the step before the answer, e.g. ``"blue circle"`` for the shape of the object
            closest to red and ``"squares: 3"`` for a count (see :func:`answer_question`): true for every relational
            subtype, or a list of them (``[count]``, or as text: ``count`` or ``count,closest_shape``). The images,
            questions and captions are the same as without it; the last word of every answer is the paper's answer.
        explain_cell: Explained closest/furthest answers first name the asked-about object's cell on a grid of
            squares this many pixels wide, column then row from 0 (``"4 1 green circle"``); 15 is the ``shapes``
            preset's patch grid. 0 (the default) names no cell.
        chat_turns: Questions per conversation row in ``{split}_chat.jsonl`` (1 to 20).
        chat_caption: End each conversation row with one more turn: the caption, asked for with
            ``CAPTION_PROMPT`` (vlm's default caption prompt). With ``chat_turns=20`` and `data.independent_turns`,
            one row then trains everything there is to say about an image.

    Returns:
        Summary dict: ``out``, ``seed``, and per split (``splits[name]``) the numbers of ``images``, ``questions``
        and ``captions`` and the paths of its ``questions_file``, ``relational_file``, ``captions_file`` and
        ``chat_file``.

    Raises:
        ValueError: If a count, the seed or ``explain_cell`` is not a non-negative integer (or the cell is larger
            than the image, or no closest/furthest answer is explained for it), ``explain`` is not one of its
            forms, or ``out`` is not a path.
    """
    out_dir = output_folder(out)
    counts = split_counts(train, val, test)
    seed = check_int("seed", seed)
    explained = _explained_subtypes(explain)
    cell = check_int("explain_cell", explain_cell)
    turns_per_row = check_int("chat_turns", chat_turns)
    if not 1 <= turns_per_row <= 20:
        raise ValueError(f"chat_turns must be between 1 and 20 (the questions of one image), got {turns_per_row}")
    if cell and not {"closest_shape", "furthest_shape"} & set(explained):
        raise ValueError("explain_cell names a cell in explained closest/furthest answers: explain one of them too")
    if cell > IMAGE_SIZE:
        raise ValueError(f"explain_cell must be at most the image size ({IMAGE_SIZE} px), got {cell}")

    (out_dir / "images").mkdir(parents=True, exist_ok=True)

    summary: dict[str, Any] = {
        "out": str(out_dir),
        "seed": seed,
        "explain": list(explained),
        "explain_cell": cell,
        "images_dir": str(out_dir / "images"),
        "splits": {},
    }
    for split, n in counts.items():
        q_path = out_dir / f"{split}.jsonl"
        c_path = out_dir / f"{split}_captions.jsonl"
        chat_path = out_dir / f"{split}_chat.jsonl"
        rel_path = out_dir / f"{split}_relational.jsonl"
        n_questions = 0
        with (
            q_path.open("w", encoding="utf-8", newline="\n") as fq,
            rel_path.open("w", encoding="utf-8", newline="\n") as frel,
            c_path.open("w", encoding="utf-8", newline="\n") as fc,
            chat_path.open("w", encoding="utf-8", newline="\n") as fchat,
        ):
            for index in range(n):
                rng = image_rng(seed, split, index)
                scene = random_scene(rng)
                rel = image_name(split, index)
                render_scene(scene).save(out_dir / rel, format="PNG")
                questions = questions_for_scene(scene, rng, explained, cell)
                for row in questions:
                    line = json.dumps({"image": rel, **row}) + "\n"
                    fq.write(line)
                    if row["type"] == "relational":
                        frel.write(line)
                    n_questions += 1
                fc.write(json.dumps({"image": rel, "caption": caption_for_scene(scene)}) + "\n")
                # Shuffled so every question type also comes first, as it does when asked on its own.
                order = rng.permutation(len(questions))
                for start in range(0, len(order), turns_per_row):
                    turns = conversation([questions[i] for i in order[start : start + turns_per_row]])
                    if chat_caption:
                        turns += conversation([{"question": CAPTION_PROMPT, "answer": caption_for_scene(scene)}])
                    fchat.write(json.dumps({"image": rel, "conversations": turns}) + "\n")
        summary["splits"][split] = {
            "images": n,
            "questions": n_questions,
            "captions": n,
            "questions_file": str(q_path),
            "relational_file": str(rel_path),
            "captions_file": str(c_path),
            "chat_file": str(chat_path),
        }
    return summary


__all__ = [
    "COLORS",
    "COLOR_NAMES",
    "IMAGE_SIZE",
    "NON_RELATIONAL_SUBTYPES",
    "OBJECT_SIZE",
    "RELATIONAL_SUBTYPES",
    "SHAPES",
    "SPLITS",
    "Obj",
    "answer_question",
    "caption_for_scene",
    "distance_rank",
    "generate_shapes",
    "image_name",
    "position_words",
    "questions_for_scene",
    "random_scene",
    "render_scene",
    "scene_for",
]
