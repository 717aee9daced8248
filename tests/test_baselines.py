"""Tests of eval/baselines/cnn.py: the question-only and small-CNN reference points of `vlm baselines`.

A tiny synthetic VQA set: red or blue images with a colour question (the answer is in the image) and a shape
question whose answer never changes (the question alone gives it).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from vlm.eval.baselines.cnn import baselines, cnn_baseline, question_only, read_vqa

from vlm.cli import main
from vlm.errors import VLMError

torch.set_num_threads(1)

COLOURS = {"red": (200, 30, 30), "blue": (30, 30, 200)}


def write_set(folder: Path, name: str, n: int, seed: int, question: str = "what colour is it?") -> Path:
    """`n` images (half red, half blue, shades varied), each asked its colour and (type "text") its shape."""
    rng = random.Random(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour = "red" if i % 2 == 0 else "blue"
        rgb = tuple(min(255, max(0, c + rng.randint(-30, 30))) for c in COLOURS[colour])
        image = f"img/{name}_{i}.png"
        Image.new("RGB", (32, 32), rgb).save(folder / image)
        rows.append({"image": image, "question": question, "answer": colour, "type": "image", "subtype": "colour"})
        shape_question = "what shape is it?" if name == "train" else "WHAT  Shape is it"  # same question, normalised
        rows.append(
            {"image": image, "question": shape_question, "answer": "Square", "type": "text", "subtype": "shape"}
        )
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("vqa")
    train = write_set(folder, "train", 64, seed=0)
    with train.open("a") as f:  # rows a baseline cannot use: counted, not read
        f.write(json.dumps({"image": "img/train_0.png", "caption": "a red square"}) + "\n")
        f.write(json.dumps({"image": "img/train_0.png", "conversations": [{"from": "human", "value": "hi"}]}) + "\n")
        f.write(json.dumps({"image": ["img/train_0.png", "img/train_1.png"], "question": "same?", "answer": "no"}))
        f.write("\n{not json\n")
    return train, write_set(folder, "test", 32, seed=1)


def test_read_vqa_keeps_single_image_questions_and_counts_the_rest(data):
    train, _ = data
    rows, skipped = read_vqa(train)
    assert len(rows) == 128
    assert skipped == {"broken": 2, "caption": 1, "not_one_image": 1}  # a conversation without an answer is broken
    assert rows[1].answer == "square" and rows[1].row["answer"] == "Square"
    assert len(read_vqa(train, limit=10)[0]) == 10


def test_question_only_knows_the_fixed_answer_but_not_the_colour(data):
    train, test = data
    result = question_only(read_vqa(train)[0], read_vqa(test)[0])
    assert result["by_type"]["image"]["exact_match"] == 0.5  # one colour for every image: half the test set
    assert result["by_type"]["text"]["exact_match"] == 1.0  # "WHAT  Shape is it" is the training question
    assert result["by_subtype"] == {"colour": result["by_type"]["image"], "shape": result["by_type"]["text"]}
    assert result["metrics"]["exact_match"] == 0.75
    assert result["metrics"]["vqa_accuracy"] == 0.75


def test_question_only_falls_back_to_the_most_common_answer(data):
    train, test = data
    test_rows = read_vqa(test)[0]
    for r in test_rows:
        r.question = "an unseen question"
    result = question_only(read_vqa(train)[0], test_rows)
    # "square" is the answer of half the training rows; each colour of a quarter.
    assert result["by_type"] == {
        "image": pytest.approx({"vqa_accuracy": 0, "exact_match": 0}),
        "text": pytest.approx({"vqa_accuracy": 1, "exact_match": 1}),
    }


def test_cnn_reads_the_image(data):
    train, test = data
    # 128 rows are 2 batches of 64: smaller batches give the 120 steps it takes (5 seeds of 5 reach 100%).
    result = cnn_baseline(read_vqa(train)[0], read_vqa(test)[0], epochs=15, image_size=32, seed=0, batch_size=16)
    assert result["by_type"]["image"]["exact_match"] > 0.9
    assert result["by_subtype"]["shape"]["exact_match"] > 0.9
    assert result["train_s"] > 0 and len(result["train_loss"]) == 15
    assert result["train_loss"][-1] < result["train_loss"][0]
    assert result["answers"] == 3 and result["unseen_test_answers"] == 0


def test_cnn_is_seeded(data):
    train, test = data
    rows = read_vqa(train)[0][:32], read_vqa(test)[0]
    first, second = (cnn_baseline(*rows, epochs=1, image_size=32, seed=3) for _ in range(2))
    assert first["train_loss"] == second["train_loss"] and first["metrics"] == second["metrics"]


def run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_cli_prints_a_json_summary(data, capsys, monkeypatch):
    monkeypatch.delenv("VLM_DEBUG", raising=False)
    train, test = data
    code, out, err = run(capsys, "baselines", "--train", train, "--test", test, "--epochs", "2", "--image-size", "32")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["train"]["rows"] == 128 and summary["train"]["skipped"]["caption"] == 1
    assert summary["test"]["rows"] == 64 and summary["type_counts"] == {"image": 32, "text": 32}
    assert summary["question_only"]["by_type"]["text"]["exact_match"] == 1.0
    assert summary["cnn"]["epochs"] == 2 and summary["cnn"]["image_size"] == 32
    assert "vlm: cnn epoch 2/2" in err
    code, out, _ = run(capsys, "baselines", "--help")
    assert code == 0 and "--train" in out and "--max_train" in out and "a VLM must beat" in out


def test_cli_refuses_a_file_without_question_rows(data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VLM_DEBUG", raising=False)
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"image": "a.png", "caption": "a red square"}) + "\n")
    code, out, err = run(capsys, "baselines", "--train", captions, "--test", data[1])
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlm: error: no single-image question rows"), err
    assert "1 caption" in lines[0]
    with pytest.raises(VLMError, match="max_train"):
        baselines(str(data[0]), str(data[1]), max_train=0)
    with pytest.raises(VLMError, match="image_size must be at least 32"):
        cnn_baseline(*[read_vqa(path, limit=4)[0] for path in data], image_size=16)
