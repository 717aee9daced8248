"""Reward models: a vlm model with a scalar head, scoring how good an answer is to a prompt about images.

The head reads the decoder's last hidden state at the answer's last token (the end-of-turn token), as InstructGPT's
reward model does. Trained on preference pairs with the Bradley-Terry loss (`vlm fit-reward`, `train/preference.py`);
saved as a vlm checkpoint folder plus the head (`reward_head.safetensors`), so the folder is also a model that
`vlm ask` loads. `vlm reward` scores a JSONL file: preference pairs (reporting how often the chosen answer scores
higher) or question rows with an answer.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from vlm.checkpoint import load
from vlm.errors import VLMError
from vlm.files import check_output_file, write_jsonl
from vlm.model import VisionLanguageModel
from vlm.processor import Processor

HEAD_FILE = "reward_head.safetensors"


def new_head(vlm: VisionLanguageModel) -> nn.Linear:
    """A fresh scalar head for `vlm`: small weights and a zero bias, so every answer starts near score 0."""
    width = vlm.decoder.get_input_embeddings().embedding_dim
    head = nn.Linear(width, 1)
    nn.init.normal_(head.weight, std=1 / width**0.5)
    nn.init.zeros_(head.bias)
    return head


def last_token_scores(
    vlm: VisionLanguageModel, head: nn.Linear, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None
) -> Tensor:
    """Scores (B,) of right-padded (prompt + answer) rows: `head` at each row's last real token."""
    hidden = vlm(input_ids, attention_mask, pixel_values, output_hidden_states=True).hidden_states
    last = attention_mask.sum(dim=1) - 1  # (B,)
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, D)
    return head(picked.to(head.weight.dtype)).squeeze(-1)


class RewardModel(nn.Module):
    """`vlm` (a `VisionLanguageModel`) and `head`, a linear map of its last hidden state to one score."""

    def __init__(self, vlm: VisionLanguageModel, head: nn.Linear | None = None):
        super().__init__()
        self.vlm = vlm
        self.head = head if head is not None else new_head(vlm)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None = None) -> Tensor:
        return last_token_scores(self.vlm, self.head, input_ids, attention_mask, pixel_values)

    @torch.no_grad()
    def score(
        self,
        processor: Processor,
        prompts: list[str],
        answers: list[str],
        images: list[list[Any]],
        batch_size: int = 16,
    ) -> list[float]:
        """The score of each (prompt, answer, images), `batch_size` at a time (images as RGB PIL images)."""
        device = next(self.parameters()).device
        out: list[float] = []
        for start in range(0, len(prompts), batch_size):
            ids = []
            for prompt, answer, imgs in zip(*(x[start : start + batch_size] for x in (prompts, answers, images))):
                messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
                ids.append(processor.encode(messages, len(imgs))[0])
            batch = processor.pad(ids, "right")
            flat = [img for imgs in images[start : start + batch_size] for img in imgs]
            pixels = processor.transform(flat).to(device) if flat else None
            scores = self(batch["input_ids"].to(device), batch["attention_mask"].to(device), pixels)
            out += scores.float().tolist()
        return out


def save_head(state: dict[str, Tensor], folder: Path) -> None:
    """Writes a head's weights (`weight`, `bias`) into a checkpoint folder."""
    save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, str(folder / HEAD_FILE))


def load_reward_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[RewardModel, Processor]:
    """A reward model folder's model (eval mode) and processor."""
    if not (Path(path) / HEAD_FILE).is_file():
        raise VLMError(f"not a reward model (no {HEAD_FILE}; train one with vlm fit-reward): {path}")
    vlm, processor = load(path)
    weights = load_file(str(Path(path) / HEAD_FILE))
    if set(weights) != {"weight", "bias"} or weights["weight"].shape[0] != 1:
        raise VLMError(f"{Path(path) / HEAD_FILE} is not a reward head (one row of weights and a bias)")
    head = nn.Linear(weights["weight"].shape[1], 1)
    try:
        head.load_state_dict(weights)
    except RuntimeError as e:
        raise VLMError(f"{Path(path) / HEAD_FILE} does not fit the model: {str(e).splitlines()[-1].strip()}") from None
    return RewardModel(vlm, head).to(device).eval(), processor


def reward(
    data: str,
    model: str,
    output: str | None = None,
    batch_size: int = 16,
    device: str = "auto",
) -> dict[str, Any]:
    """Score a JSONL file with a reward model: preference pairs (`prompt`, `chosen`, `rejected`: how often the chosen
    answer scores higher) or question rows with an `answer` (each answer's score).

    Args:
        data: The JSONL file. Broken rows are counted and reported; a file with no usable row is an error.
        model: A reward model folder (`vlm fit-reward` writes one as `<run>/model`).
        output: Write the rows with their scores here (`chosen_score`/`rejected_score`, or `score`).
        batch_size: Rows scored at a time.
        device: auto, cpu, cuda or cuda:N.
    """
    from vlm.checkpoint import resolve_device
    from vlm.data import RowError, json_lines, load_row_images, read_jsonl, read_pairs

    if output is not None:
        check_output_file(output)
    net, processor = load_reward_model(model, resolve_device(device))
    first = next((line.value for line in json_lines(data) if isinstance(line.value, dict)), {})
    pairs = "chosen" in first or "rejected" in first
    rows = list(read_pairs(data) if pairs else read_jsonl(data, processor.caption_prompt))
    broken = [r for r in rows if isinstance(r, RowError)]
    good = [r for r in rows if not isinstance(r, RowError)]
    if not pairs:
        broken += [RowError("not a question row with an answer", r.line) for r in good if r.kind != "vqa"]
        good = [r for r in good if r.kind == "vqa"]
    usable, images = [], []
    for r in good:
        try:
            images.append(load_row_images(r.images))
            usable.append(r)
        except VLMError as e:
            broken.append(RowError(str(e), r.line))
    good = usable
    if not good:
        first_error = f"; e.g. {broken[0]}" if broken else ""
        raise VLMError(f"no usable rows in {data}{first_error}")
    if pairs:
        prompts = [r.prompt for r in good]
        chosen = net.score(processor, prompts, [r.chosen for r in good], images, batch_size)
        rejected = net.score(processor, prompts, [r.rejected for r in good], images, batch_size)
        out_rows = [{**r.row, "chosen_score": c, "rejected_score": j} for r, c, j in zip(good, chosen, rejected)]
        summary = {"pairs": len(good), "accuracy": sum(c > j for c, j in zip(chosen, rejected)) / len(good)}
        summary["mean_margin"] = sum(c - j for c, j in zip(chosen, rejected)) / len(good)
    else:
        scores = net.score(processor, [r.prompt for r in good], [r.messages[-1]["content"] for r in good], images)
        out_rows = [{**r.row, "score": s} for r, s in zip(good, scores)]
        summary = {"rows": len(good), "mean_score": sum(scores) / len(scores)}
    summary["broken_rows"] = len(broken)
    for error in broken[:3]:
        print(f"vlm: skipped {data}: {error}", file=sys.stderr)
    if output is not None:
        write_jsonl(output, out_rows)
        summary["output"] = output
    return summary
