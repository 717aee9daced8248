"""What the data generators (`vlm data shapes|objects|fashion-mnist`) share: the split names, argument checks, the
per-image random streams and the conversation rows built from question rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

SPLITS: tuple[str, ...] = ("train", "val", "test")


def check_int(name: str, value: Any, minimum: int = 0) -> int:
    """`value` as an int, or a ValueError naming `name` (bool is an int subclass, but "train=True" is surely a
    mistake)."""
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not is_int or value < minimum:
        what = "a non-negative integer" if minimum == 0 else f"an integer of at least {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def split_counts(train: Any, val: Any, test: Any) -> dict[str, int]:
    """Images per split, each checked as a non-negative integer."""
    return {name: check_int(name, value) for name, value in zip(SPLITS, (train, val, test), strict=True)}


def output_folder(out: Any) -> Path:
    """The output folder `out` as a Path, refused with a ValueError if it is not a path or is a file."""
    if not isinstance(out, (str, Path)) or str(out) == "":
        raise ValueError(f"out must be a non-empty path, got {out!r}")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out must be a folder, but {out_dir} is a file")
    return out_dir


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one image: SeedSequence(seed).spawn(3)[split_id].spawn(n)[index], independent per split
    and per image, so any image can be rebuilt from (seed, split, index)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(SPLITS.index(split), index)))


def conversation(questions: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Question rows (`question`, `answer`) as the turns of one conversation row, in the given order."""
    return [
        {"role": role, "content": row[key]}
        for row in questions
        for role, key in (("user", "question"), ("assistant", "answer"))
    ]
