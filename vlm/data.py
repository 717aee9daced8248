"""The one reader of the project's JSONL data format, used by training, evaluation and batch inference.

A dataset is a JSONL file; image paths are relative to the file's folder. Each line is one of:
    {"image": "img/1.png", "caption": "a red circle"}                      caption (a list: several references)
    {"image": "img/1.png", "question": "what colour?", "answer": "red"}   VQA (answer may be a list)
    {"image": ["a.png", "b.png"], "conversations": [{"role": "user", "content": "<image>\\n<image>\\nCompare."},
                                                    {"role": "assistant", "content": "..."}]}
LLaVA's spelling of turns (`{"from": "human"|"gpt", "value": ...}`) is accepted; `image` may be absent for
text-only rows; any other field is kept. For inference, a question row needs no answer and an image row
needs no caption.

Files are read as UTF-8 (a byte-order mark at the start is allowed), in chunks: a line longer than
`MAX_LINE_BYTES` is never held whole and is a broken row, as is a line that is not valid UTF-8 or not JSON. A
file with no rows at all is an error. Only regular files are opened (`vlm.files.open_regular`): a named pipe
would block the read.

Hugging Face datasets are read through the same `parse_row`: `open_hf_dataset` opens one, `example_from_record`
renames a record's columns to the fields above and parses it, and `load_row_images` opens the images of a row,
whether paths or images stored in the dataset. `datasets` is imported only when a dataset is opened.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, NamedTuple

from vlm.errors import VLMError
from vlm.files import open_regular

if TYPE_CHECKING:
    from PIL import Image

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# Data files `datasets` reads (suffix -> builder); the project's own .jsonl goes through `read_jsonl`.
_DATA_FILES = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".csv": "csv"}
# Files that mark a folder written by `datasets.save_to_disk`.
_SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
# A JSONL line longer than this (in bytes, without its newline) is a broken row; it is skipped, never read whole.
MAX_LINE_BYTES = 1 << 20
_CHUNK_BYTES = 1 << 16
_BOM = b"\xef\xbb\xbf"


class RowError(VLMError):
    """A row that cannot be used; carries where it came from so runs can count and report it."""

    def __init__(self, message: str, line: int | None = None, source: str | None = None):
        where = f"{source}:{line}: " if line is not None and source else (f"line {line}: " if line else "")
        super().__init__(where + message)
        self.line = line
        self.row: Any = None  # the parsed row, when the line was valid JSON (read_jsonl sets it)


@dataclass
class Example:
    """One row, normalized: image paths resolved, and a conversation whose assistant turns are the targets."""

    kind: Literal["caption", "vqa", "conversation"]
    images: list[Path]
    messages: list[dict[str, str]]  # ends with the target answer when the row has one
    references: list[str] = field(default_factory=list)  # every reference answer / caption (for metrics)
    row: dict[str, Any] = field(default_factory=dict)  # the row as read, all fields kept
    line: int | None = None
    offset: int | None = None  # where the row's line starts in its JSONL file, in bytes

    @property
    def prompt(self) -> str:
        """The first user turn (the question, or the caption instruction)."""
        return next(m["content"] for m in self.messages if m["role"] == "user")

    @property
    def placeholders(self) -> bool:
        """Whether `<image>` in the row's text marks where its images go (see `has_placeholders`)."""
        return has_placeholders(self.kind)

    @property
    def has_target(self) -> bool:
        return bool(self.messages) and self.messages[-1]["role"] == "assistant"


def has_placeholders(kind: str) -> bool:
    """Whether `<image>` in the text of a row of this kind marks where its images go: in conversations, where the data
    format documents it; in a question it is plain text, like any other special token written in it."""
    return kind == "conversation"


def _image_paths(row: dict[str, Any], base: Path) -> list[Path]:
    images = row.get("image")
    if images is None:
        return []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise RowError("'image' must be a path or a list of paths")
    return [base / i for i in images]


def _most_common(answers: list[str]) -> str:
    """VQA rows with several references train on the most common one (the first among ties)."""
    counts = Counter(answers)
    return max(answers, key=lambda a: counts[a])


def _as_list(value: Any, name: str) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise RowError(f"'{name}' must be a non-empty string or list of strings")
    return values


def parse_row(
    row: Any, base: Path, caption_prompt: str, require_target: bool = True, line: int | None = None
) -> Example:
    """One JSON row to an `Example`; raises `RowError` saying what is wrong with it."""
    try:
        if not isinstance(row, dict):
            raise RowError("a row must be a JSON object")
        images = _image_paths(row, base)
        if "conversations" in row:
            turns = row["conversations"]
            if not isinstance(turns, list) or not turns:
                raise RowError("'conversations' must be a non-empty list of turns")
            messages = []
            for t in turns:
                role = _ROLES.get(t.get("role", t.get("from")) if isinstance(t, dict) else None)
                content = t.get("content", t.get("value")) if isinstance(t, dict) else None
                if role is None or not isinstance(content, str):
                    raise RowError("each turn needs a role (user/assistant/system, or from: human/gpt) and content")
                messages.append({"role": role, "content": content})
            if require_target and not any(m["role"] == "assistant" for m in messages):
                raise RowError("the conversation has no assistant turn to learn from")
            refs = [m["content"] for m in messages if m["role"] == "assistant"][-1:]
            return Example("conversation", images, messages, refs, row, line)
        if "question" in row:
            question = row["question"]
            if not isinstance(question, str) or not question.strip():
                raise RowError("'question' must be a non-empty string")
            messages = [{"role": "user", "content": question}]
            refs: list[str] = []
            if "answer" in row:
                refs = _as_list(row["answer"], "answer")
                messages.append({"role": "assistant", "content": _most_common(refs)})
            elif require_target:
                raise RowError("the question has no answer")
            return Example("vqa", images, messages, refs, row, line)
        if "caption" in row or (not require_target and images):
            messages = [{"role": "user", "content": caption_prompt}]
            refs = []
            if "caption" in row:
                refs = _as_list(row["caption"], "caption")
                messages.append({"role": "assistant", "content": refs[0]})
            if not images:
                raise RowError("a caption row needs an image")
            return Example("caption", images, messages, refs, row, line)
        raise RowError("the row has none of 'caption', 'question'/'answer' or 'conversations'")
    except RowError as e:
        if e.line is None and line is not None:
            raise RowError(str(e), line) from None
        raise


class JsonLine(NamedTuple):
    """One non-blank line of a JSONL file: its number (from 1, blank lines counted), where it starts (in bytes),
    and its value, or None and why it is not one (`error`)."""

    number: int
    offset: int
    value: Any
    error: str | None


def _raw_lines(f: BinaryIO) -> Iterator[tuple[int, bytes | None]]:
    """`(offset, bytes)` for every line of a binary file, newline removed, read `_CHUNK_BYTES` at a time; bytes is
    None for a line longer than `MAX_LINE_BYTES`, whose bytes are skipped rather than kept. A byte-order mark at the
    start is skipped."""
    chunk = f.read(_CHUNK_BYTES)
    start = offset = len(_BOM) if chunk.startswith(_BOM) else 0
    parts, size = [], 0
    while chunk:
        while (end := chunk.find(b"\n", start)) >= 0:
            size += end - start
            yield offset, (b"".join([*parts, chunk[start:end]]) if size <= MAX_LINE_BYTES else None)
            offset, parts, size, start = offset + size + 1, [], 0, end + 1
        size += len(chunk) - start
        parts = [*parts, chunk[start:]] if size <= MAX_LINE_BYTES else []
        chunk, start = f.read(_CHUNK_BYTES), 0
    if size:
        yield offset, (b"".join(parts) if size <= MAX_LINE_BYTES else None)


def _decode(raw: bytes | None) -> tuple[Any, str | None]:
    """A line's bytes -> (value, None), or (None, why it is not a JSON value)."""
    if raw is None:
        return None, f"line longer than {MAX_LINE_BYTES:,} bytes"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"bad JSON ({e.msg})"
    except RecursionError:
        return None, "bad JSON (nested too deeply)"
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        return None, f"bad JSON ({str(e).split(':')[0]})"


def json_lines(path: str | Path, what: str = "data file") -> Iterator[JsonLine]:
    """A `JsonLine` for each non-blank line of a JSONL file (UTF-8, optional byte-order mark). Lines that are too
    long, not UTF-8 or not JSON come with an `error`; only a missing or unreadable file (named `what`) raises."""
    with open_regular(path, what) as f:
        for number, (offset, raw) in enumerate(_raw_lines(f), start=1):
            if raw is not None and not raw.strip():
                continue
            yield JsonLine(number, offset, *_decode(raw))


def read_jsonl(
    path: str | Path, caption_prompt: str = "Describe the image.", require_target: bool = True
) -> Iterator[Example | RowError]:
    """Yields one `Example` per line, or the `RowError` for a line that is broken (too long, not UTF-8, bad JSON,
    missing fields); raises `VLMError` when the file is missing, not a regular file, or has no rows at all.

    Broken rows are yielded, not raised, so callers count and report them and go on. Image files are not
    opened here: a missing or corrupt image surfaces when the image is loaded.
    """
    path = Path(path)
    yield from _parsed_lines(
        path, lambda value, number: parse_row(value, path.parent, caption_prompt, require_target, number)
    )


def _parsed_lines(path: Path, parse: Callable[[Any, int], Any]) -> Iterator[Any]:
    """`parse(value, line number)` of every line of a JSONL file that reads as JSON, with the line's offset set, or
    the `RowError` of a broken line; raises `VLMError` when the file has no rows at all."""
    rows = 0
    for line in json_lines(path):
        rows += 1
        if line.error is not None:
            yield RowError(line.error, line.number)
            continue
        try:
            parsed = parse(line.value, line.number)
        except RowError as e:
            e.row = line.value
            yield e
            continue
        parsed.offset = line.offset
        yield parsed
    if not rows:
        raise VLMError(f"no rows in {path}")


@dataclass
class PreferencePair:
    """One preference row, `{"image": ..., "prompt": ..., "chosen": ..., "rejected": ...}`: two answers to one prompt
    about the same images, the first preferred. Any other field is kept in `row`."""

    images: list[Path]
    prompt: str
    chosen: str
    rejected: str
    row: dict[str, Any] = field(default_factory=dict)
    line: int | None = None
    offset: int | None = None

    def messages(self, answer: str) -> list[dict[str, str]]:
        """The conversation of the prompt and one of its answers."""
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": answer}]


def parse_pair(row: Any, base: Path, line: int | None = None) -> PreferencePair:
    """One JSON row to a `PreferencePair`; raises `RowError` saying what is wrong with it (a missing or empty field,
    or chosen and rejected answers that are the same text, which teach nothing)."""
    if not isinstance(row, dict):
        raise RowError("a row must be a JSON object", line)
    try:
        images = _image_paths(row, base)
    except RowError as e:
        raise RowError(str(e), line) from None
    for name in ("prompt", "chosen", "rejected"):
        value = row.get(name)
        if not isinstance(value, str) or not value.strip():
            raise RowError(f"'{name}' must be a non-empty string", line)
    if row["chosen"].strip() == row["rejected"].strip():
        raise RowError("'chosen' and 'rejected' are the same answer", line)
    return PreferencePair(images, row["prompt"], row["chosen"], row["rejected"], row, line)


def read_pairs(path: str | Path) -> Iterator[PreferencePair | RowError]:
    """Yields one `PreferencePair` per line of a preference JSONL file, or the `RowError` of a broken line (as
    `read_jsonl` does); raises `VLMError` when the file is missing, not a regular file, or has no rows at all."""
    path = Path(path)
    yield from _parsed_lines(path, lambda value, number: parse_pair(value, path.parent, number))


def single_image_rows(
    path: str | Path,
    kind: str | None = None,
    keep: Callable[[Example], str | None] | None = None,
    limit: int | None = None,
    caption_prompt: str = "Describe the image.",
) -> tuple[list[Example], dict[str, int]]:
    """The first `limit` rows of a JSONL file that have exactly one image (and are of `kind`, e.g. "vqa", if given,
    and pass `keep`, which returns why a row is left out or None), and how many rows were left out, by reason
    ("broken", the other kinds, "not_one_image", `keep`'s reasons). For tools that read one image per row: baselines,
    probes, diagnostics. Raises `VLMError` when no row is left."""
    rows: list[Example] = []
    skipped: dict[str, int] = {}
    for ex in read_jsonl(path, caption_prompt):
        if limit is not None and len(rows) >= limit:
            break
        if isinstance(ex, RowError):
            why = "broken"
        elif kind is not None and ex.kind != kind:
            why = ex.kind
        elif len(ex.images) != 1:
            why = "not_one_image"
        else:
            why = keep(ex) if keep is not None else None
        if why is None:
            rows.append(ex)
        else:
            skipped[why] = skipped.get(why, 0) + 1
    if not rows:
        counts = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())) or "empty"
        what = {"vqa": "question rows", "caption": "caption rows"}.get(kind or "", "rows")
        raise VLMError(f"no single-image {what} in {path} ({counts})")
    return rows, dict(sorted(skipped.items()))


# ---- Hugging Face datasets ----------------------------------------------------------------------------------------


def open_hf_dataset(spec: str, split: str, streaming: bool = False, **kwargs: Any) -> tuple[Any, Path]:
    """Opens a Hugging Face dataset; returns (dataset, the folder relative image paths are read from).

    Args:
        spec: A folder written by `datasets` `save_to_disk`, a .parquet, .arrow, .json or .csv file, an image folder
            with a metadata file (`imagefolder`), or a dataset name on the hub.
        split: The split to read (a single data file is its own "train" split).
        streaming: Open a `datasets.IterableDataset` instead of loading the data.
        **kwargs: More keyword arguments for `datasets.load_dataset` (e.g. `name`, `cache_dir`).

    Raises `VLMError` in one line for data that is missing or cannot be loaded.
    """
    import datasets  # heavy: only when a dataset is actually opened

    path = Path(spec)
    try:
        if path.is_dir() and any((path / f).is_file() for f in _SAVED_DATASET_FILES):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise VLMError(f"{spec} has no split {split!r}; it has {', '.join(ds)}")
                ds = ds[split]
            return (ds.to_iterable_dataset(num_shards=max(1, min(64, len(ds) // 1000))) if streaming else ds), path
        if path.suffix in _DATA_FILES and path.is_file():
            builder = _DATA_FILES[path.suffix]
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=streaming, **kwargs)
            return ds, path.parent
        if path.is_dir():
            ds = datasets.load_dataset("imagefolder", data_dir=str(path), split=split, streaming=streaming, **kwargs)
            return ds, path
        if path.suffix in _DATA_FILES or spec.startswith((".", "/")):
            raise VLMError(f"data not found: {spec}")
        ds = datasets.load_dataset(spec, split=split, streaming=streaming, **kwargs)
        return ds, Path.cwd()
    except VLMError:
        raise
    except Exception as e:  # datasets raises many types (hub, format, split errors); report them as one line
        raise VLMError(f"cannot load dataset {spec!r} (split {split!r}): {str(e).splitlines()[0]}") from e


def example_from_record(
    record: dict[str, Any], columns: dict[str, str], base: Path, caption_prompt: str, where: str
) -> tuple[Example, list[Any]]:
    """A dataset record -> (`Example`, its images): columns renamed to the JSONL fields, then `parse_row`.

    Args:
        record: One row of a dataset, as `datasets` yields it.
        columns: JSONL field (image, caption, question, answer, conversations) -> the dataset's column; fields not
            mapped are read from columns of their own name.
        base: The folder relative image paths are read from.
        caption_prompt: The instruction of caption rows.
        where: The row's place in the data, prefixed to error messages.

    The images are returned as found: paths (resolved against `base`), PIL images or `{"bytes", "path"}` dicts, for
    `load_row_images`. Raises `RowError` (prefixed with `where`) for a broken row.
    """
    row = dict(record)
    for name, column in columns.items():
        if column not in record:
            raise RowError(f"{where}: no column {column!r} (mapped to {name!r}); columns: {', '.join(record)}")
        row.pop(column)
        row[name] = record[column]
    value = row.get("image")
    items = [] if value is None else value if isinstance(value, list) else [value]
    in_memory = [None if isinstance(item, str) else item for item in items]
    if items:
        # parse_row validates paths; in-memory images get a stand-in name and are put back after.
        row["image"] = [item if isinstance(item, str) else f"<image {k}>" for k, item in enumerate(items)]
    else:
        row.pop("image", None)
    try:
        example = parse_row(row, base, caption_prompt)
    except RowError as e:
        raise RowError(f"{where}: {e}") from None
    return example, [path if obj is None else obj for path, obj in zip(example.images, in_memory)]


def load_row_images(images: list[Any]) -> list[Image.Image]:
    """The images of a row as RGB PIL images.

    Args:
        images: Paths (opened safely by `vlm.images.load_image`), PIL images, or datasets' `{"bytes", "path"}`
            dicts, as `example_from_record` returns them.

    Raises `VLMError` for a missing, corrupt or unsupported image.
    """
    import io

    from PIL import Image

    from vlm.images import load_image, to_rgb

    out = []
    for item in images:
        if isinstance(item, Path):
            out.append(load_image(item))
        elif isinstance(item, Image.Image):
            out.append(to_rgb(item))
        elif isinstance(item, dict) and item.get("bytes"):
            try:
                img = Image.open(io.BytesIO(item["bytes"]))
                img.load()
            except (OSError, ValueError, SyntaxError) as e:
                raise VLMError(f"corrupt image bytes ({e})") from None
            out.append(to_rgb(img))
        elif isinstance(item, dict) and item.get("path"):
            out.append(load_image(item["path"]))
        else:
            raise VLMError(f"unsupported image value of type {type(item).__name__}")
    return out
