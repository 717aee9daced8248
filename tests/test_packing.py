"""Sequence packing (vlm/collate.py, vlm/model.py): a packed batch gives every sample the logits, and the batch the
loss, that padding gives, for every decoder family that packs; a family that would mix samples is refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import build_tiny, family_config, solid, tiny_config
from vlm.train.data import VLMDataModule

from vlm.collate import Collator, pack_rows
from vlm.errors import VLMError
from vlm.model import IGNORE_INDEX, PACKING_FAMILIES

# Conversations of different lengths with 1, 0, 2 and 1 images: packing reorders them, so the images of a packed
# batch are not in the order of the padded one.
CONVERSATIONS = [
    ("<image>\nWhat colour is the square in the middle of this picture?", "red, with a thin white border", 1),
    ("hello", "hi there", 0),
    ("Compare <image> with <image>.", "the left one is green and the right one is blue", 2),
    ("<image>\nShape?", "a circle", 1),
]
COLOURS = [(250, 30, 30), (20, 200, 40), (30, 40, 230), (240, 240, 240)]


def samples_for(processor) -> list[dict]:
    images = iter(processor.transform([solid(c) for c in COLOURS]))
    out = []
    for question, answer, n in CONVERSATIONS:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        ids, labels = processor.encode(messages, n)
        pixels = torch.stack([next(images) for _ in range(n)]) if n else None
        out.append({"input_ids": ids, "labels": labels, "pixel_values": pixels, "bad": []})
    return out


def test_pack_rows_is_first_fit_decreasing():
    assert pack_rows([5, 3, 8, 2, 6], 10) == [[2, 3], [1, 4], [0]]
    # A sample longer than a row gets a row of its own; nothing is dropped.
    assert pack_rows([12, 4, 4], 10) == [[0], [1, 2]]
    assert pack_rows([1], 1) == [[0]]


def test_packed_batch_layout(tiny):
    _, processor = tiny
    samples = samples_for(processor)
    lengths = [len(s["input_ids"]) for s in samples]
    capacity = lengths[0] + lengths[1]
    batch = Collator(processor, pack_tokens=capacity)(samples)
    assert "attention_mask" not in batch and batch["num_samples"] == 4 and batch["num_tokens"] == sum(lengths)
    rows, width = batch["input_ids"].shape
    assert rows < len(samples) and width <= capacity
    covered = torch.zeros(rows, width, dtype=torch.bool)
    for s, (r, start, end) in zip(samples, batch["spans"]):
        assert batch["input_ids"][r, start:end].tolist() == s["input_ids"]
        assert batch["labels"][r, start:end].tolist() == s["labels"]
        assert batch["position_ids"][r, start:end].tolist() == list(range(end - start))
        covered[r, start:end] = True
    # Every token is one sample's or padding; padding is unlabelled and at position 0 (a one-token sample).
    assert int(covered.sum()) == sum(lengths)
    assert (batch["labels"][~covered] == IGNORE_INDEX).all() and (batch["position_ids"][~covered] == 0).all()
    assert batch["pixel_values"].shape[0] == 4


# transformers' GPT-J has eager attention only.
CASES = [(f, a) for f in PACKING_FAMILIES for a in ("sdpa", "eager") if (f, a) != ("gptj", "sdpa")]
CASES += [("llama-grid", "sdpa"), ("qwen2-grid", "eager")]  # image tokens with grid positions


@pytest.mark.parametrize(("family", "attention"), CASES)
def test_packed_and_padded_batches_give_the_same_logits_and_loss(family, attention):
    model, processor = build_tiny(family_config(family))
    model.decoder.set_attn_implementation(attention)
    samples = samples_for(processor)
    # Also label each sample's first token: packed, it must not become a target of the sample before it.
    for s in samples:
        s["labels"][0] = s["input_ids"][0]
    lengths = [len(s["input_ids"]) for s in samples]
    padded = Collator(processor)(samples)
    packed = Collator(processor, pack_tokens=max(lengths) + min(lengths))(samples)
    assert packed["input_ids"].shape[0] < len(samples)
    assert any(sum(span[0] == r for span in packed["spans"]) > 1 for r in range(packed["input_ids"].shape[0]))
    assert not torch.equal(packed["pixel_values"], padded["pixel_values"])  # reordered with the samples
    keys = ("input_ids", "attention_mask", "position_ids", "pixel_values")  # no labels: every position's logits
    with torch.no_grad():
        a = model(**{k: padded[k] for k in keys if k in padded})
        b = model(**{k: packed[k] for k in keys if k in packed})
        loss_a = model(**{k: padded[k] for k in keys if k in padded}, labels=padded["labels"]).loss
        loss_b = model(**{k: packed[k] for k in keys if k in packed}, labels=packed["labels"]).loss
    for i, (r, start, end) in enumerate(packed["spans"]):
        torch.testing.assert_close(b.logits[r, start:end], a.logits[i, : lengths[i]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)


def test_a_decoder_that_would_mix_samples_is_refused(tmp_path):
    # Bloom's ALiBi attention biases come from the attention mask, not from positions: packed samples would see
    # each other (the second sample's logits change), so packing is refused rather than silently mixing them.
    config = tiny_config()
    config.decoder.hf_config = {"model_type": "bloom", "hidden_size": 64, "n_layer": 2, "n_head": 2}
    model, processor = build_tiny(config)
    samples = samples_for(processor)[:2]
    packed = Collator(processor, pack_tokens=10_000)(samples)
    alone = Collator(processor)(samples[1:])
    r, start, end = packed["spans"][1]
    assert r == 0 and start > 0  # both samples share one row
    with torch.no_grad():
        mixed = model.decoder(
            inputs_embeds=model.embed(packed["input_ids"], packed["pixel_values"]),
            position_ids=packed["position_ids"],
            use_cache=False,
        ).logits
        expected = model(alone["input_ids"], alone["attention_mask"], alone["pixel_values"]).logits
    assert not torch.allclose(mixed[r, start:end], expected[0], atol=1e-3)
    with pytest.raises(VLMError, match="a bloom decoder cannot keep packed samples apart"):
        model(packed["input_ids"], None, packed["pixel_values"], packed["labels"], packed["position_ids"])
    # The data module refuses it when fitting starts, before any step.
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "Hi?", "answer": "hello"}\n')
    dm = VLMDataModule(train=str(data), pack_tokens=256, num_workers=0)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(vlm=model, processor=processor))
    with pytest.raises(VLMError, match="data.pack_tokens: a bloom decoder"):
        dm.setup("fit")


def test_an_attention_that_would_mix_samples_is_refused():
    model, processor = build_tiny()
    model.decoder.config._attn_implementation = "flash_attention_2"  # finds packed samples only in one-row batches
    packed = Collator(processor, pack_tokens=10_000)(samples_for(processor))
    with pytest.raises(VLMError, match="flash_attention_2 attention cannot keep packed samples apart"):
        model(packed["input_ids"], None, packed["pixel_values"], packed["labels"], packed["position_ids"])


def test_data_module_packs_training_batches_only(tmp_path, tiny):
    _, processor = tiny
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"question": "Is {i} even?", "answer": "{"no " * (i + 1)}"}}\n' for i in range(8)))
    dm = VLMDataModule(train=str(data), val=str(data), batch_size=8, pack_tokens=256, num_workers=0)
    dm.processor = processor
    dm.setup("fit")
    assert dm.describe()["pack_tokens"] == 256
    train = next(iter(dm.train_dataloader()))
    assert train["num_samples"] == 8 and train["input_ids"].shape[0] < 8 and "position_ids" in train
    val = next(iter(dm.val_dataloader()))
    assert val["num_samples"] == 8 and val["input_ids"].shape[0] == 8 and "attention_mask" in val
    with pytest.raises(VLMError, match="data.pack_tokens must be at least 1"):
        VLMDataModule(train=str(data), pack_tokens=0)
