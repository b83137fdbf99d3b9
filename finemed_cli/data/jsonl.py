"""JSONL input and output: errors that name `path:line`, and appends that survive Ctrl-C and kill.

Outputs are written one complete line per `os.write` on an `O_APPEND` descriptor and fsynced, so a killed
process leaves at most one torn last line (one that does not parse); `JsonlAppender` cuts such a tail off at
its first write and reports the ids already written, so a rerun resumes without duplicates.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson

from finemed_cli.errors import DataError

logger = logging.getLogger(__name__)

T = TypeVar("T")
MAX_REPORTED_ERRORS = 20


class RecordError(ValueError):
    """Raised by a record parser for one bad record; `read_records` adds the path and line."""


def check_input_file(path: str | os.PathLike[str], what: str = "a file") -> Path:
    """`path` as an input file finemed may read: it exists and is a regular file.

    Raises:
        DataError: missing, a folder, or a pipe, device or socket (`answer <(cat q.jsonl)`): finemed reads its
            inputs more than once (to hash them, to resume), which a pipe cannot give, and `/dev/zero` never ends.
    """
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p}: is a folder; give {what}")
    if p.exists() and not p.is_file():
        raise DataError(f"{p}: is a pipe or device, not a regular file; finemed reads its inputs more than once: "
                        "save it to a file first (e.g. `cat … > questions.jsonl`)")
    if not p.is_file():
        raise DataError(f"{p}: no such file; check the path")
    return p


def iter_jsonl(path: str | os.PathLike[str], errors: list[str] | None = None) -> Iterator[tuple[int, Any]]:
    """Yield `(line_number, parsed_json)` for every non-blank line of a JSONL file.

    Args:
        path: the file.
        errors: when given, bad lines are described here and skipped instead of raising.

    Raises:
        DataError: the file is missing, or (without `errors`) a line is not UTF-8 or not valid JSON,
            naming `path:line`.
    """
    p = check_input_file(path, "a JSONL file")
    try:
        f = p.open("rb")
    except OSError as e:
        raise DataError(f"{p}: cannot read it ({e.strerror}); check its permissions") from None
    with f:
        for number, raw in enumerate(f, start=1):
            line = raw.strip()
            if number == 1 and line.startswith(b"\xef\xbb\xbf"):  # a byte-order mark (Windows editors)
                line = line[3:].strip()
            if not line:
                continue
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                message = f"{p}:{number}: {_describe_json_error(line, e)}"
                if errors is None:
                    raise DataError(message) from None
                errors.append(message)
                continue
            yield number, value


def _describe_json_error(line: bytes, error: Exception) -> str:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as u:
        bad = line[u.start : u.start + 1].hex()
        return (
            f"not valid UTF-8 (byte 0x{bad} at column {u.start + 1}); "
            "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        )
    return f"invalid JSON ({error}); each line must be one complete JSON object"


def read_records(path: str | os.PathLike[str], parse: Callable[[dict[str, Any]], T]) -> list[T]:
    """Read and validate every record of a JSONL file, reporting all bad lines at once.

    Args:
        path: the JSONL file.
        parse: turns one JSON object into a record; raises `RecordError` naming the field.

    Raises:
        DataError: with one `path:line: …` line per problem (the first 20), for bad JSON, non-objects,
            failed validation, duplicate ids or an empty file.
    """
    p = Path(path)
    records: list[T] = []
    errors: list[str] = []
    first_line: dict[str, int] = {}
    for number, value in iter_jsonl(p, errors):
        if not isinstance(value, dict):
            errors.append(f"{p}:{number}: expected a JSON object, got {type(value).__name__}")
            continue
        try:
            record = parse(value)
        except RecordError as e:
            errors.append(f"{p}:{number}: {e}")
            continue
        rid = record.id  # type: ignore[attr-defined]
        if rid in first_line:
            errors.append(
                f"{p}:{number}: duplicate id {rid!r} (first at line {first_line[rid]}); ids must be unique"
            )
            continue
        first_line[rid] = number
        records.append(record)
    if errors:
        more = f"\n… and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
        raise DataError("\n".join(errors[:MAX_REPORTED_ERRORS]) + more)
    if not records:
        raise DataError(f"{p}: no records (the file is empty); write one JSON object per line")
    return records


class JsonlAppender:
    """Appends records to a JSONL file one complete line at a time, and knows which ids it holds.

    Opening only reads: it collects the ids already written (so callers skip them) and notes a torn last
    line left by a killed writer. The file is touched at the first append, never before, so a run that fails
    while loading leaves its output as it was: the folders are made then, a torn tail (a last line that does
    not parse) is cut off with a warning, and a complete last record without its newline (written by another
    tool) is kept and given one. OS errors are one line naming the file and the fix.
    """

    def __init__(self, path: str | os.PathLike[str], fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.done_ids: set[str] = set()
        self._fd = -1
        self._keep: int | None = None  # bytes to keep when the tail is torn
        self._needs_newline = False
        self._scan()

    def _scan(self) -> None:
        from finemed_cli.data.output import os_error

        try:
            if not self.path.exists():
                return
            if self.path.is_dir():
                raise DataError(f"{self.path}: the output is a folder; give a file path")
            data = self.path.read_bytes()
        except OSError as e:
            raise os_error(e, self.path) from None
        lines = data.split(b"\n")
        tail = lines.pop()  # after the last newline: b"" when the file ends with one
        if tail.strip():
            value = _parse_or_none(tail)
            if value is None:
                self._keep = len(data) - len(tail)
            else:
                lines.append(tail)
                self._needs_newline = True
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                value = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                raise DataError(
                    f"{self.path}:{number}: existing output line is not valid JSON ({e}); "
                    "fix or remove that line, or write to a new file"
                ) from None
            if not isinstance(value, dict) or not isinstance(value.get("id"), str):
                raise DataError(
                    f"{self.path}:{number}: existing output line has no string 'id'; "
                    "this is not a finemed output file: write to a new file"
                )
            self.done_ids.add(value["id"])

    def _open(self) -> None:
        from finemed_cli.data.output import ensure_parent, os_error

        ensure_parent(self.path)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if self._keep is not None:
                logger.warning("%s: dropped an incomplete last line (%d bytes) left by an interrupted run",
                               self.path, os.fstat(self._fd).st_size - self._keep)
                os.ftruncate(self._fd, self._keep)
                self._keep = None
            if self._needs_newline:
                os.write(self._fd, b"\n")
                self._needs_newline = False
        except OSError as e:
            raise os_error(e, self.path) from None

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line, durably."""
        self._write(orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
        self.done_ids.add(record["id"])

    def append_many(self, records: list[dict[str, Any]]) -> None:
        """Write several records in one write: a killed writer leaves all of them or none."""
        self._write(b"".join(orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n" for r in records))
        self.done_ids.update(r["id"] for r in records)

    def _write(self, data: bytes) -> None:
        from finemed_cli.data.output import os_error

        if self._fd < 0:
            self._open()
        try:
            written = os.write(self._fd, data)
            if written != len(data):  # a short write (disk full): undo it rather than leave a torn line
                os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
                raise DataError(f"{self.path}: short write ({written} of {len(data)} bytes); the disk is full? "
                                "Free some space and rerun (finished records are kept)")
            if self.fsync:
                os.fsync(self._fd)
        except OSError as e:
            raise os_error(e, self.path) from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_or_none(raw: bytes) -> Any:
    """The JSON value of a line, or None when it does not parse (a torn write)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
