"""The one reader of the project's JSONL data format, used by training, evaluation and batch inference.

A dataset is a JSONL file; image paths are relative to the file's folder. Each line is one of:
    {"image": "img/1.png", "caption": "a red circle"}                      caption (a list: several references)
    {"image": "img/1.png", "question": "what colour?", "answer": "red"}   VQA (answer may be a list)
    {"image": ["a.png", "b.png"], "conversations": [{"role": "user", "content": "<image>\\n<image>\\nCompare."},
                                                    {"role": "assistant", "content": "..."}]}
LLaVA's spelling of turns (`{"from": "human"|"gpt", "value": ...}`) is accepted; `image` may be absent for
text-only rows; any other field is kept. For inference, a question row needs no answer and an image row
needs no caption.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlm.errors import VLMError

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


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

    @property
    def prompt(self) -> str:
        """The first user turn (the question, or the caption instruction)."""
        return next(m["content"] for m in self.messages if m["role"] == "user")

    @property
    def has_target(self) -> bool:
        return bool(self.messages) and self.messages[-1]["role"] == "assistant"


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


def read_jsonl(
    path: str | Path, caption_prompt: str = "Describe the image.", require_target: bool = True
) -> Iterator[Example | RowError]:
    """Yields one `Example` per line, or the `RowError` for a line that is broken (bad JSON, missing fields).

    Broken rows are yielded, not raised, so callers count and report them and go on. Image files are not
    opened here: a missing or corrupt image surfaces when the image is loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise VLMError(f"data file not found: {path}")
    base = path.parent
    with path.open(encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield RowError(f"bad JSON ({e.msg})", number)
                continue
            try:
                yield parse_row(row, base, caption_prompt, require_target, number)
            except RowError as e:
                e.row = row
                yield e
