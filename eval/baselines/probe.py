"""`vlm probe`: the linear-probe accuracy of a model's frozen image encoder, the ceiling a VLM built on it is measured
against.

The encoder comes from a vlm checkpoint folder (its trained weights) or from a training recipe (the encoder its
`model.config` describes, with the pretrained weights it names; a recipe with `model.init_from` uses that folder).
Each image is read through the encoder's own preprocessing (`vlm.processor.ImageTransform` from its data config, as
the VLM reads it) and turned into one feature vector: the encoder's tokens flattened (`flat`, every number the
projector sees, positions kept), their mean (`mean`), or both side by side (`flat+mean`). Features are standardized
with the training set's mean and std.

The probe is multinomial logistic regression with an L2 penalty on the weights, fitted full-batch with L-BFGS from
zero (a convex problem: the same data gives the same probe). The penalty is chosen from `L2_GRID` by accuracy on a
seeded held-out part of the training rows, then the probe is refitted on all of them, as linear-probe evaluations
do (e.g. CLIP, Radford et al. 2021, section 3.2: L-BFGS logistic regression, L2 strength swept on a validation split).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from vlm.encoders import ImageEncoder

from vlm.errors import VLMError
from vlm.processor import ImageTransform

Pooling = Literal["flat", "mean", "flat+mean"]
L2_GRID = (1.0, 3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4)


def encoder_from_checkpoint(path: str | Path) -> ImageEncoder:
    """The image encoder of a vlm checkpoint folder, with its saved weights (the rest of the model is not built)."""
    from safetensors import safe_open

    from vlm.checkpoint import CONFIG_FILE, WEIGHTS_FILE
    from vlm.config import VLMConfig
    from vlm.model import build_encoder

    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise VLMError(f"not a vlm checkpoint folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}): {path}")
    encoder = build_encoder(VLMConfig.load(path / CONFIG_FILE), pretrained=False)
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
        state = {k.removeprefix("encoder."): f.get_tensor(k) for k in f.keys() if k.startswith("encoder.")}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise VLMError(f"checkpoint {path} does not match its encoder config: missing {sorted(missing)[:3]}")
    return encoder


def encoder_from_recipe(path: str | Path) -> ImageEncoder:
    """The image encoder a training recipe (a `vlm fit` YAML) starts from: `model.init_from`'s, else the one
    `model.config` (a preset name or a config) describes, with its pretrained weights unless `model.pretrained` is
    false."""
    import yaml

    from vlm.config import VLMConfig
    from vlm.model import build_encoder

    path = Path(path)
    if not path.is_file():
        raise VLMError(f"recipe not found: {path}")
    model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
    if model.get("init_from"):
        return encoder_from_checkpoint(model["init_from"])
    config = model.get("config")
    if isinstance(config, str):
        config = VLMConfig.from_name(config)
    elif isinstance(config, dict):
        config = VLMConfig.from_dict(config)
    else:
        raise VLMError(f"{path}: model.config must be a preset name or a config (or set model.init_from)")
    return build_encoder(config, pretrained=model.get("pretrained", True))


def read_labelled_images(path: str | Path, label_field: str, limit: int | None = None) -> tuple[list[Path], list[str]]:
    """(image path, label) of each single-image row of a JSONL file that has `label_field` (the first `limit`).

    A label that is a list (VQA references) counts as its most common entry. Raises `VLMError` for a file with no
    such row; other rows are left out and counted on stderr.
    """
    from vlm.data import single_image_rows

    def label(ex) -> str | None:
        value = ex.row.get(label_field)
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            value = Counter(value).most_common(1)[0][0]
        return value.strip() if isinstance(value, str) and value.strip() else None

    rows, skipped = single_image_rows(path, keep=lambda ex: None if label(ex) else f"no_{label_field}", limit=limit)
    if skipped:
        print(f"vlm: {path}: left out {skipped}", file=sys.stderr)
    return [ex.images[0] for ex in rows], [label(ex) for ex in rows]


@torch.no_grad()
def extract_features(
    encoder: ImageEncoder, images: list[Path], pooling: Pooling = "flat", batch_size: int = 64
) -> Tensor:
    """(N, D) float32 features of the images, read through the encoder's own preprocessing (see the module
    docstring for `pooling`)."""
    from vlm.images import load_image

    dc = encoder.data_config
    transform = ImageTransform(tuple(dc["input_size"][1:]), tuple(dc["mean"]), tuple(dc["std"]), dc["interpolation"])
    encoder.eval()
    out = []
    for start in range(0, len(images), batch_size):
        pixels = transform([load_image(p) for p in images[start : start + batch_size]])
        tokens = encoder(pixels.to(next(encoder.parameters()).dtype)).float()  # (B, N, C)
        parts = {"flat": [tokens.flatten(1)], "mean": [tokens.mean(1)]}
        parts["flat+mean"] = parts["flat"] + parts["mean"]
        out.append(torch.cat(parts[pooling], dim=1))
    return torch.cat(out)


def fit_logistic(x: Tensor, y: Tensor, num_classes: int, l2: float, max_iter: int = 500) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression: (weight (K, D), bias (K,)) minimising mean cross-entropy + l2/2 * |weight|^2,
    full-batch L-BFGS from zero."""
    weight = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-6, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def _accuracy(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor) -> float:
    return float(((x @ weight.T + bias).argmax(1) == y).float().mean())


def probe(
    train: str,
    test: str,
    model: str | None = None,
    recipe: str | None = None,
    label_field: str = "label",
    pooling: Pooling = "flat",
    l2: float | None = None,
    val_fraction: float = 0.1,
    max_train: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Linear-probe accuracy of a frozen image encoder: the ceiling for a VLM that reads the same features.

    Extracts the encoder's features for every image (through the encoder's own preprocessing), fits multinomial
    logistic regression on the training rows (L2 chosen on a held-out part of them unless given, L-BFGS) and prints
    test accuracy overall and per class as JSON.

    Args:
        train: Training rows: a JSONL file whose single-image rows carry the label (e.g. `{split}_captions.jsonl`).
        test: Test rows, the same way.
        model: Probe this vlm checkpoint folder's encoder.
        recipe: Or the encoder a training recipe (a `vlm fit` YAML) starts from, pretrained weights loaded.
        label_field: The row field holding the class (`label` in caption files; `answer` for question rows).
        pooling: Features: `flat` (all tokens flattened: what the projector sees), `mean` (tokens averaged) or
            `flat+mean`.
        l2: L2 penalty on the probe's weights; unset: chosen from a grid on the held-out rows.
        val_fraction: Part of the training rows held out to choose the penalty.
        max_train: Use only the first MAX_TRAIN training rows.
        batch_size: Images per encoder forward pass.
        seed: Seed of the held-out split.
    """
    if (model is None) == (recipe is None):
        raise VLMError("name the encoder to probe: --model CHECKPOINT_DIR or --recipe RECIPE.yaml (one of them)")
    if not 0 < val_fraction < 1:
        raise VLMError("val_fraction must be between 0 and 1")
    if l2 is not None and l2 < 0:
        raise VLMError("l2 must be >= 0")
    torch.manual_seed(seed)
    encoder = encoder_from_checkpoint(model) if model is not None else encoder_from_recipe(recipe)
    train_images, train_labels = read_labelled_images(train, label_field, max_train)
    test_images, test_labels = read_labelled_images(test, label_field)
    classes = sorted(set(train_labels))
    index = {c: i for i, c in enumerate(classes)}

    start = time.perf_counter()
    x_train = extract_features(encoder, train_images, pooling, batch_size)
    x_test = extract_features(encoder, test_images, pooling, batch_size)
    extract_s = time.perf_counter() - start
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y_train = torch.tensor([index[c] for c in train_labels])
    y_test = torch.tensor([index.get(c, -1) for c in test_labels])  # -1: a class never seen in training

    start = time.perf_counter()
    search: dict[str, float] = {}
    if l2 is None:
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed))
        held = max(1, int(len(order) * val_fraction))
        val, fit = order[:held], order[held:]
        for candidate in L2_GRID:
            w, b = fit_logistic(x_train[fit], y_train[fit], len(classes), candidate)
            search[f"{candidate:g}"] = round(_accuracy(x_train[val], y_train[val], w, b), 4)
        l2 = max(L2_GRID, key=lambda c: search[f"{c:g}"])  # the strongest penalty among ties: grid order
    weight, bias = fit_logistic(x_train, y_train, len(classes), l2)
    fit_s = time.perf_counter() - start

    predicted = (x_test @ weight.T + bias).argmax(1)
    right = predicted == y_test
    per_class = {}
    for name in sorted(set(test_labels)):
        rows = torch.tensor([label == name for label in test_labels])
        per_class[name] = round(float(right[rows].float().mean()), 4)
    return {
        "encoder": {
            "name": type(encoder.model).__name__,
            "input_size": list(encoder.data_config["input_size"]),
            "tokens": encoder.num_tokens,
            "grid": list(encoder.grid_size),
            "channels": encoder.num_features,
        },
        "pooling": pooling,
        "feature_dims": x_train.shape[1],
        "train": {"file": str(train), "rows": len(train_labels), "classes": len(classes)},
        "test": {"file": str(test), "rows": len(test_labels), "unseen_labels": int((y_test < 0).sum())},
        "l2": l2,
        "l2_search": search,
        "train_accuracy": round(_accuracy(x_train, y_train, weight, bias), 4),
        "test_accuracy": round(float(right.float().mean()), 4),
        "per_class": per_class,
        "extract_s": round(extract_s, 1),
        "fit_s": round(fit_s, 1),
    }
