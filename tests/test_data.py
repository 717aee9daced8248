"""Tests for the JSONL reader (vlm/data.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlm.data import Example, RowError, parse_row, read_jsonl
from vlm.errors import VLMError

PROMPT = "Describe the image."


def _write(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _read(path: Path, require_target: bool = True) -> list[Example | RowError]:
    return list(read_jsonl(path, PROMPT, require_target))


def test_the_three_row_kinds(tmp_path):
    convo = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\n<image>\nCompare."},
        {"role": "assistant", "content": "same"},
    ]
    path = _write(
        tmp_path / "data.jsonl",
        [
            {"image": "img/1.png", "caption": "a red circle", "id": 7},
            {"image": "img/2.png", "question": "what colour?", "answer": "red"},
            {"image": ["a.png", "b.png"], "conversations": convo},
        ],
    )
    caption, vqa, conversation = _read(path)
    assert caption.kind == "caption" and caption.line == 1
    assert caption.images == [tmp_path / "img" / "1.png"]
    assert caption.messages == [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "a red circle"}]
    assert caption.references == ["a red circle"] and caption.prompt == PROMPT
    assert caption.row == {"image": "img/1.png", "caption": "a red circle", "id": 7}  # every field kept
    assert vqa.kind == "vqa" and vqa.line == 2
    assert vqa.messages == [{"role": "user", "content": "what colour?"}, {"role": "assistant", "content": "red"}]
    assert vqa.prompt == "what colour?" and vqa.has_target
    assert conversation.kind == "conversation"
    assert conversation.images == [tmp_path / "a.png", tmp_path / "b.png"]
    assert conversation.messages == convo
    assert conversation.references == ["same"]
    assert conversation.prompt == "<image>\n<image>\nCompare."


def test_llava_spelling(tmp_path):
    row = {
        "image": "x.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Colour?"},
            {"from": "gpt", "value": "Black."},
        ],
    }
    ex = parse_row(row, tmp_path, PROMPT)
    assert [m["role"] for m in ex.messages] == ["user", "assistant", "user", "assistant"]
    assert ex.messages[3]["content"] == "Black."
    assert ex.references == ["Black."]


def test_list_answers_train_on_the_most_common(tmp_path):
    ex = parse_row({"question": "q?", "answer": ["two", "2", "2", "two", "2"]}, tmp_path, PROMPT)
    assert ex.messages[-1] == {"role": "assistant", "content": "2"}
    assert ex.references == ["two", "2", "2", "two", "2"]
    tie = parse_row({"question": "q?", "answer": ["b", "a", "a", "b"]}, tmp_path, PROMPT)
    assert tie.messages[-1]["content"] == "b"  # the first among ties
    captions = parse_row({"image": "i.png", "caption": ["first", "second"]}, tmp_path, PROMPT)
    assert captions.messages[-1]["content"] == "first" and captions.references == ["first", "second"]


def test_text_only_rows(tmp_path):
    vqa = parse_row({"question": "2+2?", "answer": "4"}, tmp_path, PROMPT)
    assert vqa.images == [] and vqa.kind == "vqa"
    chat = parse_row(
        {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, tmp_path, PROMPT
    )
    assert chat.images == []


def test_inference_rows_need_no_target(tmp_path):
    path = _write(tmp_path / "in.jsonl", [{"image": "a.png", "question": "what?"}, {"image": "b.png"}])
    question, image = _read(path, require_target=False)
    assert question.messages == [{"role": "user", "content": "what?"}] and not question.has_target
    assert image.kind == "caption" and image.messages == [{"role": "user", "content": PROMPT}]
    assert all(isinstance(e, RowError) for e in _read(path, require_target=True))


@pytest.mark.parametrize("folder", ["sub", "sub/deeper"])
def test_relative_paths_resolve_against_the_jsonl_folder(tmp_path, folder, monkeypatch):
    data_dir = tmp_path / folder
    data_dir.mkdir(parents=True)
    _write(data_dir / "d.jsonl", [{"image": "img/x.png", "caption": "c"}, {"image": "/abs/y.png", "caption": "c"}])
    monkeypatch.chdir(tmp_path)
    relative, absolute = _read(Path(folder) / "d.jsonl")
    assert relative.images == [Path(folder) / "img" / "x.png"]
    assert relative.images[0].resolve() == (data_dir / "img" / "x.png").resolve()
    assert absolute.images == [Path("/abs/y.png")]


BROKEN = [
    ("{not json", "bad JSON"),
    ('["a", "list"]', "JSON object"),
    ({"image": "a.png"}, "none of 'caption'"),
    ({"image": "a.png", "question": "what?"}, "no answer"),
    ({"image": "a.png", "question": "", "answer": "x"}, "'question' must be a non-empty string"),
    ({"image": "a.png", "question": "  ", "answer": "x"}, "'question' must be a non-empty string"),
    ({"image": "a.png", "question": 5, "answer": "x"}, "'question' must be a non-empty string"),
    ({"image": "a.png", "question": "q", "answer": []}, "'answer' must be"),
    ({"image": "a.png", "question": "q", "answer": ["ok", 3]}, "'answer' must be"),
    ({"image": "a.png", "caption": ""}, "'caption' must be"),
    ({"caption": "no image"}, "needs an image"),
    ({"image": 5, "caption": "c"}, "'image' must be a path"),
    ({"image": ["a.png", ""], "caption": "c"}, "'image' must be a path"),
    ({"image": {"path": "a.png"}, "caption": "c"}, "'image' must be a path"),
    ({"conversations": []}, "non-empty list"),
    ({"conversations": "hi"}, "non-empty list"),
    ({"conversations": [{"role": "robot", "content": "x"}]}, "each turn needs a role"),
    ({"conversations": [{"role": "user"}]}, "each turn needs a role"),
    ({"conversations": ["hi"]}, "each turn needs a role"),
    ({"conversations": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
]


def test_broken_rows_are_yielded_with_their_line_numbers(tmp_path):
    good = {"image": "ok.png", "caption": "fine"}
    rows = []
    for bad, _ in BROKEN:
        rows += [good, bad]
    path = _write(tmp_path / "mixed.jsonl", rows)
    out = _read(path)
    assert len(out) == 2 * len(BROKEN)
    for i, (_, message) in enumerate(BROKEN):
        ok, err = out[2 * i], out[2 * i + 1]
        assert isinstance(ok, Example) and ok.line == 2 * i + 1
        assert isinstance(err, RowError) and isinstance(err, VLMError)
        assert err.line == 2 * i + 2
        assert str(err).startswith(f"line {2 * i + 2}: ")
        assert message in str(err), (str(err), message)
        assert "\n" not in str(err)


def test_blank_lines_are_skipped_but_counted(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"question": "a?", "answer": "b"}\n\n   \n{"question": "c?", "answer": "d"}\n', encoding="utf-8")
    assert [e.line for e in _read(path)] == [1, 4]


def test_missing_data_file(tmp_path):
    with pytest.raises(VLMError, match="data file not found"):
        _read(tmp_path / "missing.jsonl")


def test_unicode_rows(tmp_path):
    path = _write(tmp_path / "u.jsonl", [{"question": "¿qué color? 你好", "answer": "rojo ✓"}])
    (ex,) = _read(path)
    assert ex.prompt == "¿qué color? 你好" and ex.references == ["rojo ✓"]


def test_broken_rows_carry_the_row_they_came_from(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"id": 4, "question": ""}, "[1, 2]", "{oops"])
    empty, not_object, bad_json = _read(path)
    assert empty.row == {"id": 4, "question": ""}
    assert not_object.row == [1, 2]
    assert bad_json.row is None
