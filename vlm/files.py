"""Safe reads and atomic writes of user paths.

Reads: `open_regular` opens only regular files, so a named pipe, device or socket given as an input is a one-line
error instead of a read that blocks forever; `read_json` reads JSON files back (a model folder's config.json and the
like) with errors that name the file. Writes: a file or folder appears complete under its name, or not at all (the old
one stays). Everything vlm writes for a user (checkpoint folders, converted GGUF caches, LLaVA exports, predictions,
reports, model cards, training checkpoints) goes through these, so an interrupted run never leaves half a file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO

from vlm.errors import VLMError

# The longest file or folder name, in bytes, that Linux, macOS and Windows file systems accept.
NAME_MAX = 255


def check_name_lengths(path: str | Path, what: str) -> Path:
    """`path` as a Path; a one-line `VLMError` when a name in it is longer than `NAME_MAX` bytes."""
    path = Path(path)
    for name in path.parts:
        size = len(os.fsencode(name))
        if size > NAME_MAX:
            raise VLMError(f"{what} name too long ({size} bytes; the limit is {NAME_MAX}): {path}")
    return path


def open_regular(path: str | Path, what: str = "file") -> BinaryIO:
    """Opens `path` for reading bytes only if it is a regular file (links followed); a one-line `VLMError` naming
    it as `what` ("image", "data file") otherwise: missing, a folder, or a named pipe, device or socket, which
    could block the read forever. The file is opened without blocking and checked on the open descriptor, so
    nothing can be swapped in between the check and the read."""
    path = check_name_lengths(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise VLMError(f"{what} not found: {path}") from None
    except OSError as e:
        raise VLMError(f"cannot open {what} {path}: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise VLMError(f"{what} {path} is {_kind(mode)}, not a regular file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def check_input_file(path: str | Path, what: str = "file") -> Path:
    """`path` as a Path if `open_regular` can open it (raises its one-line errors otherwise): for commands that
    check their inputs before the slow work (loading a model) begins."""
    open_regular(path, what).close()
    return Path(path)


def _kind(mode: int) -> str:
    """What a file that is not a regular file is, from its `st_mode`."""
    kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a named pipe", stat.S_ISSOCK: "a socket"}
    return next((name for test, name in kinds.items() if test(mode)), "a device")


def check_output_file(path: str | Path, what: str = "output") -> Path:
    """`path` as a Path if a file can be written there: no name longer than `NAME_MAX` bytes, and not an existing
    folder. A one-line `VLMError` otherwise, so a command refuses before it runs rather than when it writes."""
    path = check_name_lengths(path, what)
    if path.is_dir():
        raise VLMError(f"{what} {path} is a folder; give a file name")
    return path


# `atomic_file` writes NAME through `.NAME.PID.partial` beside it.
PARTIAL_SUFFIX = ".partial"
_PARTIAL = re.compile(r"^\..+\.(\d+)" + re.escape(PARTIAL_SUFFIX) + "$")


def _alive(pid: int) -> bool:
    """Whether a process `pid` exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_interrupted_writes(folder: str | Path) -> list[Path]:
    """Deletes the temporary files in `folder` that `atomic_file` calls that never finished left behind (their writer
    was killed): those named like its temporary files whose writer's pid is not running. Returns what it deleted."""
    folder = Path(folder)
    removed = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = _PARTIAL.match(path.name)
        if match and path.is_file() and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Opens a temporary file beside `path` (mode "w" for text in UTF-8, "wb" for bytes); when the block ends
    without an error it is flushed to disk and renamed onto `path`, otherwise it is removed. Missing folders above
    `path` are created; `check_output_file`'s errors are raised before anything is written."""
    path = check_output_file(path)
    _make_parent(path)
    tmp = path.with_name(f".{path.name[:200]}.{os.getpid()}{PARTIAL_SUFFIX}")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _make_parent(path: Path) -> None:
    """Creates the folders above `path`; a one-line `VLMError` when one cannot be (e.g. a file has its name)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VLMError(f"cannot create the folder {path.parent}: {e.strerror}") from None


def write_text(path: str | Path, text: str) -> None:
    """Writes `text` to `path` atomically."""
    with atomic_file(path) as f:
        f.write(text)


def write_json(path: str | Path, obj: Any) -> None:
    """Writes `obj` as indented JSON (UTF-8, non-ASCII kept) to `path` atomically."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_text(path: str | Path) -> str:
    """The text of the UTF-8 file `path` (a byte-order mark is allowed); a file that cannot be read or is not UTF-8
    is a VLMError naming it."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise VLMError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except OSError as e:
        raise VLMError(f"cannot read {path}: {e.strerror}") from None


def read_json(path: str | Path) -> Any:
    """The JSON document in the UTF-8 file `path`; a file that cannot be read, is not UTF-8 or is not JSON is a
    VLMError naming it."""
    path = Path(path)
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise VLMError(f"bad JSON in {path}: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # a number with too many digits, nesting too deep
        raise VLMError(f"bad JSON in {path}: {str(e)[:200] or 'nested too deeply'}") from None


def write_jsonl(path: str | Path, rows: Any) -> None:
    """Writes an iterable of JSON objects, one per line, to `path` atomically."""
    with atomic_file(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def free_folder(path: str | Path) -> Path:
    """`path` as a Path if nothing is there yet or only an empty folder (which `atomic_folder` replaces, losing
    nothing); VLMError otherwise, so that a command never writes over a folder it did not make."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise VLMError(f"output folder {path} already exists and is not empty")
    return path


@contextlib.contextmanager
def atomic_folder(path: str | Path, keep_extra: bool = False, exist_ok: bool = False) -> Iterator[Path]:
    """Yields an empty temporary folder beside `path`; when the block ends without an error the folder is moved onto
    `path` (an existing folder there is replaced in one rename; with `keep_extra`, files in it that the new folder
    lacks, such as a model card, are carried over), otherwise it is removed.

    `exist_ok`: another process may have written the same folder first (a cache); then its copy is kept.
    The folder gets ordinary permissions (755, files 644) rather than mkdtemp's owner-only ones.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        for f in tmp.rglob("*"):
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        if path.exists() and exist_ok:
            return
        if path.exists():
            if keep_extra:
                for extra in path.iterdir():
                    if not (tmp / extra.name).exists():
                        (shutil.copytree if extra.is_dir() else shutil.copy2)(extra, tmp / extra.name)
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, path)
            except OSError:
                if not (exist_ok and path.is_dir()):  # with exist_ok, another process finishing first is fine
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
