"""Atomic file writes, an advisory lock, and the JSON readers whose errors name the file and line.

Writes: a reader (or a resumed run) sees the old file or the new one, never half of one.

Every writer goes through `write_atomic`: the bytes go to a temporary file in the same
directory, are flushed and fsynced, and the file is renamed over its final name
(`os.replace` is atomic within a file system); a failure removes the temporary file.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from radis.errors import InputError


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Run `write(file)` on a temp file beside `path`, fsync it, rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # ".tmp-" first: the rationale store removes such leftovers of a killed run at start
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; outputs are for everyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Indented UTF-8 JSON with a trailing newline."""
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, records: Sequence[dict]) -> None:
    """One JSON object per line."""

    def write(f: IO[bytes]) -> None:
        for rec in records:
            f.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))

    write_atomic(path, write)


@contextmanager
def exclusive_flock(f: IO) -> Iterator[bool]:
    """An exclusive flock on the open lock file `f`, held for the `with` block; yields
    whether it is held (False where the platform or file system has none: then the
    caller's atomic rename alone keeps its output whole, and concurrent builders each
    build, the loser of the rename discarding its copy)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield False
        return
    try:
        fcntl.flock(f, fcntl.LOCK_EX)
    except OSError:  # e.g. a file system without locks
        yield False
        return
    try:
        yield True
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)


class FileFormatError(InputError):
    """A user-supplied file that is not what its reader expects (named, with the line)."""


def read_user_text(path: str | os.PathLike, what: str = "file") -> str:
    """The UTF-8 text (a BOM dropped) of a user-supplied file; FileFormatError naming it
    when it is missing, a directory, unreadable or not UTF-8."""
    path = Path(path)
    if path.is_dir():
        raise FileFormatError(f"{what} {path}: is a directory, expected a file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileFormatError(f"{what} {path}: no such file") from None
    except UnicodeDecodeError as err:
        raise FileFormatError(f"{what} {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise FileFormatError(f"{what} {path}: cannot read ({err.strerror or err})") from None


def cut_torch_file(err: BaseException) -> str | None:
    """torch's own first sentence for a torch file that is cut short (a truncated zip
    archive: "PytorchStreamReader failed reading zip archive: failed finding central
    directory"; an empty pickle: "Ran out of input"), which names neither the file nor
    the cause; None for any other error. One test for the model loader and the
    checkpoint loader, which each name the file."""
    if isinstance(err, EOFError) or (isinstance(err, RuntimeError) and "PytorchStreamReader" in str(err)):
        return str(err).split(". ")[0][:200] or type(err).__name__
    return None


def read_json_object(path: str | os.PathLike, hint: str = "") -> dict | None:
    """The JSON object in `path`, None when there is no such file; ValueError naming the
    file (and `hint`: what to do about it) when it is not a JSON object."""
    path = Path(path)
    if not path.is_file():
        return None
    tail = f"; {hint}" if hint else ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}){tail}") from None
    if not isinstance(data, dict):  # bad input, not a programming error: ValueError like the rest
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}{tail}")  # noqa: TRY004
    return data


def iter_jsonl_objects(path: str | os.PathLike, what: str = "a JSON object") -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a JSON Lines file; FileFormatError
    naming the file and line for a line that is not valid JSON or not an object.

    Lines end at "\n" only (a "\r" before it is JSON whitespace): str.splitlines would
    also cut at U+2028, U+2029 and U+0085, which `write_jsonl_atomic` (ensure_ascii=False)
    leaves raw inside strings.
    """
    path = Path(path)
    text = read_user_text(path)
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            problem = multiline_json_problem(text, lineno)
            raise FileFormatError(f"{path}:{lineno}: {problem or f'invalid JSON: {err}'}") from None
        if not isinstance(rec, dict):
            raise FileFormatError(f"{path}:{lineno}: expected {what}, got {type(rec).__name__}")
        yield lineno, rec


def multiline_json_problem(text: str, lineno: int, array_ok: bool = False) -> str | None:
    """What is wrong with line `lineno` of JSON Lines `text` (split at "\n"), when it does
    not parse because it opens a JSON object or array that ends on a later line (a
    pretty-printed file); None otherwise. `array_ok`: the reader takes a whole-file JSON
    array too. Called on the error path only: it decodes the rest of the file. Without
    it such a file reads as "malformed JSON line 1:2", which says nothing of what the
    file should have been."""
    start = sum(len(line) + 1 for line in text.split("\n", lineno - 1)[: lineno - 1])
    pos = len(text) - len(text[start:].lstrip())
    try:
        value, end = json.JSONDecoder().raw_decode(text, pos)
    except (ValueError, RecursionError):
        return None
    last = text.count("\n", 0, end) + 1
    if last == lineno or not isinstance(value, (dict, list)):
        return None
    kind = "object" if isinstance(value, dict) else "array"
    whole = not text[:start].strip() and not text[end:].strip()  # the file is this one value
    expected = "a JSON array or JSON Lines" if array_ok and whole else "JSON Lines (one record per line)"
    return (f"expected {expected}, found {'one' if whole else 'an'} {kind} over several lines (lines {lineno}-{last}); "
            "write each record on one line")


def json_type_name(value: Any) -> str:
    """A JSON value's type as an error names it: "a number", "a list", "an object", ...
    (JSON's names, not Python's: the user wrote JSON)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    names = {str: "a string", list: "a list", dict: "an object"}
    return next((name for kind, name in names.items() if isinstance(value, kind)), type(value).__name__)


def text_field(where: str, key: str, value: Any, required: bool = True, empty: str | None = None) -> str | None:
    """The text of field `key` of a user file's record (`where`: the file and line), as
    given; None for an optional field that is absent (None). FileFormatError naming
    `where` and `key` for a value that is not a string ("got a number (42)": a number is
    not an empty prompt) or is blank (`empty`, default "field 'key' must be a non-empty
    string"; a missing CSV cell, None, is blank too)."""
    if value is None and not required:
        return None
    if value is not None and not isinstance(value, str):
        raise FileFormatError(f"{where}: field {key!r} must be a string, got {json_type_name(value)} ({value!r:.60})")
    if not (value or "").strip():
        raise FileFormatError(f"{where}: {empty or f'field {key!r} must be a non-empty string'}, got {value!r}")
    return value


class AppendOnlyJsonl:
    """A JSONL file that records are appended to as they arrive (answers, judgments), so a
    run killed halfway keeps everything finished before the kill.

    Each line is written whole, flushed and fsynced; a last line cut short by a kill is
    dropped when the file is read again (and overwritten by the next append). Not for
    several writers at once: one process writes (rank 0), under `lock` when it is threaded.
    """

    def __init__(self, path: str | os.PathLike):
        import threading

        self.path = Path(path)
        self.lock = threading.Lock()

    def read(self) -> list[dict]:
        """Every complete record, in file order; a torn last line is cut off the file."""
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        records, good = [], 0
        for line in data.splitlines(keepends=True):
            try:
                rec = json.loads(line) if line.endswith(b"\n") else None
            except ValueError:
                rec = None
            if not isinstance(rec, dict):
                break  # a kill mid-line: everything after it is lost anyway
            records.append(rec)
            good += len(line)
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)
        return records

    def append(self, records: Sequence[dict]) -> None:
        if not records:
            return
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
