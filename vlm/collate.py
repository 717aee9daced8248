"""Samples -> training batches, padded or packed. The labels come from `Processor.encode` (assistant turns only), so
the loss covers exactly the answer tokens: never the prompt, the image tokens or the padding.

Padding gives every sample a row as long as the batch's longest sample. Packing puts several samples one after
another in a row (first-fit decreasing), with `position_ids` restarting at 0 at each sample; the model keeps
attention inside each sample (see `vlm.model`), so a packed batch gives each sample the same logits and the batch
the same loss as padding it would, on fewer rows.

Independent turns (`encode_sample(..., independent_turns=True)`) train each answer of a conversation as a
one-question sample of its own, and put all of them in one row: the tokens they share at the start (the image, the
turn's opening) once, then each turn's own tokens, every turn attending to the shared start and to itself only (a
tree-shaped attention mask, `tree_mask`), with the positions it would have alone. Each answer gets exactly the
logits it would get as a separate sample, no turn can read another's answer, and the image is encoded once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vlm.data import has_placeholders
from vlm.errors import VLMError
from vlm.processor import IGNORE_INDEX, Processor


def encode_sample(
    processor: Processor,
    messages: list[dict[str, str]],
    images: list,
    kind: str,
    references: list[str],
    max_length: int | None = None,
    with_prompt: bool = False,
    independent_turns: bool = False,
) -> dict[str, Any]:
    """One conversation and its RGB images -> token ids, labels and pixels; raises `VLMError` for unusable rows.

    With `with_prompt`, question rows also carry the generation prompt (everything before the answer) and the
    reference answers, for generation-based accuracy during validation. With `independent_turns`, a conversation of
    several answers becomes a tree of one-question samples sharing their start (see the module's docstring).
    """
    turns = split_turns(messages) if independent_turns else []
    if len(turns) > 1:
        return _encode_turns(processor, turns, images, kind, max_length)
    ids, labels = processor.encode(messages, len(images), placeholders=has_placeholders(kind))
    if max_length is not None and len(ids) > max_length:
        raise VLMError(f"the row is {len(ids)} tokens, longer than data.max_length={max_length}")
    if all(label == IGNORE_INDEX for label in labels):
        raise VLMError("the row has no answer tokens to learn from")
    sample: dict[str, Any] = {
        "input_ids": ids,
        "labels": labels,
        "pixel_values": processor.transform(images) if images else None,
        "bad": [],
    }
    if with_prompt and kind == "vqa":
        sample["prompt_ids"] = processor.encode(messages[:-1], len(images), add_generation_prompt=True)[0]
        sample["references"] = references
    return sample


def split_turns(messages: list[dict[str, str]]) -> list[list[dict[str, str]]]:
    """A conversation -> one conversation per answer: the leading system messages, the question, the answer."""
    system = []
    for m in messages:
        if m["role"] != "system":
            break
        system.append(m)
    turns = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            if i == 0 or messages[i - 1]["role"] != "user":
                raise VLMError("data.independent_turns needs every answer to follow a question (user, then assistant)")
            turns.append([*system, messages[i - 1], m])
    return turns


def _encode_turns(
    processor: Processor, turns: list[list[dict[str, str]]], images: list, kind: str, max_length: int | None
) -> dict[str, Any]:
    """Each turn encoded alone, then merged into one row: the longest start all turns share (up to the first answer
    token), then each turn's rest. `segments` gives the shared length and each rest's length."""
    if has_placeholders(kind) and any(processor.image_token in m["content"] for t in turns for m in t):
        raise VLMError(
            f"data.independent_turns cannot split a conversation that places images with {processor.image_token}"
        )
    encoded = [processor.encode(t, len(images)) for t in turns]
    shared = min(labels.index(next(x for x in labels if x != IGNORE_INDEX)) for _, labels in encoded)
    first = encoded[0][0]
    for ids, _ in encoded[1:]:
        shared = next((j for j in range(shared) if ids[j] != first[j]), shared)
    ids = first[:shared] + [t for e, _ in encoded for t in e[shared:]]
    labels = encoded[0][1][:shared] + [t for _, lab in encoded for t in lab[shared:]]
    if max_length is not None and max(len(e) for e, _ in encoded) > max_length:
        raise VLMError(f"a turn of the row is longer than data.max_length={max_length} tokens")
    pixels = processor.transform(images) if images else None
    if pixels is not None:  # images the shared start holds are encoded once; the others once per turn
        in_shared = first[:shared].count(processor.image_token_id) // processor.num_image_tokens
        pixels = torch.cat([pixels[:in_shared]] + [pixels[in_shared:]] * len(encoded))
    return {
        "input_ids": ids,
        "labels": labels,
        "pixel_values": pixels,
        "segments": (shared, [len(e) - shared for e, _ in encoded]),
        "bad": [],
    }


def tree_mask(segments: list[tuple[int, list[int]]], width: int) -> tuple[Tensor, Tensor]:
    """Rows of (shared length, turn lengths) -> `position_ids` (B, width) and a boolean attention mask
    (B, 1, width, width), True where a query may attend: causal, and a turn sees the shared start and itself only.
    Padding (position 0) attends to itself."""
    positions = torch.zeros((len(segments), width), dtype=torch.long)
    owner = torch.full((len(segments), width), -1, dtype=torch.long)  # 0: shared start, k: turn k, -1: padding
    for r, (shared, lengths) in enumerate(segments):
        positions[r, :shared] = torch.arange(shared)
        owner[r, :shared] = 0
        start = shared
        for k, n in enumerate(lengths, 1):
            positions[r, start : start + n] = torch.arange(shared, shared + n)
            owner[r, start : start + n] = k
            start += n
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    query, key = owner.unsqueeze(2), owner.unsqueeze(1)
    allowed = causal & (key != -1) & (query != -1) & ((key == 0) | (key == query))
    allowed |= torch.eye(width, dtype=torch.bool)  # no row without a key: padding sees itself
    return positions, allowed.unsqueeze(1)


def _cat(pixels: list[Tensor | None]) -> Tensor | None:
    present = [p for p in pixels if p is not None]
    return torch.cat(present) if present else None


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices grouped into rows of at most `capacity` tokens by first-fit decreasing: longest sample first,
    each into the first row with room. A sample longer than `capacity` gets a row of its own. Within a row the
    samples keep their given order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if fits is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[fits].append(i)
            room[fits] -= lengths[i]
    return [sorted(row) for row in rows]


class Collator:
    """Samples -> a batch: `input_ids`, `labels`, `pixel_values` (every image of the batch in the order the rows
    hold them, or None), `num_tokens` (real tokens, for throughput), `num_samples`, `bad` (the `(key, message)` of
    every broken row replaced while building the batch, so the main process can count rows found broken in workers).

    By default each sample is right-padded to a row of its own, with an `attention_mask`. With `pack_tokens`, samples
    are packed into rows of at most that many tokens (see `pack_rows`), with `position_ids` (0, 1, ... per sample; 0
    for each padding token, which so forms a one-token sample of its own) instead of an attention mask, and `spans`:
    the `(row, start, end)` of each sample, in the given order. Rows are as long as the longest one.

    Question rows chosen for generation add `generate`: a left-padded prompt batch with its `pixel_values` and
    `references` (and `rollouts`, what rewards read of each row, when the rows carry it). Streaming batches add
    `stream_position` (worker id, rows that worker has read), for resuming.
    """

    def __init__(self, processor: Processor, pack_tokens: int | None = None):
        if pack_tokens is not None and pack_tokens < 1:
            raise VLMError("data.pack_tokens must be at least 1")
        self.processor, self.pack_tokens = processor, pack_tokens

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self._pad(samples) if self.pack_tokens is None else self._pack(samples)
        batch["num_tokens"] = sum(len(s["input_ids"]) for s in samples)
        batch["num_samples"] = len(samples)
        batch["bad"] = [b for s in samples for b in s["bad"]]
        prompted = [s for s in samples if "prompt_ids" in s]
        if prompted:
            gen = self.processor.pad([s["prompt_ids"] for s in prompted], "left")
            gen["pixel_values"] = _cat([s["pixel_values"] for s in prompted])
            gen["references"] = [s["references"] for s in prompted]
            if "rollout" in prompted[0]:
                gen["rollouts"] = [s["rollout"] for s in prompted]
            batch["generate"] = gen
        if "stream_position" in samples[-1]:
            batch["stream_position"] = samples[-1]["stream_position"]
        return batch

    def _pad(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.processor.pad([s["input_ids"] for s in samples], "right", [s["labels"] for s in samples])
        batch["pixel_values"] = _cat([s["pixel_values"] for s in samples])
        if any("segments" in s for s in samples):  # independent turns: a tree mask instead of the padding mask
            segments = [s.get("segments", (len(s["input_ids"]), [])) for s in samples]
            batch["position_ids"], batch["attention_mask"] = tree_mask(segments, batch["input_ids"].shape[1])
        return batch

    def _pack(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        lengths = [len(s["input_ids"]) for s in samples]
        rows = pack_rows(lengths, self.pack_tokens)
        width = max(sum(lengths[i] for i in row) for row in rows)
        ids = torch.full((len(rows), width), self.processor.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        spans: list[tuple[int, int, int]] = [(0, 0, 0)] * len(samples)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                end = start + lengths[i]
                ids[r, start:end] = torch.tensor(samples[i]["input_ids"], dtype=torch.long)
                labels[r, start:end] = torch.tensor(samples[i]["labels"], dtype=torch.long)
                positions[r, start:end] = torch.arange(lengths[i])
                spans[i] = (r, start, end)
                start = end
        # Images in the order the rows hold their image tokens (row by row, sample by sample): `embed` fills them so.
        pixels = _cat([samples[i]["pixel_values"] for row in rows for i in row])
        return {"input_ids": ids, "position_ids": positions, "labels": labels, "pixel_values": pixels, "spans": spans}


class PairCollator:
    """Preference pairs -> one right-padded batch of 2B rows, the B chosen conversations then the B rejected ones,
    with `pixel_values` for both halves (each pair's images twice), `index` (B: each pair's row in its file),
    `num_samples` (B pairs), `num_tokens` and `bad` as `Collator` gives them."""

    def __init__(self, processor: Processor):
        self.processor = processor

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [s["chosen_ids"] for s in samples] + [s["rejected_ids"] for s in samples]
        labels = [s["chosen_labels"] for s in samples] + [s["rejected_labels"] for s in samples]
        batch = self.processor.pad(ids, "right", labels)
        pixels = _cat([s["pixel_values"] for s in samples])
        batch["pixel_values"] = torch.cat([pixels, pixels]) if pixels is not None else None
        batch["num_tokens"] = sum(len(i) for i in ids)
        batch["index"] = torch.tensor([s["index"] for s in samples])
        batch["num_samples"] = len(samples)
        batch["bad"] = [b for s in samples for b in s["bad"]]
        return batch
