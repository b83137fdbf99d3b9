"""What finemed shows on the terminal: log lines with plain prefixes, finemed's own progress bars, and the
other libraries' bars and warnings kept out of the way unless asked for (`-v`).

Verbosity: -q (-1) warnings and errors only, no progress bars; default (0) finemed's info lines and bars;
-v (1) also the libraries' bars, warnings and info; -vv (2) debug lines with the logger's name.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

# Libraries whose info lines and warnings are noise at finemed's default verbosity.
_LIBRARIES = ("httpx", "urllib3", "filelock", "huggingface_hub", "sentence_transformers", "transformers", "gguf",
              "datasets", "accelerate", "torch", "matplotlib", "PIL", "uvicorn.error", "fsspec", "peft",
              "bitsandbytes")
_QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
              "TRANSFORMERS_VERBOSITY": "error"}
_level = 0
_env_set: set[str] = set()  # the variables configure() set (never one the user set)
_saved_filters: list[Any] | None = None


class PlainFormatter(logging.Formatter):
    """`message` for info, `warning: message`, `error: message`; debug lines name their logger."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.ERROR:
            return f"error: {text}"
        if record.levelno >= logging.WARNING:
            return f"warning: {text}"
        if record.levelno < logging.INFO:
            return f"debug {record.name}: {text}"
        if record.name.startswith("uvicorn"):  # its access and start-up lines keep their INFO tag, as users know
            return f"{record.levelname}:     {text}"
        return text


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is now (in-process runs and tests swap it), not the one at set-up."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure(verbosity: int) -> None:
    """Set up logging for this process at `verbosity` (-1 to 2); callable again (`-v` after the verb)."""
    global _level, _saved_filters
    _level = max(-1, min(2, verbosity))
    level = {-1: logging.WARNING, 0: logging.INFO, 1: logging.INFO, 2: logging.DEBUG}[_level]
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_finemed", False)), None)
    if handler is None:
        handler = _Stderr()
        handler._finemed = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    handler.setFormatter(PlainFormatter())
    root.setLevel(level)
    quiet_libraries = _level < 1
    for name in _LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR if quiet_libraries else level)
    if _saved_filters is None:
        _saved_filters = list(warnings.filters)
    if quiet_libraries:
        # Read by huggingface_hub, transformers (through huggingface_hub) and datasets when they are imported,
        # which the commands do later; a value the user set wins.
        for key, value in _QUIET_ENV.items():
            if key not in os.environ:
                os.environ[key] = value
                _env_set.add(key)
        warnings.simplefilter("ignore")  # libraries' deprecation and user warnings; finemed logs its own
    else:
        for key in list(_env_set):
            os.environ.pop(key, None)
            _env_set.discard(key)
        warnings.filters[:] = _saved_filters


def bars_shown() -> bool:
    """False under -q: finemed's own progress bars stay off too."""
    return _level >= 0


def libraries_shown() -> bool:
    """True under -v: other libraries' progress bars (e.g. sentence-transformers' `Batches`) may show."""
    return _level >= 1


def bar(iterable: Any = None, *, progress: bool = True, **kwargs: Any) -> Any:
    """A finemed progress bar (tqdm on stderr, sized to the terminal), off when `progress` is False or -q."""
    from tqdm import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=not (progress and bars_shown()), **kwargs)


@contextlib.contextmanager
def library_bars_off(module_name: str, attribute: str = "tqdm") -> Iterator[None]:
    """A library module's own `tqdm` silenced for the block, unless -v: a bar its progress-bar switch does not
    reach (transformers' 'Converting and de-quantizing GGUF tensors' is a plain tqdm.auto, which
    transformers.utils.logging.disable_progress_bar leaves on). TQDM_DISABLE cannot do it: tqdm reads it once,
    at import. A module that is gone or renamed leaves the bar as it is."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        module = None
    original = getattr(module, attribute, None)
    if libraries_shown() or original is None:
        yield
        return
    setattr(module, attribute, functools.partial(original, disable=True))
    try:
        yield
    finally:
        setattr(module, attribute, original)
