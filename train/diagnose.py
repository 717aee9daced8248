"""`vlm diagnose`: does a model look at the image? Measurements that tell why a training run does or does not learn.

On question rows of a JSONL file, for a checkpoint (or, with `untrained`, the same architecture at random):
- `norms`: mean L2 norm of the image embeddings the projector writes against the text-token embeddings around them.
  The decoder adds everything else to these vectors, so a large mismatch decides which of the two it can move.
- `image_dependence`: the answer loss with each row's own image, and with another row's image (the batch's images
  rolled by one). A model that ignores the image has no gap; `answer_change` is how often the greedy first answer
  token changes when the image does.
- `attention_to_image`: per decoder layer, the share of attention that answer-predicting positions give to image
  tokens (eager attention, averaged over heads).
- `grad_norms`: per part, the gradient norm of the answer loss, and its ratio to the part's weight norm.
- `probe`: can a linear read-out of the image features answer each question? For every question text asked at least
  `min_group` times, a ridge classifier from the flattened features (encoder output, projector output) to the
  answer, fitted on 80% of the images and scored on the rest, beside the majority answer (what a question-only
  model can do). The probe bounds what the decoder can read from frozen features.

Loading or training pays for nothing here but torch and the model; the probe is closed-form least squares.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlm.checkpoint import build, load
from vlm.collate import Collator, encode_sample
from vlm.config import PARTS
from vlm.data import Example, load_row_images, single_image_rows
from vlm.errors import VLMError
from vlm.explain import attention_weights
from vlm.processor import IGNORE_INDEX


def _batches(rows: list[Example], processor, batch_size: int):
    collate = Collator(processor)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        samples = [encode_sample(processor, r.messages, load_row_images(r.images), r.kind, r.references) for r in chunk]
        yield collate(samples)


def _answer_loss(model, batch: dict[str, Any], pixel_values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean answer loss and the greedy prediction at the first answer token of each row."""
    out = model(batch["input_ids"], batch["attention_mask"], pixel_values, batch["labels"])
    counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)  # labelled tokens per row; out.logits has theirs only
    predicted = out.logits.argmax(-1)[counts.cumsum(0) - counts]  # each row's first: its first answer token
    return out.loss, predicted


@torch.no_grad()
def _norms_and_dependence(model, batches: list[dict[str, Any]]) -> dict[str, Any]:
    image_norms, text_norms, own, other, changed, answered = [], [], [], [], 0, 0
    for batch in batches:
        ids = batch["input_ids"]
        image_mask = ids == model.image_token_id
        text_mask = batch["attention_mask"].bool() & ~image_mask
        image_norms.append(model.encode_images(batch["pixel_values"]).norm(dim=-1).flatten())
        text_norms.append(model.decoder.get_input_embeddings()(ids)[text_mask].norm(dim=-1))
        loss, pred = _answer_loss(model, batch, batch["pixel_values"])
        rolled_loss, rolled_pred = _answer_loss(model, batch, batch["pixel_values"].roll(1, dims=0))
        own.append(float(loss))
        other.append(float(rolled_loss))
        changed += int((pred != rolled_pred).sum())
        answered += len(pred)
    image, text = torch.cat(image_norms).mean().item(), torch.cat(text_norms).mean().item()
    return {
        "norms": {"image_tokens": round(image, 4), "text_tokens": round(text, 4), "ratio": round(image / text, 2)},
        "image_dependence": {
            "loss_own_image": round(sum(own) / len(own), 4),
            "loss_other_image": round(sum(other) / len(other), 4),
            "answer_change": round(changed / answered, 4),
        },
    }


def _attention_to_image(model, batch: dict[str, Any]) -> list[float]:
    mask = batch["attention_mask"]
    layers = attention_weights(model, batch["input_ids"], mask, batch["pixel_values"])
    # Positions whose next token is an answer token: they are the ones that produce the answer.
    asking = torch.zeros_like(mask, dtype=torch.bool)
    asking[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
    image = (batch["input_ids"] == model.image_token_id).float()  # (B, T)
    shares = []
    for attn in layers:  # (B, heads, T, T)
        to_image = (attn.mean(1) * image[:, None, :]).sum(-1)  # (B, T): each query's attention on image tokens
        shares.append(round(float(to_image[asking].mean()), 4))
    return shares


def _grad_norms(model, batch: dict[str, Any]) -> dict[str, dict[str, float]]:
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for p in model.parameters():
            p.requires_grad_(True)
        model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"]).loss.backward()
    out = {}
    for part in PARTS:
        params = [p for p in getattr(model, part).parameters() if p.grad is not None]
        grad = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params))
        weight = torch.sqrt(sum((p.detach().float() ** 2).sum() for p in params))
        out[part] = {"grad_norm": round(float(grad), 6), "grad_to_weight": round(float(grad / weight), 8)}
    model.zero_grad(set_to_none=True)
    return out


def _ridge_accuracy(x_fit: Tensor, y_fit: Tensor, x_test: Tensor, y_test: Tensor, classes: int) -> float:
    """Accuracy of a ridge classifier (one-hot least squares); the penalty is chosen on a held-out fifth of the
    fitting rows, then the classifier is refitted on all of them."""
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
    x_fit, x_test = (x_fit - mean) / std, (x_test - mean) / std
    x_fit, x_test = torch.cat([x_fit, torch.ones(len(x_fit), 1)], 1), torch.cat([x_test, torch.ones(len(x_test), 1)], 1)

    def fit(x: Tensor, y: Tensor, penalty: float) -> Tensor:
        """Weights (features, classes); solved in the smaller of the primal and the dual form."""
        targets = torch.nn.functional.one_hot(y, classes).to(x.dtype)
        if x.shape[0] < x.shape[1]:
            return x.T @ torch.linalg.solve(x @ x.T + penalty * torch.eye(x.shape[0], dtype=x.dtype), targets)
        return torch.linalg.solve(x.T @ x + penalty * torch.eye(x.shape[1], dtype=x.dtype), x.T @ targets)

    cut = max(1, len(x_fit) // 5)
    penalties = [0.1, 1.0, 10.0, 100.0, 1000.0]
    scores = [
        float((x_fit[:cut] @ fit(x_fit[cut:], y_fit[cut:], lam)).argmax(1).eq(y_fit[:cut]).float().mean())
        for lam in penalties
    ]
    best = penalties[max(range(len(penalties)), key=scores.__getitem__)]
    return float((x_test @ fit(x_fit, y_fit, best)).argmax(1).eq(y_test).float().mean())


@torch.no_grad()
def _probe(model, processor, rows: list[Example], min_group: int, seed: int) -> dict[str, Any]:
    images = sorted({r.images[0] for r in rows})
    index = {p: i for i, p in enumerate(images)}
    enc, proj = [], []
    for start in range(0, len(images), 64):
        pixels = processor.transform(load_row_images(images[start : start + 64]))
        feats = model.encoder(pixels)
        enc.append(feats.flatten(1))
        proj.append(model.projector(feats).flatten(1))
    features = {"encoder": torch.cat(enc).double(), "projector": torch.cat(proj).double()}
    order = list(range(len(images)))
    random.Random(seed).shuffle(order)
    held_out = set(order[: len(images) // 5])
    groups: dict[str, list[Example]] = defaultdict(list)
    for r in rows:
        groups[r.prompt.strip().lower()].append(r)
    totals: dict[str, float] = Counter()
    by_type: dict[str, Counter] = defaultdict(Counter)
    for group in groups.values():
        fit_rows = [r for r in group if index[r.images[0]] not in held_out]
        test_rows = [r for r in group if index[r.images[0]] in held_out]
        if len(group) < min_group or not fit_rows or not test_rows:
            continue
        answers = sorted({r.references[0] for r in group})
        label = {a: k for k, a in enumerate(answers)}
        y_fit = torch.tensor([label[r.references[0]] for r in fit_rows])
        y_test = torch.tensor([label[r.references[0]] for r in test_rows])
        majority = Counter(y_fit.tolist()).most_common(1)[0][0]
        kind = str(group[0].row.get("subtype", group[0].row.get("type", "all")))
        scores = {"majority": float((y_test == majority).float().mean())}
        for name, x in features.items():
            rows_fit = x[[index[r.images[0]] for r in fit_rows]]
            rows_test = x[[index[r.images[0]] for r in test_rows]]
            scores[name] = _ridge_accuracy(rows_fit, y_fit, rows_test, y_test, len(answers))
        for name, score in scores.items():
            for counter in (totals, by_type[kind]):
                counter[name] += score * len(test_rows)
        totals["rows"] += len(test_rows)
        by_type[kind]["rows"] += len(test_rows)
    if not totals["rows"]:
        raise VLMError(f"no question is asked at least {min_group} times: nothing to probe (lower --min_group)")

    def mean(counter: Counter) -> dict[str, float]:
        return {k: round(v / counter["rows"], 4) for k, v in counter.items() if k != "rows"} | {"rows": counter["rows"]}

    return {"all": mean(totals), **{k: mean(v) for k, v in sorted(by_type.items())}}


def diagnose(
    data: str,
    model: str | None = None,
    untrained: bool = False,
    rows: int = 256,
    probe_rows: int = 0,
    min_group: int = 50,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure whether a model reads the image: embedding norms, image dependence of the answers, attention to image
    tokens, gradient norms per part, and linear probes of the image features (see `train/diagnose.py`).

    Args:
        data: A JSONL file with single-image question rows (the probe wants many rows per question text).
        model: A vlm checkpoint folder (default: the default model).
        untrained: Measure the model's architecture with fresh random weights instead of its trained ones.
        rows: Question rows for the norm, dependence, attention and gradient measurements.
        probe_rows: Question rows for the linear probes (0: no probe).
        min_group: Probe only questions asked at least this many times.
        batch_size: Rows per batch.
        seed: Seed for the random weights (`untrained`) and the probe's split of the images.
    """
    from vlm.checkpoint import DEFAULT_MODEL_DIR

    torch.manual_seed(seed)
    path = Path(model) if model else DEFAULT_MODEL_DIR
    vlm, processor = load(path)
    if untrained:
        vlm, processor = build(vlm.config, pretrained=False)
        vlm.eval()
    sample = single_image_rows(data, "vqa", limit=rows, caption_prompt=processor.caption_prompt)[0]
    batches = list(_batches(sample, processor, batch_size))
    report: dict[str, Any] = {"model": str(path), "untrained": untrained, "rows": len(sample)}
    report |= _norms_and_dependence(vlm, batches)
    report["attention_to_image"] = _attention_to_image(vlm, batches[0])
    report["grad_norms"] = _grad_norms(vlm, batches[0])
    if probe_rows > 0:
        probe_set = single_image_rows(data, "vqa", limit=probe_rows, caption_prompt=processor.caption_prompt)[0]
        report["probe"] = _probe(vlm, processor, probe_set, min_group, seed)
    return report
