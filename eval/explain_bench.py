"""`vlm explain-bench`: are the explanation maps (`vlm/explain.py`) right? Checked on the shapes benchmark, where
every object's position is known (each image's scene is rebuilt from its name, `scene_for`).

On the "What is the shape of the <colour> object?" rows of a `vlm data shapes` split:

- pointing game (Zhang et al. 2016, "Top-down Neural Attention by Excitation Backprop"): how often the map's
  highest-scoring patch touches the object asked about, per method, beside a random map's expected score (the share
  of the grid's patches the object touches: about 1/25 to 4/25 on the `shapes` preset's 5x5 grid);
- deletion (after Petsiuk et al. 2018, "RISE"): how often the answer changes when the k highest-scoring patches are
  blanked (filled with the image's median colour: the white background here), for k = 1..`max_k`, beside k patches
  drawn at random and, as the ceiling, every patch the object touches (`deletion_object`: with the object gone a
  model that reads the image can only guess between two shapes, so about half its answers stay the same);
- uniformity: the mean entropy of the maps over that of a uniform map (1: the map says nothing).

A model that ignores the image (e.g. an untrained `vlm init --preset shapes` checkpoint) should show maps near 1 in
uniformity, pointing near the random map and no deletion effect.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm
from vlm.eval.benchmarks.shapes import IMAGE_SIZE, _find, scene_for
from vlm.eval.benchmarks.shapes_report import IMAGE_NAME, object_patches, shapes_question

from vlm.checkpoint import open_model
from vlm.data import json_lines
from vlm.errors import VLMError
from vlm.explain import METHODS, Method, explain_answer
from vlm.generation import GenerationOptions, generate_texts
from vlm.images import load_image
from vlm.inference import Device


def blank(image: Image.Image, grid: tuple[int, int], cells: list[int]) -> Image.Image:
    """A copy of `image` with the patches `cells` (row-major indices on `grid`) filled with its median colour."""
    rows, cols = grid
    width, height = image.size
    median = tuple(int(v) for v in np.median(np.asarray(image).reshape(-1, 3), axis=0))
    out = image.copy()
    for cell in cells:
        r, c = divmod(cell, cols)
        left, right = round(c * width / cols), round((c + 1) * width / cols)
        top, bottom = round(r * height / rows), round((r + 1) * height / rows)
        out.paste(median, (left, top, right, bottom))
    return out


def pointing_hit(scores: torch.Tensor, cells: set[int]) -> bool:
    """Whether the highest-scoring patch of a map (rows, cols) is one of `cells` (row-major indices)."""
    return int(scores.flatten().argmax()) in cells


def uniformity(scores: torch.Tensor) -> float:
    """The entropy of a map (summing to 1) over the entropy of a uniform map of its size: 1 for a uniform map."""
    p = scores.flatten().clamp(min=1e-12)
    return float(-(p * p.log()).sum() / math.log(p.numel()))


def _shape_rows(data: Path, limit: int) -> list[tuple[dict[str, Any], str, str, int]]:
    """Up to `limit` shape-of-colour question rows: (row, colour, split, image index)."""
    found = []
    for _, _, row, error in json_lines(data, "data file"):
        if error is not None or not isinstance(row, dict) or shapes_question(row) is None:
            continue
        subtype, colour = shapes_question(row)
        name = IMAGE_NAME.search(str(row.get("image", "")))
        if subtype == "shape" and name:
            found.append((row, colour, name[1], int(name[2])))
            if len(found) == limit:
                break
    if not found:
        raise VLMError(f"{data} holds no 'What is the shape of the <colour> object?' rows of `vlm data shapes` images")
    return found


def explain_bench(
    data: str,
    model: str | None = None,
    rows: int = 300,
    methods: list[Method] | None = None,
    max_k: int = 5,
    shapes_seed: int = 0,
    seed: int = 0,
    max_new_tokens: int = 8,
    device: Device = "auto",
) -> dict[str, Any]:
    """Check the explanation maps against the shapes benchmark: pointing game, deletion curve and map uniformity per
    method, beside a random map (what each measures: docs/explain.md).

    Args:
        data: A `vlm data shapes` question file (e.g. data/shapes/test.jsonl).
        model: A vlm checkpoint folder (default: samples/shapes-model/).
        rows: Use the first this many "What is the shape of the <colour> object?" rows.
        methods: The methods to check (default: all of attention, rollout, gradient).
        max_k: Deletion blanks k = 1 .. max_k patches.
        shapes_seed: The seed the data was generated with (`vlm data shapes --seed`).
        seed: Seed for the random patches.
        max_new_tokens: Answer length limit (shape answers are one word).
        device: auto, cpu, cuda or cuda:N.
    """
    methods = list(methods or METHODS)
    if rows < 1 or max_k < 1:
        raise VLMError("rows and max_k must be at least 1")
    path = Path(data)
    net, processor = open_model(model, device, "float32")
    grid = net.image_grid
    if grid is None or grid[0] != grid[1] or IMAGE_SIZE % grid[1]:
        raise VLMError(f"the model's image tokens must be a square grid that tiles {IMAGE_SIZE} px, got {grid}")
    patch, cells = IMAGE_SIZE // grid[1], grid[0] * grid[1]
    if max_k > cells:
        raise VLMError(f"max_k must be at most the {cells} patches of the model's grid, got {max_k}")
    gen = GenerationOptions(max_new_tokens=max_new_tokens)
    rng = random.Random(seed)
    totals = {m: {"pointing": 0, "uniformity": 0.0, "deletion": [0] * max_k} for m in methods}
    random_pointing, random_deletion, object_deletion, right, done, failed = 0.0, [0] * max_k, 0, 0, 0, 0
    for row, colour, split, index in tqdm(_shape_rows(path, rows), unit="row", file=sys.stderr, disable=None):
        image = load_image(path.parent / row["image"])
        obj = _find(scene_for(split, index, shapes_seed), colour)
        target = {py * grid[1] + px for px, py in object_patches(obj, patch)}
        try:
            maps = {m: explain_answer(net, processor, image, row["question"], m, gen) for m in methods}
        except VLMError:  # e.g. an empty answer: nothing to explain
            failed += 1
            continue
        answer = next(iter(maps.values())).answer
        done += 1
        right += answer.split()[-1] == row["answer"]
        random_pointing += len(target) / cells
        variants = []  # (method or None for random, k, image)
        for m, e in maps.items():
            totals[m]["pointing"] += pointing_hit(e.scores, target)
            totals[m]["uniformity"] += uniformity(e.scores)
            order = e.scores.flatten().argsort(descending=True).tolist()
            variants += [(m, k, blank(image, grid, order[:k])) for k in range(1, max_k + 1)]
        variants += [(None, k, blank(image, grid, rng.sample(range(cells), k))) for k in range(1, max_k + 1)]
        variants.append(("object", 0, blank(image, grid, sorted(target))))
        prompts = [row["question"]] * len(variants)
        answers = generate_texts(net, processor, prompts, [[v[2]] for v in variants], gen)
        for (m, k, _), new in zip(variants, answers):
            if m == "object":
                object_deletion += new != answer
                continue
            counts = random_deletion if m is None else totals[m]["deletion"]
            counts[k - 1] += new != answer
    if not done:
        raise VLMError("the model gave no answer to explain on any row")
    report: dict[str, Any] = {
        "data": str(path),
        "model": model or "samples/shapes-model",
        "questions": done,
        "failed": failed,
        "answer_accuracy": round(right / done, 4),
        "random_map": {"pointing": round(random_pointing / done, 4)},
        "deletion_k": list(range(1, max_k + 1)),
        "deletion_random": [round(c / done, 4) for c in random_deletion],
        "deletion_object": round(object_deletion / done, 4),
    }
    for m, t in totals.items():
        report[m] = {
            "pointing": round(t["pointing"] / done, 4),
            "uniformity": round(t["uniformity"] / done, 4),
            "deletion": [round(c / done, 4) for c in t["deletion"]],
        }
    return report
