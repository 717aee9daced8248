"""Tests for vlm/files.py: a file or folder appears complete under its name or not at all."""

from __future__ import annotations

import json
import os

import pytest
from conftest import finishes_within

from vlm.errors import VLMError
from vlm.files import atomic_file, atomic_folder, check_input_file, read_json, write_json, write_jsonl, write_text


class Boom(Exception):
    pass


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "out.txt"
    write_text(path, "old\n")
    with pytest.raises(Boom), atomic_file(path) as f:
        f.write("half of the new")
        raise Boom
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_writes_text_json_and_jsonl(tmp_path):
    write_json(tmp_path / "a" / "r.json", {"accuracy": 0.5, "name": "café"})
    assert json.loads((tmp_path / "a" / "r.json").read_text(encoding="utf-8")) == {"accuracy": 0.5, "name": "café"}
    write_jsonl(tmp_path / "p.jsonl", ({"i": i} for i in range(3)))
    assert (tmp_path / "p.jsonl").read_text().splitlines() == ['{"i": 0}', '{"i": 1}', '{"i": 2}']
    with atomic_file(tmp_path / "b.bin", "wb") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


def test_a_folder_is_replaced_whole_and_can_keep_files_put_beside_it(tmp_path):
    out = tmp_path / "model"
    with atomic_folder(out) as tmp:
        (tmp / "weights").write_text("v1")
        assert not out.exists()  # nothing under the name until the block ends
    (out / "README.md").write_text("card")
    with atomic_folder(out, keep_extra=True) as tmp:
        (tmp / "weights").write_text("v2")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "weights"]
    assert (out / "weights").read_text() == "v2"
    with atomic_folder(out) as tmp:
        (tmp / "weights").write_text("v3")
    assert [p.name for p in out.iterdir()] == ["weights"]
    assert oct(out.stat().st_mode & 0o777) == "0o755" and oct((out / "weights").stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failed_folder_write_keeps_the_old_folder(tmp_path):
    out = tmp_path / "model"
    with atomic_folder(out) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(Boom), atomic_folder(out) as tmp:
        (tmp / "weights").write_text("half")
        raise Boom
    assert (out / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_exist_ok_keeps_a_copy_another_process_finished_first(tmp_path):
    out = tmp_path / "cache"
    with atomic_folder(out, exist_ok=True) as tmp:
        (tmp / "f").write_text("mine")
        out.mkdir()  # another process publishes the same folder meanwhile
        (out / "f").write_text("theirs")
    assert (out / "f").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_free_folder_refuses_a_folder_with_files_in_it(tmp_path):
    from vlm.errors import VLMError
    from vlm.files import free_folder

    assert free_folder(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert free_folder(tmp_path / "empty") == tmp_path / "empty"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(VLMError, match="already exists and is not empty"):
        free_folder(tmp_path / "full")


def test_read_json_names_the_file_it_cannot_read(tmp_path):
    write_json(tmp_path / "good.json", {"name": "café"})
    assert read_json(tmp_path / "good.json") == {"name": "café"}
    (tmp_path / "latin1.json").write_bytes('{"name": "café"}'.encode("latin-1"))
    (tmp_path / "broken.json").write_text('{"name": ')
    cases = {
        "latin1.json": "latin1.json is not UTF-8 text (byte 0xe9 at offset 13)",
        "broken.json": "bad JSON in .*broken.json: Expecting value (line 1, column 10)",
        "missing.json": "cannot read .*missing.json: No such file or directory",
    }
    for name, message in cases.items():
        with pytest.raises(VLMError, match=message.replace("(", r"\(").replace(")", r"\)")):
            read_json(tmp_path / name)


def test_a_file_is_written_below_folders_that_do_not_exist_yet(tmp_path):
    write_text(tmp_path / "new" / "deeper" / "out.txt", "hi\n")
    assert (tmp_path / "new" / "deeper" / "out.txt").read_text() == "hi\n"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("folder", "output {path} is a folder; give a file name"),
        ("x" * 256, "output name too long (256 bytes; the limit is 255): {path}"),
        ("blocker/out.txt", "cannot create the folder {parent}: File exists"),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_anything_is(tmp_path, name, message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "blocker").write_text("a file where a folder is wanted")
    path = tmp_path / name
    with pytest.raises(VLMError) as err, atomic_file(path) as f:
        f.write("never")
    assert str(err.value) == message.format(path=path, parent=path.parent)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "folder"]


def test_a_name_of_exactly_the_limit_is_written(tmp_path):
    write_text(tmp_path / ("y" * 255), "ok")  # the temporary file beside it needs a shorter name of its own
    assert (tmp_path / ("y" * 255)).read_text() == "ok"
    assert [p.name for p in tmp_path.iterdir()] == ["y" * 255]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_only_regular_files_are_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe")  # opening it to read would block until a writer came
    (tmp_path / "data.txt").write_text("x")
    assert check_input_file(tmp_path / "data.txt", "input") == tmp_path / "data.txt"
    for path, message in [
        (tmp_path / "pipe", "input {path} is a named pipe, not a regular file"),
        (tmp_path, "input {path} is a folder, not a regular file"),
        (tmp_path / "absent", "input not found: {path}"),
        (tmp_path / ("z" * 300), "input name too long (300 bytes; the limit is 255): {path}"),
    ]:
        with pytest.raises(VLMError) as err:
            finishes_within(30, lambda path=path: check_input_file(path, "input"))
        assert str(err.value) == message.format(path=path)
