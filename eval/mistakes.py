"""`vlm data preference`: preference pairs from a model's own mistakes on a labelled question set (chosen: the
reference answer, rejected: the model's wrong answer), for `vlm fit-dpo` and `vlm fit-reward`."""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from vlm.answers import vqa_accuracy
from vlm.errors import VLMError
from vlm.files import check_output_file, write_jsonl
from vlm.generation import GenerationOptions
from vlm.inference import Device, DType, items_from_jsonl, run_items


def generate_preference(
    data: str,
    out: str,
    model: str | None = None,
    samples: int = 1,
    temperature: float = 1.0,
    limit: int | None = None,
    batch_size: int = 32,
    device: Device = "auto",
    dtype: DType = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """Build preference pairs from a model's wrong answers to a labelled question set.

    Each question row is answered greedily (and `samples - 1` more times by sampling); every distinct answer with VQA
    accuracy 0 against the row's references becomes a pair: the row's most common reference answer chosen, the
    wrong answer rejected. The row's other fields (e.g. "type") are kept; image paths are written relative to the
    output file's folder.

    Args:
        data: A JSONL file of question rows with answers (e.g. data/shapes/train.jsonl).
        out: The JSONL file of pairs to write.
        model: A vlm checkpoint folder (default: samples/shapes-model/).
        samples: Answers per question: the greedy one, plus samples - 1 sampled at `temperature`.
        temperature: Sampling temperature of the extra answers.
        limit: Read only the first LIMIT rows.
        batch_size: Rows per forward pass.
        device: auto, cpu, cuda or cuda:N.
        dtype: auto, float32, bfloat16 or float16.
        seed: Seed of the sampled answers.
    """
    from vlm.checkpoint import open_model

    if samples < 1:
        raise VLMError("samples must be at least 1")
    check_output_file(out)
    net, processor = open_model(model, device, dtype)
    items = items_from_jsonl(Path(data), processor.caption_prompt, require_target=True, limit=limit)
    rows = [it for it in items if it.error is None and "question" in it.row]
    skipped = len(items) - len(rows)  # broken rows, and rows that are not questions
    wrong: dict[int, list[str]] = {}
    answered = 0
    for k in range(samples):
        gen = GenerationOptions(max_new_tokens=net.config.answer_tokens or None)
        if k > 0:
            gen = GenerationOptions(gen.max_new_tokens, temperature=temperature, seed=seed + k)
        for i, item in enumerate(run_items(rows, net, processor, gen, batch_size)):
            if item.error is not None:
                continue
            answered += k == 0
            refs = item.row["answer"] if isinstance(item.row["answer"], list) else [item.row["answer"]]
            answer = item.prediction.strip()
            if answer and vqa_accuracy(answer, refs) == 0 and answer not in wrong.setdefault(i, []):
                wrong[i].append(answer)
    base = Path(out).resolve().parent
    pairs = []
    for i, answers in sorted(wrong.items()):
        item = rows[i]
        refs = item.row["answer"] if isinstance(item.row["answer"], list) else [item.row["answer"]]
        chosen = Counter(refs).most_common(1)[0][0]
        images = [os.path.relpath(p.resolve(), base) for p in item.images]
        extra = {k: v for k, v in item.row.items() if k not in ("image", "question", "answer")}
        where = {"image": images[0] if len(images) == 1 else images} if images else {}
        pairs += [{**where, "prompt": item.prompt, "chosen": chosen, "rejected": a, **extra} for a in answers]
    if not pairs:
        raise VLMError(f"the model answered none of the {answered} questions of {data} wrongly: no pairs to write")
    write_jsonl(out, pairs)
    print(f"vlm: {len(pairs)} pairs from {len(wrong)} of {answered} questions answered wrongly", file=sys.stderr)
    return {"pairs": len(pairs), "questions": answered, "wrong": len(wrong), "skipped_rows": skipped, "out": out}
