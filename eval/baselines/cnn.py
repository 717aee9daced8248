"""`vlm baselines`: what a VLM must beat on a VQA set before "the model uses the image" is a claim.

Two reference points, scored exactly as `vlm eval` scores a model (`vlm.eval.metrics.score`: VQA accuracy and exact
match, overall, per row "type" and per "subtype"):

* **question only**: each test question gets the most common training answer to the same question (words
  lower-cased, punctuation ignored), else the most common training answer overall. The best a model that ignores
  the image can do on data whose questions repeat.
* **small CNN**: four 3x3 stride-2 convolutions (BatchNorm, ReLU) on the resized image, their final grid flattened
  (not pooled, so positions survive), concatenated with a bag of words of the question and fed to an MLP that picks
  one of the training answers. Trained from scratch on the CPU in seconds to minutes: a model that reads the image,
  with no language model at all (the CNN+BoW baseline of CLEVR, Johnson et al. 2017; CNN+MLP in Santoro et al.
  2017 on Sort-of-CLEVR).

Only single-image question rows are used; caption, conversation, multi-image and broken rows are counted and left
out. Images are resized (squashed, not cropped, so nothing near an edge is lost) and loaded once, one copy per file.
"""

from __future__ import annotations

import re
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlm.errors import VLMError

_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    """A question's words: lower-cased, punctuation dropped."""
    return _WORD.findall(text.lower())


def normalize_answer(text: str) -> str:
    """An answer as a class name: lower-cased, whitespace collapsed (as `vlm.eval.metrics.exact_match` compares)."""
    return " ".join(text.split()).lower()


@dataclass
class VQARow:
    """One single-image question row: the question, its training answer, the image and the row as read."""

    question: str
    answer: str  # normalised; the most common reference when the row has several
    image: Path
    row: dict[str, Any]  # all fields: "answer" (the references) and "type"/"subtype" for scoring


def read_vqa(path: str | Path, limit: int | None = None) -> tuple[list[VQARow], dict[str, int]]:
    """The single-image question rows of a JSONL file (the first `limit` of them) and counts of the rows left out.

    Raises `VLMError` when the file has no such row.
    """
    from vlm.data import single_image_rows

    examples, skipped = single_image_rows(path, kind="vqa", limit=limit)
    rows = [VQARow(ex.prompt, normalize_answer(ex.messages[-1]["content"]), ex.images[0], ex.row) for ex in examples]
    return rows, skipped


def _score(test_rows: list[VQARow], predictions: list[str]) -> dict[str, Any]:
    """`vlm.eval.metrics.score`'s metrics overall, per type and per subtype (the numbers `vlm eval` prints)."""
    from vlm.eval.metrics import score

    def rounded(metrics: dict[str, float]) -> dict[str, float]:
        return {name: round(value, 4) for name, value in metrics.items()}

    result = score("vqa", [r.row for r in test_rows], predictions)
    return {
        "metrics": rounded(result["metrics"]),
        "by_type": {group: rounded(m) for group, m in result["by_type"].items()},
        "by_subtype": {group: rounded(m) for group, m in result["by_subtype"].items()},
    }


def question_only(train_rows: list[VQARow], test_rows: list[VQARow]) -> dict[str, Any]:
    """Answers each test question with the most common training answer to the same question (else overall).

    Returns `{"metrics": {"vqa_accuracy", "exact_match"}, "by_type": {...}, "by_subtype": {...}}`.
    """
    per_question: dict[str, Counter[str]] = {}
    for r in train_rows:
        per_question.setdefault(" ".join(words(r.question)), Counter())[r.answer] += 1
    overall = Counter(r.answer for r in train_rows).most_common(1)[0][0]
    predictions = []
    for r in test_rows:
        counts = per_question.get(" ".join(words(r.question)))
        predictions.append(counts.most_common(1)[0][0] if counts else overall)
    return _score(test_rows, predictions)


def load_images(paths: list[Path], image_size: int) -> tuple[torch.Tensor, list[int]]:
    """Each distinct image file once, resized to `image_size` squared: (uint8 (N, 3, S, S), index of each path)."""
    from PIL import Image

    from vlm.images import load_image

    index: dict[Path, int] = {}
    arrays = []
    for p in paths:
        if p not in index:
            index[p] = len(arrays)
            img = load_image(p).resize((image_size, image_size), Image.Resampling.BILINEAR)
            arrays.append(np.asarray(img))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)
    return pixels, [index[p] for p in paths]


class CNNBaseline(nn.Module):
    """Image CNN + question bag of words -> answer logits."""

    def __init__(self, image_size: int, vocab_size: int, num_answers: int, width: int = 64, hidden: int = 256):
        super().__init__()
        layers: list[nn.Module] = []
        channels = [3, width // 2, width // 2, width, width]
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.cnn = nn.Sequential(*layers)
        grid = image_size
        for _ in range(4):
            grid = (grid + 1) // 2  # what a 3x3, stride-2, padding-1 convolution does to a side
        self.mlp = nn.Sequential(
            nn.Linear(width * grid * grid + vocab_size, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_answers),
        )

    def forward(self, pixels: torch.Tensor, bow: torch.Tensor) -> torch.Tensor:
        x = self.cnn(pixels).flatten(1)  # (B, width * grid * grid): flattened, not pooled, so positions survive
        return self.mlp(torch.cat([x, bow], dim=1))


def _bag_of_words(questions: list[str], vocab: dict[str, int]) -> torch.Tensor:
    bow = torch.zeros(len(questions), len(vocab))
    for i, q in enumerate(questions):
        for w in words(q):
            if w in vocab:
                bow[i, vocab[w]] = 1.0
    return bow


def _recompute_batchnorm(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Sets BatchNorm's running statistics to their mean over `batches` under the final weights ("precise BN", as
    in facebookresearch/pycls). The running averages kept while training lag the weights: after a short run, as a
    baseline's often is, they can be far enough off to flip the test-time answers."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain cumulative average
    model.train()
    with torch.no_grad():
        for b in batches:
            model(*b)


def cnn_baseline(
    train: list[VQARow],
    test: list[VQARow],
    epochs: int = 10,
    image_size: int = 64,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 1e-3,
    progress: bool = False,
) -> dict[str, Any]:
    """Trains `CNNBaseline` on the training rows (AdamW, CPU, seeded) and answers the test rows with it.

    The answers are the classes: a test answer never seen in training cannot be predicted. `progress` prints each
    epoch's mean loss to stderr. Returns `question_only`'s metrics plus the train time and the model's sizes.
    """
    if image_size < 32:
        raise VLMError(f"image_size must be at least 32 (got {image_size}): smaller images leave a 1x1 final grid")
    torch.manual_seed(seed)
    vocab = {w: i for i, w in enumerate(sorted({w for r in train for w in words(r.question)}))}
    classes = sorted({r.answer for r in train})
    label = {a: i for i, a in enumerate(classes)}
    pixels, image_index = load_images([r.image for r in train + test], image_size)
    image_index = torch.tensor(image_index)
    bow = _bag_of_words([r.question for r in train + test], vocab)
    targets = torch.tensor([label[r.answer] for r in train])

    def batch(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pixels[image_index[rows]].float() / 255.0, bow[rows]  # RGB in [0, 1]

    model = CNNBaseline(image_size, len(vocab), len(classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    losses = []
    for epoch in range(epochs):
        total = 0.0
        for rows in torch.randperm(len(train), generator=generator).split(batch_size):
            loss = nn.functional.cross_entropy(model(*batch(rows)), targets[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        losses.append(round(total / len(train), 4))
        if progress:
            print(f"vlm: cnn epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}", file=sys.stderr)
    sample = torch.randperm(len(train), generator=generator)[:10_000]
    _recompute_batchnorm(model, (batch(rows) for rows in sample.split(256)))
    train_s = time.perf_counter() - start

    model.eval()
    predictions = []
    with torch.no_grad():
        for rows in torch.arange(len(train), len(train) + len(test)).split(256):
            predictions += [classes[k] for k in model(*batch(rows)).argmax(1).tolist()]
    return {
        **_score(test, predictions),
        "train_s": round(train_s, 2),
        "train_loss": losses,
        "answers": len(classes),
        "vocabulary": len(vocab),
        "parameters": sum(p.numel() for p in model.parameters()),
        "unseen_test_answers": sum(r.answer not in label for r in test),
    }


def baselines(
    train: str,
    test: str,
    epochs: int = 10,
    image_size: int = 64,
    seed: int = 0,
    max_train: int | None = None,
) -> dict[str, Any]:
    """Question-only and small-CNN accuracy on a VQA set: the numbers a VLM must beat to show it uses the image.

    Question only answers each test question with the most common training answer to the same question; the CNN
    reads the image and a bag of words of the question and picks one of the training answers. Both are scored as
    `vlm eval` scores a model (VQA accuracy and exact match, overall, per "type" and per "subtype") and printed as
    JSON. Only single-image question rows are used; the others are counted under "skipped".

    Args:
        train: The training set: a JSONL file in the project's format.
        test: The test set: a JSONL file in the project's format.
        epochs: Passes of the CNN over the training rows.
        image_size: Side in pixels the images are resized to for the CNN.
        seed: Seed of the CNN's initialisation and batch order.
        max_train: Use only the first MAX_TRAIN question rows of the training set.
    """
    if epochs < 1:
        raise VLMError("epochs must be at least 1")
    if max_train is not None and max_train < 1:
        raise VLMError("max_train must be at least 1")
    train_rows, train_skipped = read_vqa(train, max_train)
    test_rows, test_skipped = read_vqa(test)
    counts = {
        field: Counter(str(r.row[field]) for r in test_rows if r.row.get(field) is not None)
        for field in ("type", "subtype")
    }
    return {
        "train": {"file": str(train), "rows": len(train_rows), "skipped": train_skipped},
        "test": {"file": str(test), "rows": len(test_rows), "skipped": test_skipped},
        "type_counts": dict(sorted(counts["type"].items())),
        "subtype_counts": dict(sorted(counts["subtype"].items())),
        "question_only": question_only(train_rows, test_rows),
        "cnn": {
            "epochs": epochs,
            "image_size": image_size,
            "seed": seed,
            **cnn_baseline(train_rows, test_rows, epochs, image_size, seed, progress=True),
        },
    }
