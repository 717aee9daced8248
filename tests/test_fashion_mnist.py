"""Tests for the Fashion-MNIST VQA/caption generator (eval/benchmarks/fashion_mnist.py).

Most tests run on a tiny fake Fashion-MNIST folder written here in the idx format, so the parser and the generator
are tested where the Debian package dataset-fashion-mnist is not installed; the rest use the real files and skip
without them.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import run_vlm
from PIL import Image
from vlm.eval.benchmarks.fashion_mnist import (
    DEFAULT_SOURCE,
    FILES,
    LABELS,
    SPLITS,
    caption_for,
    generate_fashion_mnist,
    load_set,
    questions_for,
    read_idx,
    yes_no_question,
)

COUNTS = {"train": 12, "val": 5, "test": 6}
needs_real_data = pytest.mark.skipif(
    not Path(DEFAULT_SOURCE).is_dir(), reason="the Debian package dataset-fashion-mnist is not installed"
)


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    """Write a gzipped idx file of unsigned bytes (magic number 0x0000 08 ndim unless given)."""
    magic = 0x0800 | array.ndim if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0))


@pytest.fixture(scope="module")
def fake_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Fashion-MNIST folder with 30 training and 10 test images of random pixels, every label present."""
    root = tmp_path_factory.mktemp("fake-fashion-mnist")
    rng = np.random.default_rng(0)
    for name, n in (("train", 30), ("test", 10)):
        image_file, label_file = FILES[name]
        write_idx(root / image_file, rng.integers(0, 256, size=(n, 28, 28)))
        write_idx(root / label_file, np.arange(n) % len(LABELS))
    return root


@pytest.fixture(scope="module")
def dataset(fake_source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("fashion")
    return out, generate_fashion_mnist(out, source=fake_source, seed=3, **COUNTS)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _asked_label(question: str) -> str:
    for prefix in ("Is this a ", "Is this an ", "Are these "):
        if question.startswith(prefix):
            return question.removeprefix(prefix).removesuffix("?")
    raise AssertionError(f"not a yes/no question: {question!r}")


def test_read_idx_parses_a_tiny_file(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", array)
    got = read_idx(tmp_path / "x.gz", 3)
    assert got.dtype == np.uint8 and got.shape == (2, 3, 4)
    np.testing.assert_array_equal(got, array)
    write_idx(tmp_path / "y.gz", np.array([7, 0, 9]))
    np.testing.assert_array_equal(read_idx(tmp_path / "y.gz", 1), [7, 0, 9])


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "is missing"),
        (b"not gzip at all", "gzip"),
        (gzip.compress(b"\x00\x00"), "magic number none"),
        (gzip.compress(bytes.fromhex("00000803") + (1).to_bytes(4, "big") * 3 + b"\x00"), "magic number 0x00000803"),
        (gzip.compress(bytes.fromhex("00000801") + (5).to_bytes(4, "big") + b"\x00" * 4), "4 data bytes"),
        (gzip.compress(bytes.fromhex("00000801") + (2).to_bytes(4, "big") + b"\x00" * 3), "3 data bytes"),
        (gzip.compress(bytes.fromhex("00000801") + b"\x00"), "truncated"),
    ],
)
def test_read_idx_names_the_bad_file(tmp_path: Path, content: bytes | None, match: str) -> None:
    path = tmp_path / "labels.gz"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        read_idx(path, 1)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_load_set_checks_images_against_labels(tmp_path: Path, fake_source: Path) -> None:
    image_file, label_file = FILES["train"]
    (tmp_path / image_file).write_bytes((fake_source / image_file).read_bytes())
    write_idx(tmp_path / label_file, np.zeros(29))
    with pytest.raises(ValueError, match="30 images but .* 29 labels"):
        load_set(tmp_path, "train")
    write_idx(tmp_path / label_file, np.full(30, 10))
    with pytest.raises(ValueError, match="label 10"):
        load_set(tmp_path, "train")
    write_idx(tmp_path / image_file, np.zeros((30, 28, 27)))
    with pytest.raises(ValueError, match="28x27"):
        load_set(tmp_path, "train")


def test_layout_counts_and_images(dataset: tuple[Path, dict], fake_source: Path) -> None:
    out, summary = dataset
    sets = {name: load_set(fake_source, name) for name in FILES}
    for split in SPLITS:
        info = summary["splits"][split]
        captions = _read_jsonl(out / f"{split}_captions.jsonl")
        questions = _read_jsonl(out / f"{split}.jsonl")
        assert (info["images"], info["captions"], info["questions"]) == (COUNTS[split],) * 2 + (2 * COUNTS[split],)
        assert len(captions) == COUNTS[split] and len(questions) == 2 * COUNTS[split]
        assert [r["image"] for r in captions] == [f"images/{split}_{i:05d}.png" for i in range(COUNTS[split])]
        assert [r["image"] for r in questions] == [r["image"] for r in captions for _ in range(2)]
        images, labels = sets["test" if split == "test" else "train"]
        for row in captions:
            img = Image.open(out / row["image"])
            assert img.mode == "L" and img.size == (28, 28)
            np.testing.assert_array_equal(np.asarray(img), images[row["source_index"]])
            assert row["label"] == LABELS[labels[row["source_index"]]]


def test_answers_match_the_labels(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    for split in SPLITS:
        label = {r["image"]: r["label"] for r in _read_jsonl(out / f"{split}_captions.jsonl")}
        questions = _read_jsonl(out / f"{split}.jsonl")
        what = [r for r in questions if r["type"] == "what"]
        assert _read_jsonl(out / f"{split}_what.jsonl") == what
        for row in what:
            assert row == {"image": row["image"], "question": "What is this?", "answer": label[row["image"]]} | {
                "type": "what",
                "subtype": "what",
            }
        for row in (r for r in questions if r["type"] == "yes_no"):
            assert row["subtype"] == "yes_no"
            assert row["answer"] == ("yes" if _asked_label(row["question"]) == label[row["image"]] else "no")


def test_yes_no_is_balanced_and_asks_every_other_label() -> None:
    rows = [questions_for("coat", np.random.default_rng(i))[1] for i in range(2000)]
    yes = sum(r["answer"] == "yes" for r in rows) / len(rows)
    assert 0.45 < yes < 0.55
    wrong = Counter(_asked_label(r["question"]) for r in rows if r["answer"] == "no")
    assert set(wrong) == set(LABELS) - {"coat"}
    assert min(wrong.values()) > 0.5 * len(rows) / 2 / 9


def test_grammar() -> None:
    assert caption_for("sneaker") == "a photo of a sneaker"
    assert caption_for("trousers") == "a photo of trousers"
    assert yes_no_question("t-shirt") == "Is this a t-shirt?"
    assert yes_no_question("trousers") == "Are these trousers?"
    assert all(" " not in label and label == label.lower() for label in LABELS)


def test_splits_are_disjoint(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    index = {s: [r["source_index"] for r in _read_jsonl(out / f"{s}_captions.jsonl")] for s in SPLITS}
    for split in SPLITS:
        assert len(set(index[split])) == len(index[split])
    assert not set(index["train"]) & set(index["val"])
    assert max(index["test"]) < 10


def test_val_does_not_change_when_train_grows(dataset: tuple[Path, dict], fake_source: Path, tmp_path: Path) -> None:
    out, _ = dataset
    generate_fashion_mnist(tmp_path, source=fake_source, seed=3, train=20, val=COUNTS["val"], test=1)
    assert (tmp_path / "val_captions.jsonl").read_bytes() == (out / "val_captions.jsonl").read_bytes()


def test_same_seed_same_bytes_other_seed_differs(dataset: tuple[Path, dict], fake_source: Path, tmp_path: Path) -> None:
    out, _ = dataset
    generate_fashion_mnist(tmp_path / "same", source=fake_source, seed=3, **COUNTS)
    assert _all_files(tmp_path / "same") == _all_files(out)
    generate_fashion_mnist(tmp_path / "other", source=fake_source, seed=4, **COUNTS)
    other = _all_files(tmp_path / "other")
    assert other.keys() == _all_files(out).keys()
    assert other["train_captions.jsonl"] != _all_files(out)["train_captions.jsonl"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train": -1}, "train"),
        ({"val": 1.5}, "val"),
        ({"test": "2"}, "test"),
        ({"train": True}, "train"),
        ({"seed": -3}, "seed"),
        ({"out": None}, "out"),
        ({"out": ""}, "out"),
        ({"train": 26}, "train \\+ val must be at most 30"),
        ({"test": 11}, "test must be at most 10"),
        ({"source": "/nonexistent/fashion-mnist"}, "install the Debian package dataset-fashion-mnist or pass --source"),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path: Path, fake_source: Path, kwargs: dict, match: str) -> None:
    args = {"out": tmp_path / "x", "source": fake_source, "train": 1, "val": 5, "test": 1, **kwargs}
    with pytest.raises(ValueError, match=match) as info:
        generate_fashion_mnist(**args)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "x").exists(), "nothing should be written when the arguments are bad"


def test_missing_file_names_it(tmp_path: Path, fake_source: Path) -> None:
    for name in FILES["train"]:
        (tmp_path / name).write_bytes((fake_source / name).read_bytes())
    with pytest.raises(ValueError, match=f"{FILES['test'][0]} is missing: install the Debian package"):
        generate_fashion_mnist(tmp_path / "out", source=tmp_path)


def test_out_must_not_be_a_file(tmp_path: Path, fake_source: Path) -> None:
    path = tmp_path / "file.txt"
    path.write_text("x")
    with pytest.raises(ValueError, match="out must be a folder"):
        generate_fashion_mnist(path, source=fake_source, train=1, val=0, test=0)


def test_cli(tmp_path: Path, fake_source: Path) -> None:
    args = ["data", "fashion-mnist", "--out", tmp_path, "--source", fake_source, "--train", "3", "--val", "1"]
    done = run_vlm([*args, "--test", "2"])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["splits"]["test"]["images"] == 2
    assert len(_read_jsonl(tmp_path / "train.jsonl")) == 6
    done = run_vlm(["data", "fashion-mnist", "--out", tmp_path, "--source", tmp_path / "nowhere"])
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("vlm: error: "), done.stderr
    assert "dataset-fashion-mnist" in lines[0]


@needs_real_data
def test_real_files() -> None:
    for name, n in (("train", 60000), ("test", 10000)):
        images, labels = load_set(DEFAULT_SOURCE, name)
        assert images.shape == (n, 28, 28) and labels.shape == (n,)
        assert np.bincount(labels).tolist() == [n // 10] * 10


@needs_real_data
def test_real_set_is_consistent_and_balanced(tmp_path: Path) -> None:
    summary = generate_fashion_mnist(tmp_path, train=150, val=50, test=100, seed=0)
    assert summary["source"] == DEFAULT_SOURCE
    answers, labels = Counter(), Counter()
    for split in SPLITS:
        label = {r["image"]: r["label"] for r in _read_jsonl(tmp_path / f"{split}_captions.jsonl")}
        labels.update(label.values())
        for row in _read_jsonl(tmp_path / f"{split}.jsonl"):
            if row["type"] == "what":
                assert row["answer"] == label[row["image"]]
            else:
                assert row["answer"] == ("yes" if _asked_label(row["question"]) == label[row["image"]] else "no")
                answers[row["answer"]] += 1
    assert 0.4 < answers["yes"] / 300 < 0.6
    assert set(labels) == set(LABELS)
