"""The from-scratch recipe (samples/configs/scratch.yaml), unchanged but for its data and length, learns to read the
image: after a few hundred CPU steps on a tiny generated set it beats the best answer from the question alone."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from vlm.eval.baselines.cnn import question_only, read_vqa
from vlm.train.cli import make_cli

from vlm.generation import GenerationOptions, generate_texts
from vlm.images import load_image

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = ROOT / "samples" / "configs" / "scratch.yaml"
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")
torch.set_num_threads(1)


def _draw(shape: str, colour: str, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    size = rng.randint(22, 30)
    x, y = rng.randint(2, 62 - size), rng.randint(2, 62 - size)
    box = (x, y, x + size, y + size)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(x, y + size), (x + size, y + size), (x + size // 2, y)], fill=COLOURS[colour])
    return image


def _write_set(folder: Path, split: str, n: int, seed: int) -> Path:
    """n images of one shape in one colour; per image a colour and a shape question (both need the image)."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        name = f"images/{split}_{i}.png"
        _draw(shape, colour, rng).save(folder / name)
        asked = [("What colour is the object?", colour), ("What shape is the object?", shape)]
        if split == "train":  # both questions in one conversation, in random order (so turns say nothing)
            rng.shuffle(asked)
            turns = [{"role": r, "content": t} for q, a in asked for r, t in (("user", q), ("assistant", a))]
            rows.append({"image": name, "conversations": turns})
        else:
            rows += [{"image": name, "question": q, "answer": a} for q, a in asked]
    path = folder / f"{split}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_scratch_recipe_beats_the_question_only_baseline(tmp_path):
    train, val, test = (
        _write_set(tmp_path, s, n, k) for k, (s, n) in enumerate([("train", 600), ("val", 20), ("test", 60)])
    )
    cli = make_cli(
        [
            "--config",
            str(SCRATCH),
            f"--data.train=[{train}]",
            f"--data.val={val}",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            "--data.batch_size=16",
            "--data.generate_samples=16",
            "--trainer.limit_val_batches=2",
            "--trainer.max_steps=300",
            "--trainer.val_check_interval=300",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    model, processor = cli.model.vlm.eval(), cli.model.processor
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    answers = generate_texts(
        model,
        processor,
        [r["question"] for r in rows],
        [[load_image(tmp_path / r["image"])] for r in rows],
        GenerationOptions(max_new_tokens=8),
    )
    right = [a.strip() == r["answer"] for a, r in zip(answers, rows)]
    accuracy = sum(right) / len(rows)
    shape_accuracy = sum(ok for ok, r in zip(right, rows) if "shape" in r["question"]) / (len(rows) / 2)
    # The question-only baseline's training rows: the same questions and answers as single rows.
    single = tmp_path / "train_single.jsonl"
    single.write_text(
        "".join(
            json.dumps({"image": r["image"], "question": q["content"], "answer": a["content"]}) + "\n"
            for r in map(json.loads, train.read_text().splitlines())
            for q, a in zip(r["conversations"][::2], r["conversations"][1::2])
        )
    )
    guess = question_only(read_vqa(single)[0], read_vqa(test)[0])["metrics"]["exact_match"]
    print(f"scratch recipe: accuracy {accuracy:.3f} (shape questions {shape_accuracy:.3f}), question-only {guess:.3f}")
    assert guess < 0.45
    assert accuracy >= guess + 0.3
