"""Batch inference: files, folders and JSONL rows turned into items, answered `batch_size` at a time.

The inference commands (`vlm caption`, `vlm ask`), `vlm eval` and the lmms-eval adapter all run their rows through
`run_items`; a bad row becomes an item with an error and the run goes on. Rows are batched by prompt length, so a
batch pads its prompts to about the same length, and come out in input order.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlm.errors import VLMError
from vlm.generation import GenerationOptions, generate_texts

# Rows are sorted by prompt length within windows of this many batches: most of the padding that sorting a whole run
# would save, while results still come out (and are written) every window rather than only at the end.
SORT_WINDOW = 16

Device = str  # auto, cpu, cuda or cuda:N: any name of a device this machine has (`vlm.checkpoint.resolve_device`)
DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class Item:
    """One unit of a batch run: the row to write out, the images to read, the prompt to answer."""

    row: dict[str, Any]
    images: list[Path]
    prompt: str
    error: str | None = None
    prediction: str | None = None
    pixels: list = field(default_factory=list)
    line: int | None = None  # the JSONL line it came from
    # Where the images come from when they are not files (e.g. a datasets row): called when its batch is run,
    # so a large in-memory dataset is decoded batch by batch; raises VLMError for a bad image.
    source: Callable[[], list] | None = None
    placeholders: bool = False  # `<image>` in the prompt marks the images (a data file's conversation), not text

    def result(self) -> dict[str, Any]:
        """The row as written out: its own fields, "prediction" (null for a failed item) and "error" if it failed."""
        row = {**self.row, "prediction": self.prediction if self.error is None else None}
        if self.error is not None:
            row["error"] = self.error
        return row


def items_from_inputs(inputs: list[str], caption_prompt: str) -> tuple[list[Item], bool]:
    """Expands image files, folders of images and JSONL files into items; says whether it was one image."""
    from vlm.files import check_name_lengths
    from vlm.images import list_images

    items: list[Item] = []
    for name in inputs:
        path = check_name_lengths(name, "input")
        if path.is_dir():
            found = list_images(path)
            if not found:
                raise VLMError(f"no images found in folder: {path}")
            items += [Item({"image": str(p)}, [p], caption_prompt) for p in found]
        elif path.suffix == ".jsonl":
            items += items_from_jsonl(path, caption_prompt)
        else:
            items.append(Item({"image": name}, [path], caption_prompt))
    single = len(inputs) == 1 and len(items) == 1 and not Path(inputs[0]).is_dir() and not inputs[0].endswith(".jsonl")
    return items, single


def items_from_jsonl(
    path: Path, caption_prompt: str, require_target: bool = False, limit: int | None = None
) -> list[Item]:
    """The first `limit` rows of a JSONL file (question rows for `ask`, image rows for `caption`, scored rows for
    `vlm eval` with `require_target`); broken rows become error items, keeping the row's own fields (e.g. an id)
    where the line was a JSON object, so outputs join back."""
    from vlm.data import RowError, read_jsonl

    items = []
    for ex in read_jsonl(path, caption_prompt, require_target=require_target):
        if limit is not None and len(items) >= limit:
            break
        if isinstance(ex, RowError):
            row = ex.row if isinstance(ex.row, dict) else {"line": ex.line}
            items.append(Item(row, [], "", error=str(ex), line=ex.line))
        else:
            items.append(Item(ex.row, ex.images, ex.prompt, line=ex.line, placeholders=ex.placeholders))
    return items


def _load_pixels(item: Item) -> None:
    from vlm.images import load_image

    try:
        item.pixels = item.source() if item.source is not None else [load_image(p) for p in item.images]
    except VLMError as e:
        item.error = str(e)


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches of indices into `lengths` (prompt lengths in tokens), shortest first, ties in input order. A batch pads
    each prompt to its longest, so neighbours in length waste the least."""
    ordered = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def _prompt_length(processor, item: Item) -> int:
    """Tokens of the item's prompt with its images (those of a `source` are not counted: reading them waits for the
    item's batch); 0 for an item that will not be answered, or whose prompt fails (answering reports why)."""
    if item.error is not None:
        return 0
    try:
        return len(processor.prompt(item.prompt, len(item.images), placeholders=item.placeholders))
    except VLMError:
        return 0


def run_items(
    items: list[Item], model, processor, gen: GenerationOptions, batch_size: int, stream: bool = False
) -> Iterator[Item]:
    """Answers items `batch_size` at a time and yields them in input order; a bad item gets an error and the run goes
    on. Within each window of `SORT_WINDOW` batches, items are batched by prompt length (`length_batches`), and the
    window's items are yielded once all of its batches are done.

    Each item is yielded with `prediction` or `error` set; its images are released once its batch is done.
    """
    from tqdm import tqdm

    from vlm.images import max_pixels

    if batch_size < 1:
        raise VLMError("batch_size must be at least 1")
    max_pixels()  # a bad VLM_MAX_IMAGE_PIXELS is one error for the run, not one for every item
    bar = tqdm(total=len(items), unit="item", disable=len(items) < 2 or None, file=sys.stderr)
    span = SORT_WINDOW * batch_size
    for start in range(0, len(items), span):
        window = items[start : start + span]
        for indices in length_batches([_prompt_length(processor, it) for it in window], batch_size):
            batch = [window[i] for i in indices]
            for item in batch:
                if item.error is None:
                    _load_pixels(item)
            good = [it for it in batch if it.error is None]
            try:
                _answer(good, model, processor, gen, stream)
            except VLMError:  # e.g. one over-long prompt: find it by answering one at a time
                for it in good:
                    try:
                        _answer([it], model, processor, gen, stream)
                    except VLMError as e:
                        it.error = str(e)
            bar.update(len(batch))
            for it in batch:
                it.pixels = []  # keeps memory flat over a long run
        yield from window
    bar.close()


def _answer(items: list[Item], model, processor, gen: GenerationOptions, stream: bool) -> None:
    if not items:
        return
    prompts, pixels = [it.prompt for it in items], [it.pixels for it in items]
    placeholders = [it.placeholders for it in items]
    answers = generate_texts(model, processor, prompts, pixels, gen, stream=stream, placeholders=placeholders)
    for it, answer in zip(items, answers):
        it.prediction = answer
