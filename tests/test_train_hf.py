"""Hugging Face `datasets` sources (saved folders, parquet, image folders, streaming) and LoRA fine-tuning."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest
import torch
from conftest import run_vlm
from PIL import Image
from vlm.train.data import ResumableDataLoader, VLMDataModule
from vlm.train.module import VLMModule

from vlm.checkpoint import build, load
from vlm.collate import Collator
from vlm.config import VLMConfig
from vlm.errors import VLMError
from vlm.lora import LoraSettings
from vlm.processor import IGNORE_INDEX
from vlm.training_ckpt import export_state

torch.set_num_threads(1)
TINY = Path(__file__).resolve().parents[1] / "samples" / "configs" / "tiny.yaml"
COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


@pytest.fixture(scope="module")
def processor():
    return build(VLMConfig.from_name("tiny"), pretrained=False)[1]


@pytest.fixture(scope="module")
def table():
    """12 VQA rows with in-memory images under non-standard column names; row 5 has no answer."""
    names = list(COLORS) * 4
    answers = [[n] for n in names]
    answers[5] = None
    return datasets.Dataset.from_dict(
        {
            "picture": [Image.new("RGB", (16, 16), COLORS[n]) for n in names],
            "query": ["What colour is it?"] * len(names),
            "label": answers,
        },
        features=datasets.Features(
            {
                "picture": datasets.Image(),
                "query": datasets.Value("string"),
                "label": datasets.Sequence(datasets.Value("string")),
            }
        ),
    )


COLUMNS = {"image": "picture", "question": "query", "answer": "label"}


def answers_of(processor, batch) -> list[str]:
    tok = processor.tokenizer
    return [
        tok.decode([t for t in row.tolist() if t != IGNORE_INDEX], skip_special_tokens=True).strip()
        for row in batch["labels"]
    ]


def test_saved_dataset_and_parquet_with_mapped_columns(tmp_path, table, processor):
    table.save_to_disk(str(tmp_path / "saved"))
    table.to_parquet(str(tmp_path / "t.parquet"))
    for source in (tmp_path / "saved", tmp_path / "t.parquet"):
        dm = VLMDataModule(
            train=str(source),
            columns=COLUMNS,
            batch_size=4,
            num_workers=0,
            hf_kwargs={"cache_dir": str(tmp_path / "cache")} if source.suffix else None,
        )
        dm.processor = processor
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        got = sorted(a for b in batches for a in answers_of(processor, b))
        # 11 good rows, plus the row that replaced the broken one (row 5 has no answer).
        assert len(got) == 12 and set(got) == set(COLORS)
        bad = [m for b in batches for _, m in b["bad"]]
        assert len(bad) == 1 and bad[0].startswith(f"{source}[5]") and "answer" in bad[0]
        assert all(b["pixel_values"].shape == (4, 3, 32, 32) for b in batches)
        # Dataset rows are parsed only when loaded: the training record cannot count broken ones up front.
        assert dm.describe()["train"] == [{"source": str(source), "split": "train", "rows": 12, "broken_rows": None}]


def test_imagefolder_with_metadata(tmp_path, processor):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rows = []
    for name, rgb in COLORS.items():
        Image.new("RGB", (16, 16), rgb).save(folder / f"{name}.png")
        rows.append({"file_name": f"{name}.png", "caption": f"a {name} square"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = VLMDataModule(train=str(folder), batch_size=3, num_workers=0, hf_kwargs={"cache_dir": str(tmp_path / "cache")})
    dm.processor = processor
    dm.setup("fit")
    (batch,) = list(dm.train_dataloader())
    assert sorted(answers_of(processor, batch)) == sorted(f"a {n} square" for n in COLORS)


def test_streaming_resumes_at_the_same_row(tmp_path, table, processor, monkeypatch):
    # datasets pauses 5 s after each pass over a parquet stream (an Arrow thread-shutdown workaround).
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    table.to_parquet(str(tmp_path / "t.parquet"))
    dm = VLMDataModule(
        train=str(tmp_path / "t.parquet"),
        columns=COLUMNS,
        streaming=True,
        batch_size=2,
        num_workers=0,
        hf_kwargs={"cache_dir": str(tmp_path / "cache")},
    )
    dm.processor = processor
    dm.setup("fit")

    def loader():
        return ResumableDataLoader(dm.train_set, epoch_fn=lambda: 0, batch_size=2, collate_fn=Collator(processor))

    full = [b["input_ids"] for b in loader()]
    assert len(full) == 6  # 11 good rows: the broken one is skipped and reported
    first = loader()
    it = iter(first)
    for _ in range(3):  # Lightning reads one batch ahead of training from loaders without a length
        next(it)
    state = first.state_dict()
    assert state["batches"] == 2
    resumed = loader()
    resumed.load_state_dict(state)
    tail = [b["input_ids"] for b in resumed]
    assert len(tail) == 4 and all(torch.equal(a, b) for a, b in zip(tail, full[2:]))


def test_lora_trains_adapters_only_and_merges_on_export(tmp_path, table, processor):
    module = VLMModule(
        config="tiny",
        pretrained=False,
        lr_encoder=0,
        lr_projector=0,
        lr_decoder=1e-2,
        lora=LoraSettings(r=4, alpha=8, dropout=0.0),
    )
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    dm = VLMDataModule(train=str(tmp_path / "x"), columns=COLUMNS, batch_size=4, num_workers=0)
    table.save_to_disk(str(tmp_path / "x"))
    dm.processor = module.processor
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        module(batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    module.eval()
    with torch.no_grad():
        expected = module.vlm(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
    export_state(module.export_meta(), module.state_dict(), tmp_path / "merged")
    merged, _ = load(tmp_path / "merged")
    assert not any("lora" in n for n in merged.state_dict())
    record = json.loads((tmp_path / "merged" / "training.json").read_text())
    assert record["model"]["lora"]["r"] == 4 and record["learning_rates"]["decoder"] == 1e-2
    assert "steps" not in record and "data" not in record  # trained without a Trainer: nothing to tell
    with torch.no_grad():
        got = merged(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
    assert torch.allclose(got, expected, atol=1e-4)


def test_unmapped_columns_stop_before_training(tmp_path, table, processor):
    """A dataset whose columns are not the JSONL fields is one line pointing to --data.columns, not a worker crash."""
    table.save_to_disk(str(tmp_path / "saved"))
    run = run_vlm(
        ["fit", "--config", TINY, f"--data.train={tmp_path / 'saved'}", "--data.val=null", "--data.num_workers=1",
         f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.max_steps=1"]
    )  # fmt: skip
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert (
        lines[-1].startswith("vlm: error: ") and "--data.columns" in lines[-1] and "picture, query, label" in lines[-1]
    )
    assert not (tmp_path / "run" / "checkpoints").exists()
    # A mapped column the dataset lacks is named; so is a question without an answer.
    for columns, message in (
        ({**COLUMNS, "answer": "labels"}, "no column 'labels' (data.columns maps 'answer' to it)"),
        ({"image": "picture", "question": "query"}, "map them with --data.columns"),
    ):
        dm = VLMDataModule(train=str(tmp_path / "saved"), columns=columns, num_workers=0)
        dm.processor = processor
        with pytest.raises(VLMError, match=re.escape(message)):
            dm.setup("fit")
