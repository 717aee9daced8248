"""Tests for model cards (vlm/model_card.py): every number comes from the checkpoint folder's own files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import vlm.eval.metrics
from vlm.eval.benchmarks.shapes import generate_shapes
from vlm.eval.evaluate import evaluate

from vlm.checkpoint import build, save_checkpoint
from vlm.config import VLMConfig
from vlm.errors import VLMError
from vlm.generation import GenerationOptions
from vlm.model_card import EVAL_RESULTS_FILE, parameter_counts, write_model_card


def _odd_tiny_config() -> VLMConfig:
    """Not a preset: 3 decoder layers and a pixel-shuffle projector, so the card cannot be right by accident."""
    config = VLMConfig.from_name("tiny")
    config.decoder.hf_config["num_hidden_layers"] = 3
    config.projector.kind, config.projector.factor = "pixel_shuffle", 2
    return config


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    model, processor = build(_odd_tiny_config(), pretrained=False)
    path = save_checkpoint(model, tmp_path_factory.mktemp("card") / "odd-tiny", processor)
    return model, processor, path


def test_card_describes_the_real_config_and_parameter_counts(built) -> None:
    model, _, path = built
    expected = {
        part: sum(p.numel() for p in getattr(model, part).parameters()) for part in ("encoder", "projector", "decoder")
    }
    total = sum(p.numel() for p in model.parameters())  # tied embeddings count once
    assert parameter_counts(path) == {**expected, "total": total}
    assert sum(expected.values()) == total

    card = write_model_card(path).read_text()
    assert path / "README.md" == write_model_card(path)
    for part, n in expected.items():
        assert f"| {part} | " in card and f"| {n:,} ({100 * n / total:.1f}%) |" in card
    assert f"**{total:,}**" in card
    assert "`vit_base_patch16_siglip_224` (img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)" in card
    assert "`pixel_shuffle`, factor 2" in card
    assert "transformers `llama`: 3 layers, hidden size 64" in card
    assert f"{model.num_image_tokens} image tokens each" in card and model.num_image_tokens == 4
    assert "resized to 32x32 pixels" in card
    assert "Unknown: this folder has no `training.json`" in card
    assert "No `vlm eval` results for these weights yet" in card


def test_training_record_is_shown(built, tmp_path: Path) -> None:
    _, _, path = built
    folder = Path(shutil.copytree(path, tmp_path / "trained"))
    (folder / "training.json").write_text(json.dumps({"data": "shapes/train.jsonl", "steps": 120, "lr": [0.001]}))
    card = write_model_card(folder).read_text()
    assert "- **data**: shapes/train.jsonl" in card and "- **steps**: 120" in card and "- **lr**: [0.001]" in card
    assert "Unknown" not in card


def test_vlm_training_records_are_summarized(built, tmp_path: Path) -> None:
    _, _, path = built
    folder = Path(shutil.copytree(path, tmp_path / "tuned"))
    record = {
        "format_version": 1,
        "written_by": "vlm fit",
        "date": "2030-01-02T03:04:05+00:00",
        "model": {
            "config": None,
            "init_from": "runs/align/model",
            "expand_decoder": {"from_layers": 3, "to_layers": 6},
            "pretrained": True,
            "lora": {"r": 8, "alpha": 16},
        },
        "learning_rates": {"encoder": 0.0, "projector": 0.001, "decoder": 2e-05},
        "optimizer": {"name": "AdamW", "weight_decay": 0.01, "betas": [0.9, 0.95], "warmup": 0.03, "min_lr_ratio": 0.1},
        "data": {
            "train": [
                {"source": "a.jsonl", "rows": 12000, "broken_rows": 3},
                {"source": "hub/vqa", "split": "train", "rows": None, "broken_rows": None},
            ],
            "val": [{"source": "v.parquet", "split": "validation", "rows": 500, "broken_rows": None}],
            "streaming": True,
            "columns": None,
        },
        "steps": 1500,
        "epochs_seen": 2.5,
        "epochs_completed": 2,
        "batch_size": 16,
        "accumulate_grad_batches": 2,
        "global_batch_size": 128,
        "precision": "bf16-mixed",
        "accelerator": "cuda",
        "devices": 4,
        "num_nodes": 1,
        "strategy": "DDPStrategy",
        "wall_time_s": 5400.0,
        "last_metrics": {
            "train_loss": 0.5,
            "train_bad_rows": 7,
            "val_step": 1500,
            "val_loss": 0.75,
            "val_accuracy": 0.6,
        },
        "versions": {"lightning": "2.6.6", "torch": "2.14.1"},
    }
    (folder / "training.json").write_text(json.dumps(record))
    card = write_model_card(folder).read_text()
    expected = [
        "## Training\n\nRecorded by `vlm fit` on 2030-01-02T03:04:05+00:00; the full record is `training.json`.",
        "- **Start**: initialised from `runs/align/model`; decoder expanded from 3 to 6 layers (new ones start as the "
        "identity); LoRA r=8, alpha=16 (merged).",
        "- **Data**: `a.jsonl` (12,000 rows; 3 broken rows skipped), `hub/vqa` [train] (rows not counted) (streamed); "
        "validation: `v.parquet` [validation] (500 rows); 7 broken rows skipped in the last epoch.",
        "- **Steps**: 1,500 optimizer steps (2.5 passes over the training rows), 128 rows per step (16 per device x 4 "
        "device(s) x 2 accumulated).",
        "- **Learning rates** (peak): encoder frozen, projector 0.001, decoder 2e-05; AdamW, weight decay 0.01, warmup "
        "0.03, cosine decay to 0.1x.",
        "- **Hardware**: 4 x cuda (DDPStrategy), precision bf16-mixed; wall time 90.0 min.",
        "- **Final losses**: training loss 0.5000 (last step); validation loss 0.7500, accuracy 0.6000 (step 1500).",
        "- **Software**: lightning 2.6.6, torch 2.14.1.",
    ]
    for line in expected:
        assert line in card, line

    # Exported from an old training checkpoint: what it does not know is said, not made up.
    old = {"format_version": 1, "written_by": "vlm export of last.ckpt", "date": "2030-01-01T00:00:00+00:00",
           "exported_at": "2030-02-01T00:00:00+00:00",
           "model": {"lora": None}, "learning_rates": {"projector": 0.001},
           "data": "unknown: this checkpoint does not record the data it was trained on", "steps": 40,
           "epochs_completed": 1, "versions": {"lightning": "2.6.6"}}  # fmt: skip
    (folder / "training.json").write_text(json.dumps(old))
    card = write_model_card(folder).read_text()
    assert (
        "Recorded by `vlm export of last.ckpt` on 2030-02-01T00:00:00+00:00, from a checkpoint saved "
        "2030-01-01T00:00:00+00:00; the full record is `training.json`." in card
    )
    assert "- **Data**: unknown: this checkpoint does not record the data it was trained on." in card
    assert (
        "- **Steps**: 40 optimizer steps (whole passes over the training rows: 1)." in card and "**Start**" not in card
    )
    assert "**Final losses**" not in card and "**Hardware**" not in card


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(VLMError, match="not a vlm checkpoint folder"):
        write_model_card(tmp_path)


def _overall_line(report: dict) -> str:
    values = " | ".join("-" if v is None else f"{v:.4f}" for v in report["metrics"].values())
    return f"| overall ({report['num_scored']}) | {values} |"


def test_evaluate_records_results_and_regenerates_the_card(
    built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vlm.eval.metrics, "_java_available", lambda: False)  # no METEOR start-up
    model, processor, _ = built
    folder = save_checkpoint(model, tmp_path / "ckpt", processor)
    data_dir = tmp_path / "shapes"
    generate_shapes(data_dir, train=0, val=0, test=1, seed=5)
    questions = data_dir / "four.jsonl"
    questions.write_text("".join((data_dir / "test.jsonl").read_text().splitlines(keepends=True)[:4]))
    gen = GenerationOptions(max_new_tokens=2)

    evaluate(model=str(folder), data=str(questions), output=str(tmp_path / "q.json"), gen=gen, update_card=True)
    evaluate(
        model=str(folder),
        data=str(data_dir / "test_captions.jsonl"),
        output=str(tmp_path / "c.json"),
        gen=gen,
        update_card=True,
    )
    q_report = json.loads((tmp_path / "q.json").read_text())
    c_report = json.loads((tmp_path / "c.json").read_text())

    results = json.loads((folder / EVAL_RESULTS_FILE).read_text())["results"]
    assert set(results) == {str(questions.resolve()), str((data_dir / "test_captions.jsonl").resolve())}
    assert results[str(questions.resolve())]["metrics"] == q_report["metrics"]
    card = (folder / "README.md").read_text()
    assert f"### `{questions.resolve()}`" in card and _overall_line(q_report) in card
    assert "| | vqa_accuracy | exact_match |" in card
    # Each type and subtype of the questions gets its own line, with its row count.
    for field, prefix in (("type", ""), ("subtype", "subtype ")):
        assert q_report[f"by_{field}"] and results[str(questions.resolve())][f"by_{field}"] == q_report[f"by_{field}"]
        for name, m in q_report[f"by_{field}"].items():
            count = q_report[f"{field}_counts"][name]
            assert f"| {prefix}{name} ({count}) | {m['vqa_accuracy']:.4f} | {m['exact_match']:.4f} |" in card
    assert (
        _overall_line(c_report) in card and "| | bleu_1 | bleu_2 | bleu_3 | bleu_4 | rouge_l | cider | meteor |" in card
    )

    # A --limit run is partial: it leaves the recorded results and the card alone.
    before = card
    evaluate(model=str(folder), data=str(questions), limit=1, gen=gen, update_card=True)
    assert (folder / "README.md").read_text() == before

    # New weights in the same folder: the old numbers are not this model's any more.
    torch.manual_seed(1)
    other, other_processor = build(_odd_tiny_config(), pretrained=False)
    save_checkpoint(other, folder, other_processor)  # keeps README.md and eval_results.json beside the weights
    card = write_model_card(folder).read_text()
    assert "No `vlm eval` results for these weights yet" in card and _overall_line(q_report) not in card
    assert "2 earlier result(s)" in card


def test_the_card_opens_with_what_the_model_knows(tmp_path):
    """A config's description is the card's first line after the title."""
    from vlm.checkpoint import build, save_checkpoint
    from vlm.config import VLMConfig
    from vlm.model_card import render_model_card

    config = VLMConfig.from_name("tiny")
    config.description = "Knows only the colours of squares."
    model, processor = build(config, pretrained=False)
    save_checkpoint(model, tmp_path / "m", processor)
    lines = render_model_card(tmp_path / "m").splitlines()
    assert lines[lines.index("# m") + 2] == "Knows only the colours of squares."
