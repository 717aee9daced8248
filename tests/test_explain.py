"""Tests for explanation maps (vlm/explain.py, `vlm explain`) and their benchmark (eval/explain_bench.py)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny, tiny_config
from PIL import Image
from test_cli import run
from vlm.eval.benchmarks.shapes import generate_shapes
from vlm.eval.explain_bench import blank, explain_bench, pointing_hit, uniformity

from vlm.errors import VLMError
from vlm.explain import METHODS, attention_weights, draw, explain_answer, normalise, relevance
from vlm.generation import GenerationOptions

GEN = GenerationOptions(max_new_tokens=3)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    img = Image.new("RGB", (32, 32), (250, 250, 250))
    img.paste((200, 20, 20), (0, 0, 12, 12))
    img.paste((20, 20, 200), (18, 16, 30, 30))
    return img


@pytest.mark.parametrize("method", METHODS)
def test_maps_have_the_grid_shape_and_are_finite_and_normalised(tiny, image, method):
    model, processor = tiny
    e = explain_answer(model, processor, image, "What colour is it?", method, GEN)
    rows, cols = model.image_grid
    assert e.answer and e.grid == (rows, cols)
    assert e.token_scores.shape == (len(e.tokens), rows, cols) and len(e.tokens) >= 1
    assert e.word_scores.shape == (len(e.answer.split()), rows, cols) and e.words == e.answer.split()
    for maps in (e.token_scores, e.word_scores, e.scores[None]):
        assert torch.isfinite(maps).all() and (maps >= 0).all()
        assert torch.allclose(maps.flatten(1).sum(1), torch.ones(len(maps)))
    assert not torch.allclose(e.scores, torch.full((rows, cols), 1 / (rows * cols)))  # a scrambled model looks
    saved = e.to_json()
    assert len(saved["scores"]) == rows and len(saved["scores"][0]) == cols and len(saved["tokens"]) == len(e.tokens)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_attention_weights_of_a_left_padded_row_equal_the_unpadded_ones(image, family):
    """The weights come from the model's own forward: left padding changes neither positions nor attention (GPT-2's
    positions are absolute, so a pass that numbered the padding would shift them)."""
    model, processor = build_tiny(tiny_config(family))
    batch = processor(["What colour is it?"], [[image]])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    padded_ids = torch.cat([torch.zeros_like(ids[:, :3]), ids], 1)
    padded_mask = torch.cat([torch.zeros_like(mask[:, :3]), mask], 1)
    alone = attention_weights(model, ids, mask, batch["pixel_values"])
    padded = attention_weights(model, padded_ids, padded_mask, batch["pixel_values"])
    assert len(alone) == len(padded) == model.decoder.config.num_hidden_layers
    for a, p in zip(alone, padded):
        torch.testing.assert_close(p[:, :, 3:, 3:], a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_only_the_one_visible_image_token_gets_relevance(tiny, image, method):
    """With every image token but one masked out of attention, only that one can influence the answer."""
    model, processor = tiny
    batch = processor(["What colour is it?"], [[image]])
    answer = torch.tensor([[5, 9, 7]])
    ids = torch.cat([batch["input_ids"], answer], 1)
    image_positions = (ids[0] == model.image_token_id).nonzero()[:, 0]
    for visible in (3, 10):
        mask = torch.ones_like(ids)
        mask[0, image_positions] = 0
        mask[0, image_positions[visible]] = 1
        scores = relevance(model, ids, mask, batch["pixel_values"], 3, method)
        assert scores.shape == (3, model.num_image_tokens)
        assert (scores.argmax(1) == visible).all()
        others = torch.cat([scores[:, :visible], scores[:, visible + 1 :]], 1)
        assert (others == 0).all() and (scores[:, visible] > 0).all()


def test_normalise_makes_empty_maps_uniform():
    out = normalise(torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 3.0, 0.0, float("nan")]]))
    assert torch.equal(out, torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.25, 0.75, 0.0, 0.0]]))


def test_pointing_uniformity_and_blanking_on_a_constructed_case():
    peaked = torch.zeros(5, 5)
    peaked[1, 3] = 1.0
    assert pointing_hit(peaked, {8}) and not pointing_hit(peaked, {7, 13})
    assert uniformity(torch.full((5, 5), 1 / 25)) == pytest.approx(1.0)
    assert uniformity(peaked) == pytest.approx(0.0, abs=1e-6)
    img = Image.new("RGB", (10, 10), (255, 255, 255))
    img.paste((255, 0, 0), (5, 0, 10, 5))  # the top-right patch of a 2x2 grid
    out = blank(img, (2, 2), [1])
    assert out.getcolors() == [(100, (255, 255, 255))] and img.getpixel((7, 2)) == (255, 0, 0)


def test_the_picture_is_written_and_readable(tiny, image, tmp_path):
    model, processor = tiny
    e = explain_answer(model, processor, image, None, "gradient", GenerationOptions(max_new_tokens=6))
    draw(e, image, tmp_path / "map.png")
    with Image.open(tmp_path / "map.png") as png:
        assert png.format == "PNG" and png.width > 200 and png.height > 200


def test_refusals(image, monkeypatch):
    prefix_model, prefix_processor = build_tiny(tiny_config(encoder="vit_tiny_patch16_224", keep_prefix_tokens=True))
    with pytest.raises(VLMError, match="patch grid"):
        explain_answer(prefix_model, prefix_processor, image, "What colour?", "attention", GEN)
    model, processor = build_tiny()

    def refuse(name):
        raise ValueError("this decoder does not support eager attention")

    monkeypatch.setattr(model.decoder, "set_attn_implementation", refuse)
    with pytest.raises(VLMError, match="cannot return attention weights.*use --method gradient"):
        explain_answer(model, processor, image, "What colour?", "attention", GEN)
    assert explain_answer(model, processor, image, "What colour?", "gradient", GEN).answer


def test_cli_one_line_errors(capsys, varied_checkpoint, tmp_path, image):
    image.save(tmp_path / "a.png")
    cases = [
        ([], "give IMAGE"),
        ([tmp_path / "missing.png", "What?"], "missing.png"),
        ([tmp_path / "a.png", "  "], "the question is empty"),
        ([tmp_path / "a.png", "What?", "--output", tmp_path / "a.jpg"], "must name a .png file"),
        ([tmp_path / "a.png", "--input", tmp_path / "q.jsonl"], "not both"),
        ([tmp_path / "a.png", "--method", "saliency"], "--method must be one of attention, rollout, gradient"),
    ]
    for args, message in cases:
        code, out, err = run(capsys, "explain", *args, "--model", varied_checkpoint)
        assert code == 2 and out == "", args
        assert err.count("\n") == 1 and err.startswith("vlm: error: ") and message in err, err


def test_cli_writes_picture_and_json(capsys, varied_checkpoint, tmp_path, image):
    image.save(tmp_path / "a.png")
    out_png = tmp_path / "out" / "a.png"
    code, out, _ = run(
        capsys,
        "explain",
        tmp_path / "a.png",
        "What?",
        "--output",
        out_png,
        "--model",
        varied_checkpoint,
        "--max_new_tokens",
        "3",
        "--method",
        "rollout",
    )
    saved = json.loads(out_png.with_suffix(".json").read_text())
    assert code == 0 and out.strip() == saved["answer"] and saved["method"] == "rollout"
    assert saved["image"] == str(tmp_path / "a.png") and saved["map"] == "a.png" and Image.open(out_png).size


def test_batch_writes_one_png_and_json_per_row_and_goes_on_after_bad_rows(capsys, varied_checkpoint, tmp_path, image):
    image.save(tmp_path / "a.png")
    rows = [
        {"image": "a.png", "question": "What colour is it?", "id": 1},
        {"image": "missing.png", "question": "What?", "id": 2},
        {"image": "a.png", "id": 3},  # no question: its caption is explained
    ]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    maps = tmp_path / "maps"
    code, _, err = run(
        capsys,
        "explain",
        "--input",
        tmp_path / "q.jsonl",
        "--output_dir",
        maps,
        "--model",
        varied_checkpoint,
        "--max_new_tokens",
        "3",
    )
    assert code == 2 and "2 of 4 rows failed" in err
    assert sorted(p.name for p in maps.iterdir()) == [
        "00000.json",
        "00000.png",
        "00001.json",
        "00002.json",
        "00002.png",
        "00003.json",
    ]
    written = [json.loads((maps / f"0000{k}.json").read_text()) for k in range(4)]
    assert [w.get("id") for w in written[:3]] == [1, 2, 3] and written[0]["image"] == "a.png"
    assert "error" not in written[0] and "missing.png" in written[1]["error"] and "error" in written[3]
    assert written[2]["prompt"] == "Describe the image." and len(written[2]["scores"]) == 4


def test_benchmark_report_on_an_untrained_shapes_model(tmp_path):
    from vlm.commands import init

    generate_shapes(tmp_path / "shapes", train=0, val=0, test=1)
    assert init(str(tmp_path / "model"), preset="shapes", seed=0) == 0
    report = explain_bench(
        str(tmp_path / "shapes" / "test.jsonl"),
        str(tmp_path / "model"),
        rows=2,
        max_k=2,
        max_new_tokens=2,
        device="cpu",
    )
    assert report["questions"] + report["failed"] == 2 and len(report["deletion_random"]) == 2
    assert 1 / 25 <= report["random_map"]["pointing"] <= 4 / 25
    for method in METHODS:
        assert 0 <= report[method]["pointing"] <= 1 and 0 < report[method]["uniformity"] <= 1
        assert all(0 <= d <= 1 for d in report[method]["deletion"])


def test_a_given_answer_is_explained_as_if_the_model_had_answered_it(tiny, image, monkeypatch):
    model, processor = tiny
    ids = processor.text_ids("a red square")
    given = explain_answer(model, processor, image, "What colour is it?", "gradient", answer=" a red square ")
    end = processor.stop_token_ids[0]
    monkeypatch.setattr("vlm.explain.generate_ids", lambda *args: torch.tensor([[*ids, end, end]]))
    generated = explain_answer(model, processor, image, "What colour is it?", "gradient", GEN)
    assert given.answer == generated.answer == "a red square" and len(given.tokens) == len(ids)
    assert torch.equal(given.token_scores, generated.token_scores)
    with pytest.raises(VLMError, match="answer is empty"):
        explain_answer(model, processor, image, "What colour is it?", answer="  ")
