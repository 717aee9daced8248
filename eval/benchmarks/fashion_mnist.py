"""Fashion-MNIST as a small VQA and caption set.

Reference: H. Xiao, K. Rasul, R. Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning
Algorithms", arXiv:1708.07747, 2017. 70,000 28x28 grayscale images of 10 kinds of clothing (60,000 training, 10,000
test), stored as gzipped idx files (the MNIST format: big-endian header with a magic number and the dimensions, then
unsigned bytes). The Debian package ``dataset-fashion-mnist`` installs them under :data:`DEFAULT_SOURCE`.

Layout on disk (image paths in the JSONL files are relative to ``out``)::

    out/images/{split}_{index:05d}.png  28x28 grayscale
    out/{split}_captions.jsonl          caption rows: image, caption ("a photo of a sneaker"), label, source_index
    out/{split}.jsonl                   question rows, two per image: "What is this?" and a yes/no question
    out/{split}_what.jsonl              the "What is this?" rows of {split}.jsonl alone, in the same order

``source_index`` is the image's row in its idx file (the training file for train and val, the test file for test).
The val images are the first ``val`` of a seeded permutation of the training file and the train images the next
``train`` (so val does not change when train grows), the test images the first ``test`` of a seeded permutation of the
test file. Each image's yes/no question is drawn from its own stream ``SeedSequence(seed, spawn_key=(split_id,
index))``, as in :mod:`vlm.eval.benchmarks.shapes`.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from vlm.eval.benchmarks.datagen import SPLITS, check_int, output_folder, split_counts

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"

LABELS: tuple[str, ...] = (
    "t-shirt",
    "trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "boot",
)
"""Label names, indexed by Fashion-MNIST's class ids 0..9 (T-shirt/top, Trouser, ..., Ankle boot)."""

PLURAL_LABELS = frozenset({"trousers"})
"""Labels that are grammatically plural: "a photo of trousers", "Are these trousers?"."""

IMAGE_SIZE = 28
FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
"""The (images, labels) idx files of the training and the test set."""

_INSTALL_HINT = "install the Debian package dataset-fashion-mnist or pass --source FOLDER"
_UBYTE = 0x08  # the idx type code for unsigned bytes, the only one Fashion-MNIST uses
# Permutation streams, after the per-image streams' split ids 0..2.
_PERMUTATION_KEY = {"train": len(SPLITS), "test": len(SPLITS) + 1}


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read a gzipped idx file of unsigned bytes (the MNIST format), checking its header against its size.

    The header is the magic number ``0x0000 08 ndim`` and then ``ndim`` big-endian uint32 dimensions.

    Args:
        path: The ``.gz`` file.
        ndim: The number of dimensions expected: 1 for labels, 3 for images.

    Returns:
        A read-only uint8 array of the header's shape.

    Raises:
        ValueError: Naming the file, if it is missing, not gzip, has another magic number or the wrong size.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is missing: {_INSTALL_HINT}")
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path} is not a readable gzip file ({e})") from None
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if magic != (_UBYTE << 8 | ndim):
        expected = f"0x{_UBYTE << 8 | ndim:08x}"
        got = "none (file too short)" if magic is None else f"0x{magic:08x}"
        raise ValueError(
            f"{path} is not an idx file of {ndim}-d unsigned bytes: magic number {got}, expected {expected}"
        )
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise ValueError(f"{path} is truncated: {len(data)} bytes, shorter than its {offset}-byte header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(shape, dtype=np.int64))
    if len(data) != offset + size:
        raise ValueError(f"{path} has {len(data) - offset} data bytes, but its header {shape} says {size}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def load_set(source: str | Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Read the ``"train"`` or ``"test"`` set of a Fashion-MNIST folder.

    Returns:
        ``(images, labels)``: uint8 arrays of shapes ``(n, 28, 28)`` and ``(n,)``.

    Raises:
        ValueError: If a file is missing or malformed, the images are not 28x28, the counts differ, or a label is
            not 0..9.
    """
    image_file, label_file = (Path(source) / f for f in FILES[name])
    images, labels = read_idx(image_file, 3), read_idx(label_file, 1)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{image_file} holds {images.shape[1]}x{images.shape[2]} images, expected 28x28")
    if len(images) != len(labels):
        raise ValueError(f"{image_file} holds {len(images)} images but {label_file} {len(labels)} labels")
    if labels.size and labels.max() >= len(LABELS):
        raise ValueError(f"{label_file} has label {labels.max()}, expected 0..{len(LABELS) - 1}")
    return images, labels


def caption_for(label: str) -> str:
    """``"a photo of a sneaker"``; ``"a photo of trousers"`` for a plural label."""
    if label in PLURAL_LABELS:
        return f"a photo of {label}"
    return f"a photo of {'an' if label[0] in 'aeiou' else 'a'} {label}"


def yes_no_question(label: str) -> str:
    """``"Is this a sneaker?"``; ``"Are these trousers?"`` for a plural label."""
    if label in PLURAL_LABELS:
        return f"Are these {label}?"
    return f"Is this {'an' if label[0] in 'aeiou' else 'a'} {label}?"


def questions_for(label: str, rng: np.random.Generator) -> list[dict[str, str]]:
    """The two questions of an image: "What is this?" and a yes/no question about the true label (probability 0.5)
    or a uniformly drawn other label."""
    asked = label
    if rng.random() >= 0.5:
        others = [x for x in LABELS if x != label]
        asked = others[int(rng.integers(len(others)))]
    return [
        {"question": "What is this?", "answer": label, "type": "what", "subtype": "what"},
        {
            "question": yes_no_question(asked),
            "answer": "yes" if asked == label else "no",
            "type": "yes_no",
            "subtype": "yes_no",
        },
    ]


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def source_indices(counts: dict[str, int], sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Which rows of the idx files each split takes.

    Args:
        counts: Images per split (``train``, ``val``, ``test``).
        sizes: Rows of the ``train`` and the ``test`` idx files.
        seed: Random seed.

    Returns:
        Per split, the row indices into its source file (train and val into the training file, disjoint).

    Raises:
        ValueError: If a file has too few images for the counts asked for.
    """
    if counts["train"] + counts["val"] > sizes["train"]:
        raise ValueError(f"train + val must be at most {sizes['train']} (the training images), got {counts}")
    if counts["test"] > sizes["test"]:
        raise ValueError(f"test must be at most {sizes['test']} (the test images), got {counts['test']}")
    train_perm = _rng(seed, _PERMUTATION_KEY["train"]).permutation(sizes["train"])
    test_perm = _rng(seed, _PERMUTATION_KEY["test"]).permutation(sizes["test"])
    n_val = counts["val"]
    return {
        "train": train_perm[n_val : n_val + counts["train"]],
        "val": train_perm[:n_val],
        "test": test_perm[: counts["test"]],
    }


def generate_fashion_mnist(
    out: str | Path,
    source: str | Path = DEFAULT_SOURCE,
    train: int = 10000,
    val: int = 1000,
    test: int = 2000,
    seed: int = 0,
) -> dict:
    """Make a VQA and caption set from Fashion-MNIST (Xiao et al. 2017) as PNG images and JSONL files.

    Writes ``images/{split}_{index:05d}.png`` (28x28 grayscale), caption files ``{split}_captions.jsonl`` ("a photo
    of a sneaker", with the ``label`` and the ``source_index`` in its idx file), question files ``{split}.jsonl``
    (per image "What is this?" and a yes/no question, true half of the time) and ``{split}_what.jsonl`` (the "What is
    this?" rows alone). Train and val come from the 60,000 training images (disjoint), test from the 10,000 test
    images. The output is fully determined by the seed; existing files are overwritten.

    Args:
        out: Output folder; created if missing.
        source: Folder with the four gzipped idx files (the Debian package dataset-fashion-mnist installs them here).
        train: Number of training images.
        val: Number of validation images.
        test: Number of test images.
        seed: Random seed (non-negative integer) for the choice of images and the yes/no questions.

    Returns:
        Summary dict: ``out``, ``source``, ``seed``, ``labels``, ``images_dir``, and per split (``splits[name]``) the
        numbers of ``images``, ``questions`` and ``captions`` and the paths of its ``questions_file``, ``what_file``
        and ``captions_file``.

    Raises:
        ValueError: If a count or the seed is not a non-negative integer, ``out`` is not a path or is a file, the
            source folder or one of its files is missing or malformed, or it has fewer images than asked for.
    """
    out_dir = output_folder(out)
    counts = split_counts(train, val, test)
    seed = check_int("seed", seed)
    if not isinstance(source, (str, Path)) or not Path(source).is_dir():
        raise ValueError(f"Fashion-MNIST folder {source} not found: {_INSTALL_HINT}")
    sets = {name: load_set(source, name) for name in FILES}
    picks = source_indices(counts, {name: len(labels) for name, (_, labels) in sets.items()}, seed)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)

    summary: dict[str, Any] = {
        "out": str(out_dir),
        "source": str(source),
        "seed": seed,
        "labels": list(LABELS),
        "images_dir": str(out_dir / "images"),
        "splits": {},
    }
    for split_id, split in enumerate(SPLITS):
        images, labels = sets["test" if split == "test" else "train"]
        q_path, what_path, c_path = (out_dir / f"{split}{suffix}.jsonl" for suffix in ("", "_what", "_captions"))
        with (
            q_path.open("w", encoding="utf-8", newline="\n") as fq,
            what_path.open("w", encoding="utf-8", newline="\n") as fwhat,
            c_path.open("w", encoding="utf-8", newline="\n") as fc,
        ):
            for index, row in enumerate(picks[split].tolist()):
                rel = f"images/{split}_{index:05d}.png"
                Image.fromarray(images[row]).save(out_dir / rel, format="PNG")
                label = LABELS[labels[row]]
                caption = {"image": rel, "caption": caption_for(label), "label": label, "source_index": row}
                fc.write(json.dumps(caption) + "\n")
                what, yes_no = questions_for(label, _rng(seed, split_id, index))
                fwhat.write(json.dumps({"image": rel, **what}) + "\n")
                fq.write(json.dumps({"image": rel, **what}) + "\n" + json.dumps({"image": rel, **yes_no}) + "\n")
        summary["splits"][split] = {
            "images": counts[split],
            "questions": 2 * counts[split],
            "captions": counts[split],
            "questions_file": str(q_path),
            "what_file": str(what_path),
            "captions_file": str(c_path),
        }
    return summary


__all__ = [
    "DEFAULT_SOURCE",
    "FILES",
    "LABELS",
    "PLURAL_LABELS",
    "SPLITS",
    "caption_for",
    "generate_fashion_mnist",
    "load_set",
    "questions_for",
    "read_idx",
    "source_indices",
    "yes_no_question",
]
