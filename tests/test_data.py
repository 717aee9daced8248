"""Tests for the JSONL reader (vlm/data.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import finishes_within
from hypothesis import given, settings
from hypothesis import strategies as st

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
    # Only a conversation's `<image>` places an image (the format documents it there); in a question it is text.
    assert [caption.placeholders, vqa.placeholders, conversation.placeholders] == [False, False, True]


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


@pytest.mark.parametrize("content", [b"", b"\n", b"  \n\n\t\r\n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\n \n"])
def test_a_file_with_no_rows_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(VLMError) as err:
        _read(path)
    assert str(err.value) == f"no rows in {path}"


def test_a_file_of_broken_rows_is_not_empty(tmp_path):
    path = _write(tmp_path / "d.jsonl", ["{oops"])
    assert [str(e) for e in _read(path)] == ["line 1: bad JSON (Expecting property name enclosed in double quotes)"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_as_data_file_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(VLMError) as err:
        finishes_within(30, lambda: _read(tmp_path / "pipe.jsonl"))
    assert str(err.value) == f"data file {tmp_path / 'pipe.jsonl'} is a named pipe, not a regular file"


def test_a_byte_order_mark_is_not_part_of_the_first_row(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"question": "a?", "answer": "b"}\r\n{"question": "c?", "answer": "d"}\r\n')
    first, second = _read(path)
    assert (first.line, first.prompt, first.offset) == (1, "a?", 3)
    assert (second.line, second.prompt) == (2, "c?")


def test_a_line_that_is_not_utf8_is_one_broken_row_and_reading_goes_on(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = '{"question": "a?", "answer": "b"}\n'
    path.write_bytes(good.encode() + '{"question": "caf\u00e9?", "answer": "b"}\n'.encode("latin-1") + good.encode())
    rows = _read(path)
    assert [type(r).__name__ for r in rows] == ["Example", "RowError", "Example"]
    assert str(rows[1]) == "line 2: not valid UTF-8 (byte 0xe9 at column 18)"
    assert rows[2].line == 3


def test_a_line_above_the_limit_is_a_broken_row(tmp_path, monkeypatch):
    import vlm.data

    monkeypatch.setattr(vlm.data, "_CHUNK_BYTES", 16)  # lines span many chunks
    monkeypatch.setattr(vlm.data, "MAX_LINE_BYTES", 100)
    at_limit = json.dumps({"question": "q" * 60, "answer": "b"})  # 91 bytes, padded to 100
    at_limit = at_limit[:-1] + " " * (100 - len(at_limit)) + "}"
    assert len(at_limit) == 100
    over = json.dumps({"question": "x" * 200, "answer": "b"})
    path = _write(tmp_path / "long.jsonl", [at_limit, at_limit + " ", {"question": "c?", "answer": "d"}, over])
    rows = _read(path)
    assert [r.line for r in rows] == [1, 2, 3, 4]
    assert isinstance(rows[0], Example) and isinstance(rows[2], Example)
    assert [str(rows[k]) for k in (1, 3)] == [
        "line 2: line longer than 100 bytes",
        "line 4: line longer than 100 bytes",
    ]


def test_a_50_mb_line_is_never_held_whole(tmp_path):
    import tracemalloc

    path = tmp_path / "huge.jsonl"
    with path.open("wb") as f:
        f.write(b'{"question": "')
        for _ in range(50):
            f.write(b"x" * (1 << 20))
        f.write(b'", "answer": "b"}\n{"question": "c?", "answer": "d"}\n')
    tracemalloc.start()
    try:
        rows = _read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(rows[0]) == "line 1: line longer than 1,048,576 bytes"
    assert rows[1].prompt == "c?"
    assert peak < 4 * (1 << 20), f"{peak:,} bytes held while reading"


def test_lines_json_cannot_read_are_broken_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"[" * 100_000 + b"\n" + b"9" * 5000 + b'\n"\\ud800"\n')
    deep, digits, surrogate = _read(path)
    assert str(deep) == "line 1: bad JSON (nested too deeply)"
    if hasattr(sys, "set_int_max_str_digits"):  # Python 3.11 on; 3.10 reads the number, not an object either
        assert str(digits) == "line 2: bad JSON (Exceeds the limit (4300 digits) for integer string conversion)"
    else:
        assert str(digits) == "line 2: a row must be a JSON object"
    assert str(surrogate) == "line 3: a row must be a JSON object"  # JSON allows it; the row is still broken


def test_offsets_point_at_each_row(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"question": f"q{i}?", "answer": "é"} for i in range(3)])
    data = path.read_bytes()
    for ex in _read(path):
        assert json.loads(data[ex.offset :].split(b"\n")[0]) == ex.row


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


# ---- Hugging Face datasets: opening, records -> rows, row images -------------------------------------------------


def test_importing_the_reader_does_not_import_datasets():
    import subprocess
    import sys

    code = "import sys, vlm.data; assert 'datasets' not in sys.modules and 'lightning' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_example_from_record_maps_columns_and_keeps_in_memory_images(tmp_path):
    from PIL import Image

    from vlm.data import example_from_record

    columns = {"image": "img", "question": "q", "answer": "a"}
    picture = Image.new("RGB", (4, 4))
    record = {"img": picture, "q": "what?", "a": ["x", "y", "x"], "id": 7}
    ex, images = example_from_record(record, columns, tmp_path, PROMPT, "d[0]")
    assert ex.kind == "vqa" and ex.references == ["x", "y", "x"]
    assert ex.messages[-1] == {"role": "assistant", "content": "x"}  # the most common answer
    assert images == [picture] and ex.row["id"] == 7 and "img" not in ex.row
    ex, images = example_from_record({"img": ["a.png", "b/c.png"], "q": "?", "a": "z"}, columns, tmp_path, PROMPT, "w")
    assert images == [tmp_path / "a.png", tmp_path / "b" / "c.png"]
    text_only, images = example_from_record({"question": "2+2?", "answer": "4"}, {}, tmp_path, PROMPT, "w")
    assert images == [] and text_only.kind == "vqa"

    with pytest.raises(RowError, match=r"^d\[3\]: no column 'img' \(mapped to 'image'\); columns: q, a$"):
        example_from_record({"q": "?", "a": "z"}, columns, tmp_path, PROMPT, "d[3]")
    with pytest.raises(RowError, match=r"^d\[4\]: .*'answer' must be"):
        example_from_record({"img": "a.png", "q": "?", "a": None}, columns, tmp_path, PROMPT, "d[4]")


def test_load_row_images_takes_paths_pil_images_and_datasets_dicts(tmp_path):
    import io

    from PIL import Image

    from vlm.data import load_row_images

    Image.new("RGB", (3, 2), (255, 0, 0)).save(tmp_path / "red.png")
    buffer = io.BytesIO()
    Image.new("L", (5, 5), 128).save(buffer, format="PNG")
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    items = [
        tmp_path / "red.png",
        rgba,
        {"bytes": buffer.getvalue(), "path": None},
        {"bytes": None, "path": str(tmp_path / "red.png")},
    ]
    out = load_row_images(items)
    assert [im.mode for im in out] == ["RGB"] * 4
    assert [im.size for im in out] == [(3, 2), (2, 2), (5, 5), (3, 2)]
    assert out[0].getpixel((0, 0)) == (255, 0, 0) and out[1].getpixel((0, 0)) == (255, 255, 255)  # alpha on white
    with pytest.raises(VLMError, match="corrupt image bytes"):
        load_row_images([{"bytes": b"not a png", "path": None}])
    with pytest.raises(VLMError, match="image not found"):
        load_row_images([tmp_path / "absent.png"])
    with pytest.raises(VLMError, match="unsupported image value of type int"):
        load_row_images([3])


def test_open_hf_dataset_reads_saved_folders_and_data_files(tmp_path):
    import datasets

    from vlm.data import open_hf_dataset

    table = datasets.Dataset.from_dict({"q": ["a?", "b?"], "a": ["x", "y"]})
    datasets.DatasetDict({"validation": table}).save_to_disk(str(tmp_path / "saved"))
    table.to_parquet(str(tmp_path / "t.parquet"))
    ds, base = open_hf_dataset(str(tmp_path / "saved"), "validation")
    assert base == tmp_path / "saved" and ds["q"] == ["a?", "b?"]
    ds, base = open_hf_dataset(str(tmp_path / "t.parquet"), "test", cache_dir=str(tmp_path / "cache"))
    assert base == tmp_path and ds["a"] == ["x", "y"]  # a single file is its own split
    stream, _ = open_hf_dataset(str(tmp_path / "saved"), "validation", streaming=True)
    assert isinstance(stream, datasets.IterableDataset) and [r["q"] for r in stream] == ["a?", "b?"]

    with pytest.raises(VLMError, match="has no split 'train'; it has validation"):
        open_hf_dataset(str(tmp_path / "saved"), "train")
    with pytest.raises(VLMError, match="data not found"):
        open_hf_dataset(str(tmp_path / "absent.parquet"), "train")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(VLMError, match=r"^cannot load dataset .*bad.parquet' \(split 'train'\): ") as e:
        open_hf_dataset(str(tmp_path / "bad.parquet"), "train", cache_dir=str(tmp_path / "cache"))
    assert "\n" not in str(e.value)


# ---- property: whatever bytes a JSONL file holds, the reader yields rows or RowErrors, and finishes ---------------

_FRAGMENTS = [
    b"\n",
    b"\r\n",
    b"\r",
    b"\xef\xbb\xbf",
    b'{"question": "q?", "answer": "a"}',
    b'{"image": "x.png", "caption": "c"}',
    b'{"conversations": [{"from": "human", "value": "hi"}]}',
    b"\xff\xc3",  # not UTF-8
    b'"\\ud800"',  # a lone surrogate
    b"x" * 300,  # with the limit patched to 256 below, a line above it
]


@settings(max_examples=150, deadline=None)
@given(content=st.binary(max_size=400) | st.lists(st.sampled_from(_FRAGMENTS) | st.binary(max_size=8)).map(b"".join))
def test_any_bytes_as_jsonl_give_rows_or_row_errors(tmp_path_factory, content):
    import vlm.data

    path = tmp_path_factory.mktemp("fuzz") / "d.jsonl"
    path.write_bytes(content)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vlm.data, "MAX_LINE_BYTES", 256)
        patch.setattr(vlm.data, "_CHUNK_BYTES", 64)
        try:
            rows = finishes_within(10, lambda: _read(path))
        except VLMError as e:  # the one error: a file without rows
            assert str(e) == f"no rows in {path}"
            assert not content.removeprefix(b"\xef\xbb\xbf").strip()
            return
    assert all(isinstance(r, (Example, RowError)) for r in rows)
    numbers = [r.line for r in rows]
    lines = content.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    assert numbers == sorted(set(numbers)) and len(rows) == sum(1 for line in lines if line.strip())
