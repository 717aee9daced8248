"""Samples -> padded training batches. The labels come from `Processor.encode` (assistant turns only), so the loss
covers exactly the answer tokens: never the prompt, the image tokens or the padding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

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
) -> dict[str, Any]:
    """One conversation and its RGB images -> token ids, labels and pixels; raises `VLMError` for unusable rows.

    With `with_prompt`, question rows also carry the generation prompt (everything before the answer) and the
    reference answers, for generation-based accuracy during validation.
    """
    ids, labels = processor.encode(messages, len(images))
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


def _cat(pixels: list[Tensor | None]) -> Tensor | None:
    present = [p for p in pixels if p is not None]
    return torch.cat(present) if present else None


class Collator:
    """Right-pads samples into a batch: `input_ids`, `attention_mask`, `labels`, `pixel_values` (every image of
    the batch in order, or None), `num_tokens` (real tokens, for throughput), `bad` (the `(key, message)` of every
    broken row replaced while building the batch, so the main process can count rows found broken in workers).

    Question rows chosen for generation add `generate`: a left-padded prompt batch with its `pixel_values` and
    `references`. Streaming batches add `stream_position` (worker id, rows that worker has read), for resuming.
    """

    def __init__(self, processor: Processor):
        self.processor = processor

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = self.processor.pad(
            [s["input_ids"] for s in samples], "right", [s["labels"] for s in samples]
        )
        batch["pixel_values"] = _cat([s["pixel_values"] for s in samples])
        batch["num_tokens"] = sum(len(s["input_ids"]) for s in samples)
        batch["bad"] = [b for s in samples for b in s["bad"]]
        prompted = [s for s in samples if "prompt_ids" in s]
        if prompted:
            gen = self.processor.pad([s["prompt_ids"] for s in prompted], "left")
            gen["pixel_values"] = _cat([s["pixel_values"] for s in prompted])
            gen["references"] = [s["references"] for s in prompted]
            batch["generate"] = gen
        if "stream_position" in samples[-1]:
            batch["stream_position"] = samples[-1]["stream_position"]
        return batch
