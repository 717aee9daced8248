"""Batch inference (`vlm.inference.run_items`): rows batched by prompt length, answered as if alone, in input order."""

from __future__ import annotations

import vlm.inference as inference
from vlm.generation import GenerationOptions, generate_texts
from vlm.inference import Item, length_batches, run_items


def padding(lengths: list[int], batches: list[list[int]]) -> int:
    """Pad tokens a run of these batches adds: each prompt padded to its batch's longest."""
    return sum(max(lengths[i] for i in b) - lengths[i] for b in batches for i in b)


def test_length_batches_cover_every_row_once_and_cut_padding():
    lengths = [5, 40, 6, 41, 5, 39, 7, 40, 6]
    in_order = [[0, 1], [2, 3], [4, 5], [6, 7], [8]]
    batches = length_batches(lengths, 2)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [len(b) for b in batches] == [2, 2, 2, 2, 1]
    assert padding(lengths, batches) == 32 < padding(lengths, in_order) == 137
    assert length_batches([3, 3, 3], 2) == [[0, 1], [2]]  # equal lengths keep the input order


def test_run_items_answers_sorted_batches_as_if_alone_in_input_order(tiny, pil_images, tmp_path, monkeypatch):
    model, processor = tiny
    image = tmp_path / "red.png"
    pil_images[0].save(image)
    short, long = "What colour?", "Describe the colours, shapes and positions of everything in this picture in detail."
    prompts = [short, long, "Is it red?", long + " Please.", short, long + " Now.", "Why?", long, "Shape?"]
    items = [Item({"id": i}, [image] if i % 3 else [], p) for i, p in enumerate(prompts)]
    items.insert(4, Item({"id": "broken"}, [], "", error="line 5: not JSON"))  # passes through unanswered
    options = GenerationOptions(max_new_tokens=5)
    alone = [
        generate_texts(model, processor, [it.prompt], [[pil_images[0]] if it.images else []], options)[0]
        if it.error is None
        else None
        for it in items
    ]
    pads: list[int] = []  # each answered batch's pad tokens

    def pad_tokens(prompts: list[str], images: list[list]) -> int:
        return int((processor(prompts, images)["attention_mask"] == 0).sum())

    def recording(model, processor, prompts, images, *args, **kwargs):
        pads.append(pad_tokens(prompts, images))
        return generate_texts(model, processor, prompts, images, *args, **kwargs)

    monkeypatch.setattr(inference, "generate_texts", recording)
    monkeypatch.setattr(inference, "SORT_WINDOW", 2)  # windows of 2 batches: 4, 4 and 2 items
    out = list(run_items(items, model, processor, options, batch_size=2))

    assert [it.row["id"] for it in out] == [0, 1, 2, 3, "broken", 4, 5, 6, 7, 8]
    assert [it.prediction for it in out] == alone
    assert len(set(alone) - {None}) > 2  # answers depend on the prompt, so a mix-up would show
    assert out[4].error == "line 5: not JSON"
    # Fewer pad tokens than batches taken in input order.
    in_order = 0
    for start in range(0, len(items), 2):
        good = [it for it in items[start : start + 2] if it.error is None]
        in_order += pad_tokens([it.prompt for it in good], [[pil_images[0]] * len(it.images) for it in good])
    print(f"pad tokens: {sum(pads)} batched by length, {in_order} in input order")
    assert sum(pads) < in_order
