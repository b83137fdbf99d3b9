"""Safe outputs: every verb that writes checks, locks and creates its outputs through this module.

The rules, for every output a verb writes (a file, or a directory it fills or replaces):

- it is never one of the inputs (the same file under any spelling: symlinks, hard links, `./x`), never lies
  inside an input directory (the index, the model), and a directory that will be *replaced* never holds an
  input;
- a second run writing the same output stops at once, naming the first (`OutputLock`, an advisory
  `filelock` lock in `$FINEMED_HOME/locks/`, which works on Windows too and leaves nothing beside the output);
- nothing is created or changed until the caller says so (`ensure_parent` at the first write), so a run that
  fails while loading its inputs, index or model leaves the output as it was;
- every OS error becomes one line naming the path and the fix (`os_error`);
- a whole file is written under a temporary name beside it and renamed over it (`atomic_file`,
  `atomic_write`), so a reader sees the old file or the new one, never half of one; the temporary is removed
  on any error or signal, and one left by a killed run (`kill -9`) is removed by the next run that takes the
  output's lock (`sweep_temporaries`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import orjson

from finemed_cli.errors import DataError
from finemed_cli.paths import finemed_home

logger = logging.getLogger(__name__)

_FIXES = {
    errno.EACCES: "no permission to write there; choose a writable location",
    errno.EPERM: "no permission to write there; choose a writable location",
    errno.EROFS: "the file system is read-only; choose a writable location",
    errno.ENOSPC: "the disk is full; free some space and rerun (finished records are kept)",
    errno.EDQUOT: "the disk quota is exhausted; free some space and rerun (finished records are kept)",
    errno.ENOENT: "a folder on the way does not exist and cannot be made; check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "it is a folder; give a file path",
    errno.EEXIST: "something is already there; choose another path",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
}


def os_error(error: OSError, path: str | os.PathLike[str] | None = None) -> DataError:
    """One line for an OS error: the path, what went wrong, and the fix."""
    where = path if path is not None else (error.filename or "?")
    fix = _FIXES.get(error.errno or -1, "check the path and the disk")
    return DataError(f"{where}: {error.strerror or error}; {fix}")


def _resolved(path: str | os.PathLike[str]) -> Path:
    # realpath, not Path.resolve: a symlink loop resolves to where it stops instead of raising
    return Path(os.path.realpath(os.path.abspath(Path(path).expanduser())))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return _resolved(a) == _resolved(b)


def _inside(path: Path, directory: Path) -> bool:
    p, d = _resolved(path), _resolved(directory)
    return p != d and d in p.parents


def check_output(path: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str] | None] = (),
                 kind: str = "file", replaces: bool = False, what: str = "output") -> Path:
    """Check that `path` may be written as this run's output, creating nothing.

    Args:
        path: the output file or directory.
        inputs: the run's input files and directories (None entries are skipped).
        kind: "file" or "dir".
        replaces: a directory output that is deleted and written anew (it may then hold no input).
        what: how the error names the path ("output", "--rejects", …).

    Raises:
        DataError: the output is an input, lies inside an input directory, holds an input it would replace,
            is a directory where a file is expected (or the reverse), or its folder cannot be written.
    """
    out = Path(path).expanduser()
    for raw in inputs:
        if raw is None:
            continue
        src = Path(raw).expanduser()
        if (src.exists() and out.exists() and _same_file(out, src)) or _resolved(out) == _resolved(src):
            raise DataError(f"{out}: the {what} is the input {src}; writing it would destroy the input: choose "
                            "another output path")
        if src.is_dir() and _inside(out, src):
            raise DataError(f"{out}: the {what} lies inside the input folder {src}; write it elsewhere")
        if replaces and _inside(src, out):
            raise DataError(f"{out}: the {what} folder holds the input {src} and would be replaced; choose "
                            "another output folder")
    _check_kind(out, kind, what)
    _check_writable_location(out, what)
    return out


def _check_kind(out: Path, kind: str, what: str) -> None:
    """What is already at `out` is what this run may replace: a regular file (or a folder, for a folder
    output), or nothing. A device, FIFO or socket is refused, as SQLite refuses them: finemed writes by renaming
    a temporary file over the name, which would swap `/dev/null` for a file, and a FIFO would block forever."""
    if out.is_symlink() and not out.exists():
        raise DataError(f"{out}: the {what} is a broken symbolic link (or a loop of links); remove it or choose "
                        "another path")
    if kind == "file" and out.is_dir():
        raise DataError(f"{out}: the {what} is a folder; give a file path")
    if kind == "dir" and out.exists() and not out.is_dir():
        raise DataError(f"{out}: the {what} must be a folder, but a file is there; choose another path")
    if out.exists() and not out.is_dir() and not out.is_file():
        raise DataError(f"{out}: the {what} is not a regular file (a device, pipe or socket); finemed writes "
                        "whole files and would replace it: choose a regular file path")


def _check_writable_location(out: Path, what: str) -> None:
    """The nearest existing ancestor of `out` is a folder we may write into."""
    ancestor = Path(os.path.abspath(out)).parent
    while not ancestor.exists():
        if ancestor.is_symlink():  # a dangling link: mkdir would fail on it
            raise DataError(f"{out}: the folder {ancestor} is a broken symbolic link; fix it or choose another "
                            f"{what} path")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DataError(f"{out}: {ancestor} is a file, not a folder; check the {what} path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise DataError(f"{out}: no permission to write into {ancestor}; choose a writable location")
    with contextlib.suppress(OSError, AttributeError):  # statvfs: not on Windows
        if os.statvfs(ancestor).f_flag & os.ST_RDONLY:
            raise DataError(f"{out}: {ancestor} is on a read-only file system; choose a writable location")


def ensure_parent(path: str | os.PathLike[str]) -> None:
    """Make the folders above `path` (the moment of first write), OS errors as one line."""
    parent = Path(path).expanduser().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, path) from None


def ensure_dir(path: str | os.PathLike[str]) -> Path:
    """Make the output folder `path` (the moment of first write), OS errors as one line."""
    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, p) from None
    return p


def _lock_files(path: Path) -> tuple[Path, Path]:
    key = hashlib.sha256(str(_resolved(path)).encode()).hexdigest()[:20]
    folder = finemed_home() / "locks"
    return folder / f"{key}.lock", folder / f"{key}.json"


class OutputLock:
    """An advisory lock on one output path for the length of a run.

    A second `finemed` run on the same output (any spelling) stops at once with the first run's process id,
    host and command. The lock lives in `$FINEMED_HOME/locks/` (nothing is created beside the output) and is
    released by the OS if the holder dies, so `kill -9` never leaves a stale lock.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self._lock_path, self._info_path = _lock_files(self.path)
        self._lock: object | None = None

    def acquire(self) -> OutputLock:
        from filelock import FileLock, Timeout

        try:
            self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise os_error(e, self._lock_path.parent) from None
        lock = FileLock(str(self._lock_path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise DataError(f"{self.path} is being written by another finemed run ({self._holder()}); wait "
                            "for it to finish, or write to another output") from None
        self._lock = lock
        sweep_temporaries(self.path)  # ours now: what a killed writer left beside it can go
        info = {"path": str(_resolved(self.path)), "pid": os.getpid(), "host": socket.gethostname(),
                "command": " ".join(sys.argv), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        with contextlib.suppress(OSError):  # the lock holds without it; only the message is poorer
            tmp = self._info_path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(orjson.dumps(info))
            os.replace(tmp, self._info_path)
        return self

    def _holder(self) -> str:
        try:
            info = orjson.loads(self._info_path.read_bytes())
            return f"process {info['pid']} on {info['host']} since {info['since']}: {info['command'][:120]}"
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError):
            return "process unknown"

    def release(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self._info_path.unlink()
            self._lock.release()  # type: ignore[attr-defined]
            self._lock = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def guarded_outputs(outputs: Iterable[str | os.PathLike[str] | None]) -> Iterator[None]:
    """Hold an `OutputLock` on every output (in a fixed order, so two runs cannot deadlock) for the block."""
    paths = sorted({_resolved(p) for p in outputs if p is not None}, key=str)
    with contextlib.ExitStack() as stack:
        for p in paths:
            stack.enter_context(OutputLock(p))
        yield


@contextlib.contextmanager
def output_slot(path: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str] | None] = (),
                kind: str = "file", replaces: bool = False, what: str = "output") -> Iterator[Path]:
    """`check_output` then an `OutputLock` for the block: how a verb claims one output before it loads."""
    out = check_output(path, inputs=inputs, kind=kind, replaces=replaces, what=what)
    with OutputLock(out):
        yield out


def temporary(path: str | os.PathLike[str], tag: str = "tmp") -> Path:
    """The temporary name beside `path` that this process writes before renaming it over `path`."""
    p = Path(path).expanduser()
    return p.with_name(f".{p.name}.{tag}{os.getpid()}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # another user's live process, or a platform without signal 0
        return True
    return True


def sweep_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries (`.NAME.<tag>PID`, as `temporary` names them) that a finemed process which no longer runs
    left beside `path` (a `kill -9`, a power cut); returns what it removed. Those of live processes stay."""
    p = Path(path).expanduser()
    # only the hidden names `temporary` makes: a user's own `answers.jsonl.old2019` backup is never touched
    pattern = re.compile(r"\." + re.escape(p.name) + r"\.(?:[a-z0-9]+\.)?(?:tmp|old)(\d+)")
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(p.parent if str(p.parent) else "."):
            m = pattern.fullmatch(entry.name)
            if m is None or _alive(int(m.group(1))):
                continue
            stale = Path(entry.path)
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(stale)
                else:
                    stale.unlink()
                removed.append(stale)
                logger.info("removed %s, left by a finemed run that was killed", stale)
    return removed


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside `path` to write the whole file into; renamed over `path` when the block ends,
    removed (and `path` untouched) when it raises, is interrupted or the run is terminated."""
    out = Path(path).expanduser()
    tmp = temporary(out)
    try:
        yield tmp
        os.replace(tmp, out)
    except OSError as e:
        raise os_error(e, out) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def atomic_write(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` as the whole of `path` (see `atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
