"""Tests for `vlm probe` (eval/baselines/probe.py): a linear probe of a frozen encoder's features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from vlm.eval.baselines.probe import encoder_from_checkpoint, encoder_from_recipe, extract_features, fit_logistic, probe

from vlm.checkpoint import build, load_model, save_checkpoint
from vlm.cli import run
from vlm.config import VLMConfig
from vlm.errors import VLMError

COLOURS = {"red": (200, 30, 30), "blue": (30, 30, 200), "green": (30, 180, 30)}


def _write_split(folder, split: str, per_class: int, seed: int) -> str:
    """Noisy single-colour images, one class per colour; caption rows with a `label` field."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(exist_ok=True)
    rows = []
    for name, rgb in COLOURS.items():
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 40, (28, 28, 3)), 0, 255).astype(np.uint8)
            image = f"images/{split}_{name}_{i}.png"
            Image.fromarray(pixels).save(folder / image)
            rows.append({"image": image, "caption": f"a photo of {name}", "label": name})
    path = folder / f"{split}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    folder = tmp_path_factory.mktemp("colours")
    torch.manual_seed(0)
    model, processor = build(VLMConfig.from_name("tiny"), pretrained=False)
    save_checkpoint(model, folder / "model", processor)
    recipe = folder / "recipe.yaml"
    recipe.write_text("model:\n  config: tiny\n  pretrained: false\n")
    return {
        "train": _write_split(folder, "train", 8, seed=1),
        "test": _write_split(folder, "test", 4, seed=2),
        "model": str(folder / "model"),
        "recipe": str(recipe),
    }


def test_probe_reads_a_checkpoints_encoder_and_separates_the_classes(colours):
    result = probe(colours["train"], colours["test"], model=colours["model"])
    assert result["test_accuracy"] == 1.0 and result["per_class"] == {"blue": 1.0, "green": 1.0, "red": 1.0}
    assert result["train"] == {"file": colours["train"], "rows": 24, "classes": 3}
    assert result["encoder"]["tokens"] == 16 and result["feature_dims"] == 16 * 64  # 4x4 tokens of 64, flattened
    assert set(result["l2_search"]) and result["l2"] in {float(k) for k in result["l2_search"]}
    # The probed encoder is the checkpoint's own, weights and all.
    saved = load_model(colours["model"]).encoder
    probed = encoder_from_checkpoint(colours["model"])
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), probed.state_dict().values()))


def test_probe_builds_a_recipes_encoder_and_pools_as_asked(colours):
    encoder = encoder_from_recipe(colours["recipe"])
    assert encoder.data_config["input_size"] == (3, 32, 32)
    mean = probe(colours["train"], colours["test"], recipe=colours["recipe"], pooling="mean", l2=1e-3)
    assert mean["feature_dims"] == 64 and mean["l2"] == 1e-3 and mean["l2_search"] == {}
    both = probe(colours["train"], colours["test"], recipe=colours["recipe"], pooling="flat+mean", max_train=12)
    assert both["feature_dims"] == 17 * 64 and both["train"]["rows"] == 12
    assert both["test"]["unseen_labels"] == 4  # the first 12 training rows are red and blue: green is never seen


def test_features_follow_the_encoders_preprocessing(colours):
    from vlm.eval.baselines.probe import read_labelled_images

    encoder = encoder_from_checkpoint(colours["model"])
    images, labels = read_labelled_images(colours["test"], "label")
    assert len(images) == 12 and labels[0] == "red"
    one_by_one = torch.cat([extract_features(encoder, [p]) for p in images[:3]])
    assert torch.allclose(extract_features(encoder, images[:3], batch_size=2), one_by_one, atol=1e-5)


def test_fit_logistic_learns_a_separable_problem_and_l2_shrinks_it():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    w, b = fit_logistic(x, y, 2, l2=1e-4)
    assert ((x @ w.T + b).argmax(1) == y).float().mean() > 0.97
    strong, _ = fit_logistic(x, y, 2, l2=10.0)
    assert strong.norm() < w.norm() / 10


def test_probe_errors(colours):
    with pytest.raises(VLMError, match="one of them"):
        probe(colours["train"], colours["test"])
    with pytest.raises(VLMError, match="one of them"):
        probe(colours["train"], colours["test"], model=colours["model"], recipe=colours["recipe"])
    with pytest.raises(VLMError, match=r"no single-image rows in .*\(24 no_answer\)"):
        probe(colours["train"], colours["test"], model=colours["model"], label_field="answer")
    with pytest.raises(VLMError, match="not a vlm checkpoint folder"):
        probe(colours["train"], colours["test"], model=colours["train"])


def test_vlm_probe_command(colours, capsys):
    args = [
        "probe",
        "--train",
        colours["train"],
        "--test",
        colours["test"],
        "--model",
        colours["model"],
        "--l2",
        "0.01",
    ]
    assert run(args) == 0
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == 1.0
