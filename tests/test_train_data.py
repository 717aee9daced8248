"""Training data: label masks for every row kind, collation, broken-row accounting, resumable loading."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import finishes_within, labelled_spans
from PIL import Image
from vlm.train.data import JsonlRows, ResumableDataLoader, ResumableSampler, VLMDataModule, VLMDataset

from vlm.checkpoint import build
from vlm.collate import Collator
from vlm.config import VLMConfig
from vlm.errors import VLMError
from vlm.processor import IGNORE_INDEX

SHAPES = Path(__file__).resolve().parents[1] / "samples" / "data" / "shapes-mini"


@pytest.fixture(scope="module")
def processor():
    return build(VLMConfig.from_name("tiny"), pretrained=False)[1]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def image(tmp_path: Path, name: str = "a.png", color=(255, 0, 0)) -> str:
    Image.new("RGB", (20, 20), color).save(tmp_path / name)
    return name


def test_label_masks_are_exactly_the_answers(tmp_path, processor):
    img = image(tmp_path)
    rows = [
        {"image": img, "caption": "a red square"},
        {"image": img, "question": "What colour?", "answer": ["blue", "red", "red"]},  # trains on the most common
        {
            "image": img,
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "a square"},
                {"from": "human", "value": "And its colour?"},
                {"from": "gpt", "value": "red"},
            ],
        },
        {"question": "What is two plus two?", "answer": "four"},  # text-only
    ]
    dataset = VLMDataset(JsonlRows(write_jsonl(tmp_path / "d.jsonl", rows), processor.caption_prompt), processor)
    expected = [["a red square"], ["red"], ["a square", "red"], ["four"]]
    tok = processor.tokenizer
    for i, answers in enumerate(expected):
        sample = dataset[i]
        ids, labels = sample["input_ids"], sample["labels"]
        # Labels are the input ids where they are set (the shift happens in the loss).
        assert all(label in (IGNORE_INDEX, t) for t, label in zip(ids, labels))
        spans = [tok.decode(span, skip_special_tokens=False) for span in labelled_spans(labels)]
        assert spans == [f"{a}<|im_end|>\n" for a in answers], spans
        # No image token and nothing of the prompt is labelled.
        assert not any(label == processor.image_token_id for label in labels)
        n_images = 0 if i == 3 else 1
        assert ids.count(processor.image_token_id) == n_images * processor.num_image_tokens
        assert (sample["pixel_values"] is None) == (n_images == 0)


def test_collate_right_pads_and_never_labels_padding(tmp_path, processor):
    img = image(tmp_path)
    rows = [
        {"image": img, "question": "What colour is the square in this picture?", "answer": "red"},
        {"image": img, "caption": "a red square on a white background"},
        {"question": "Hi?", "answer": "hello"},
    ]
    dataset = VLMDataset(
        JsonlRows(write_jsonl(tmp_path / "d.jsonl", rows), processor.caption_prompt), processor, generate={0, 1}
    )
    samples = [dataset[i] for i in range(3)]
    batch = Collator(processor)(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape[0] == 2  # the text-only row has no image
    assert batch["num_tokens"] == sum(lengths)
    # Only the question row chosen for generation carries a (left-padded) prompt ending with the assistant turn.
    gen = batch["generate"]
    assert gen["references"] == [["red"]] and gen["pixel_values"].shape[0] == 1
    prompt = processor.tokenizer.decode(gen["input_ids"][0], skip_special_tokens=False)
    assert prompt.endswith("<|im_start|>assistant\n") and "red" not in prompt


def test_broken_rows_are_counted_up_front_and_in_workers(tmp_path, processor):
    good = image(tmp_path)
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    rows = [{"image": good, "question": f"q{i}?", "answer": "yes"} for i in range(10)]
    rows[2] = "{bad json"
    rows[4] = {"image": good, "question": "no answer?"}
    rows[5] = {"image": "missing.png", "question": "q?", "answer": "a"}
    rows[7] = {"image": "corrupt.png", "question": "q?", "answer": "a"}
    rows[8] = {"image": good, "question": "long " * 200, "answer": "a"}
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dm = VLMDataModule(train=str(path), batch_size=3, num_workers=1, max_length=60, max_bad_fraction=0.9)
    dm.processor = processor
    dm.setup("fit")
    # Found while indexing: bad JSON (line 3), no answer (line 5), missing image (line 6).
    assert [key for key, _ in dm.train_errors] == [f"{path}:3", f"{path}:5", f"{path}:6"]
    assert "bad JSON" in dm.train_errors[0][1] and "image not found" in dm.train_errors[2][1]
    # Found in a loader worker: the corrupt image and the over-long row reach the main process with the batch.
    batches = list(dm.train_dataloader())
    bad = dict(b for batch in batches for b in batch["bad"])
    assert sorted(bad) == [f"{path}:8", f"{path}:9"]
    assert "corrupt" in bad[f"{path}:8"] and "data.max_length=60" in bad[f"{path}:9"]
    # Broken rows are replaced, so every batch is full and the epoch has as many samples as indexed rows.
    assert sum(b["input_ids"].shape[0] for b in batches) == 7


def test_every_kind_of_broken_row_is_one_row_with_its_line(tmp_path, processor, monkeypatch):
    import vlm.data

    monkeypatch.setattr(vlm.data, "MAX_LINE_BYTES", 200)
    good = image(tmp_path)
    os.mkfifo(tmp_path / "pipe.png")
    lines = [
        json.dumps({"image": good, "question": "first?", "answer": "yes"}).encode(),
        b'{"question": "caf\xe9?", "answer": "b"}',  # Latin-1
        b"{oops",
        json.dumps({"question": "x" * 300, "answer": "a"}).encode(),  # above the (patched) line limit
        json.dumps({"question": "no answer?"}).encode(),
        json.dumps({"image": "missing.png", "question": "q?", "answer": "a"}).encode(),
        json.dumps({"image": "pipe.png", "question": "q?", "answer": "a"}).encode(),  # would block if opened
        json.dumps({"image": good, "question": "last?", "answer": "no"}).encode(),
    ]
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")  # a BOM and CRLF endings are fine
    rows = JsonlRows(path, processor.caption_prompt)
    assert [message.removeprefix(f"{path}: ") for _, message in rows.errors] == [
        "line 2: not valid UTF-8 (byte 0xe9 at column 18)",
        "line 3: bad JSON (Expecting property name enclosed in double quotes)",
        "line 4: line longer than 200 bytes",
        "line 5: the question has no answer",
        f"line 6: image not found: {tmp_path / 'missing.png'}",
    ]
    assert [rows.get(i)[0].prompt for i in range(len(rows))] == ["first?", "q?", "last?"]  # offsets past the BOM
    dataset = VLMDataset(rows, processor)
    sample = finishes_within(30, lambda: dataset[1])  # the pipe: a broken row found when loaded, not a hang
    assert sample["bad"] == [
        (f"{path}:7", f"{path}:7: image {tmp_path / 'pipe.png'} is a named pipe, not a regular file")
    ]
    assert processor.tokenizer.decode(sample["input_ids"]).count("last?") == 1  # the next good row took its place


def test_training_data_without_rows_is_an_error(tmp_path, processor):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    dm = VLMDataModule(train=str(path))
    dm.processor = processor
    with pytest.raises(VLMError, match=rf"^no rows in {path}$"):
        dm.setup("fit")


def test_too_many_broken_rows_up_front_is_one_line_error(tmp_path, processor):
    path = write_jsonl(tmp_path / "d.jsonl", ["{oops"] * 3 + [{"question": "q?", "answer": "a"}] * 7)
    dm = VLMDataModule(train=str(path), max_bad_fraction=0.1)
    dm.processor = processor
    with pytest.raises(
        VLMError, match=r"3 of 10 rows \(30.0%\) of the training data .* data.max_bad_fraction=0.1"
    ) as e:
        dm.setup("fit")
    assert "\n" not in str(e.value)


def test_resumable_loader_skips_consumed_batches_in_the_same_order(tmp_path, processor):
    lines = (SHAPES / "val.jsonl").read_text().splitlines()[:120]
    rows = [{**json.loads(line), "image": str(SHAPES / json.loads(line)["image"])} for line in lines]
    dataset = VLMDataset(JsonlRows(write_jsonl(tmp_path / "d.jsonl", rows), processor.caption_prompt), processor)
    epoch = {"n": 1}

    def loader():
        sampler = ResumableSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=3)
        return ResumableDataLoader(
            dataset, epoch_fn=lambda: epoch["n"], batch_size=15, sampler=sampler, collate_fn=Collator(processor)
        )

    full = [b["input_ids"] for b in loader()]
    first = loader()
    it = iter(first)
    head = [next(it)["input_ids"] for _ in range(3)]
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batches"] == 3
    resumed = loader()
    resumed.load_state_dict(state)
    tail = [b["input_ids"] for b in resumed]
    assert len(head) + len(tail) == len(full) == 8
    for a, b in zip(head + tail, full):
        assert torch.equal(a, b)
    # The next epoch starts from the beginning, in a new order.
    epoch["n"] = 2
    again = [b["input_ids"] for b in resumed]
    assert len(again) == 8 and not torch.equal(again[0], full[0])


def test_ranks_get_disjoint_shares_and_skip_within_their_own():
    data = list(range(20))
    samplers = [ResumableSampler(data, num_replicas=2, rank=r, shuffle=True, seed=0) for r in (0, 1)]
    shares = [list(s) for s in samplers]
    assert sorted(shares[0] + shares[1]) == data
    samplers[1].start = 4
    assert list(samplers[1]) == shares[1][4:]


def test_generation_rows_come_first_and_a_cutting_val_limit_is_refused(tmp_path, processor):
    img = image(tmp_path)
    rows = [{"image": img, "question": f"question {i}?", "answer": f"a{i}"} for i in range(10)]
    path = write_jsonl(tmp_path / "val.jsonl", rows)
    dataset = VLMDataset(JsonlRows(path, processor.caption_prompt), processor, generate={2, 5, 8})
    # The three chosen rows are items 0-2 (so any prefix of batches holds them), then the rest in file order.
    refs = [dataset[i].get("references") for i in range(10)]
    assert refs[:3] == [["a2"], ["a5"], ["a8"]] and refs[3:] == [None] * 7
    decode = processor.tokenizer.decode
    rest = [0, 1, 3, 4, 6, 7, 9]
    assert all(f"question {k}?" in decode(dataset[i]["input_ids"]) for i, k in zip(range(3, 10), rest))

    class Trainer:  # what the data module reads of a trainer
        limit_val_batches = 1
        world_size, global_rank = 1, 0

    module = VLMDataModule(train=str(path), val=str(path), batch_size=2, generate_samples=3)
    module.processor, module.trainer = processor, Trainer()
    with pytest.raises(VLMError, match=r"limit_val_batches=1 validates 1 batches, but the 3 generation rows"):
        module.setup("validate")
    Trainer.limit_val_batches = 2  # two batches of two hold all three
    module.val_set = None
    module.setup("validate")
    assert module.val_set.num_generate == 3
