"""Tests for `vlm diagnose` (train/diagnose.py): each measurement on a tiny model, and the probe's classifier."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import build_tiny
from PIL import Image
from vlm.train.diagnose import _ridge_accuracy, diagnose

from vlm.checkpoint import save_checkpoint

COLOURS = {"red": (230, 20, 20), "blue": (20, 20, 230)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, processor = build_tiny()
    path = tmp_path_factory.mktemp("diag") / "model"
    save_checkpoint(model, path, processor)
    return path


def _questions(folder, colours: list[str]):
    """Question rows about solid images: 'what colour?' (depends on the image) and a fixed question."""
    rows = []
    for i, colour in enumerate(colours):
        Image.new("RGB", (32, 32), COLOURS[colour]).save(folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": "What colour is it?", "answer": colour, "subtype": "colour"})
        rows.append({"image": f"{i}.png", "question": "Is it an image?", "answer": "yes", "subtype": "fixed"})
    path = folder / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_every_measurement_on_a_tiny_model(model_dir, tmp_path):
    data = _questions(tmp_path, ["red", "blue"] * 40)
    report = diagnose(data, model=str(model_dir), rows=16, probe_rows=160, min_group=20, batch_size=8)
    assert report["rows"] == 16
    norms = report["norms"]
    assert norms["image_tokens"] > 0 and norms["text_tokens"] > 0
    assert norms["ratio"] == pytest.approx(norms["image_tokens"] / norms["text_tokens"], rel=0.01)
    dependence = report["image_dependence"]
    assert dependence["loss_own_image"] != dependence["loss_other_image"]  # neighbouring rows have other colours
    assert len(report["attention_to_image"]) == 2 and all(0 <= a <= 1 for a in report["attention_to_image"])
    assert sum(report["attention_to_image"]) > 0
    assert all(report["grad_norms"][p]["grad_norm"] > 0 for p in ("encoder", "projector", "decoder"))
    probe = report["probe"]
    # A linear read-out of the image features tells red from blue; the majority answer cannot.
    assert probe["colour"]["encoder"] == 1.0 and probe["colour"]["majority"] < 0.75
    assert probe["fixed"]["majority"] == 1.0 and probe["all"]["rows"] == probe["colour"]["rows"] * 2


def test_one_image_for_all_rows_shows_no_dependence(model_dir, tmp_path):
    data = _questions(tmp_path, ["red"] * 8)
    dependence = diagnose(data, model=str(model_dir), rows=16, batch_size=8)["image_dependence"]
    assert dependence["loss_own_image"] == dependence["loss_other_image"] and dependence["answer_change"] == 0


def test_untrained_rebuilds_the_architecture_at_random(model_dir, tmp_path):
    data = _questions(tmp_path, ["red", "blue"] * 4)
    trained = diagnose(data, model=str(model_dir), rows=8)
    fresh = diagnose(data, model=str(model_dir), rows=8, untrained=True)
    assert fresh["untrained"] and fresh["norms"] != trained["norms"]


def test_ridge_probe_separates_what_is_separable_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 50, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    x[:, 0] += 2 * (2 * y - 1)  # a margin: the classes are linearly separable
    assert _ridge_accuracy(x[:300], y[:300], x[300:], y[300:], 2) > 0.95
    noise = torch.randint(0, 2, (400,), generator=g)
    assert _ridge_accuracy(x[:300], noise[:300], x[300:], noise[300:], 2) < 0.7


def test_cli_reports_json_and_refuses_files_without_questions(model_dir, tmp_path):
    data = _questions(tmp_path, ["red", "blue"])
    out = subprocess.run(
        ["vlm", "diagnose", "--data", data, "--model", str(model_dir), "--rows", "4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["rows"] == 4
    captions = tmp_path / "c.jsonl"
    captions.write_text(json.dumps({"image": "0.png", "caption": "red"}) + "\n")
    out = subprocess.run(
        ["vlm", "diagnose", "--data", str(captions), "--model", str(model_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        out.returncode == 2
        and out.stderr.strip().startswith("vlm: error:")
        and "no single-image question" in out.stderr
    )
