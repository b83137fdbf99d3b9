"""The few GGUF metadata values finemed needs before llama.cpp opens a file, read from the header alone.

gguf-py's `GGUFReader` parses every key, the vocabulary arrays included, into numpy views: 2.1 s for the
embedded SmolLM2 (49,152 tokens and 48,900 merges). The scalars come first in a GGUF, before those arrays, so
reading key by key and stopping at the one wanted takes well under a millisecond.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gguf import GGUF_MAGIC, GGUFValueType, Keys

_SCALARS = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
            GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
            GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
            GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}


def _values(buf: Any) -> Iterator[tuple[str, Any]]:
    """(key, value) in file order; an array's value is None (skipped, not read)."""
    magic, _version, _tensors, count = struct.unpack_from("<IIQQ", buf, 0)
    if magic != GGUF_MAGIC:  # not a GGUF, or a big-endian one: the caller goes without
        return
    pos = 24

    def skip(kind: int, at: int) -> tuple[Any, int]:
        if kind == GGUFValueType.STRING:
            (n,) = struct.unpack_from("<Q", buf, at)
            return bytes(buf[at + 8:at + 8 + n]).decode("utf-8", errors="replace"), at + 8 + n
        if kind == GGUFValueType.ARRAY:
            item, n = struct.unpack_from("<IQ", buf, at)
            at += 12
            if item in _SCALARS:
                return None, at + n * struct.calcsize(_SCALARS[GGUFValueType(item)])
            for _ in range(n):
                _, at = skip(item, at)
            return None, at
        fmt = _SCALARS[GGUFValueType(kind)]
        return struct.unpack_from(fmt, buf, at)[0], at + struct.calcsize(fmt)

    for _ in range(count):
        (n,) = struct.unpack_from("<Q", buf, pos)
        key = bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8", errors="replace")
        (kind,) = struct.unpack_from("<I", buf, pos + 8 + n)
        value, pos = skip(kind, pos + 12 + n)
        yield key, value


def gguf_context_length(path: str | os.PathLike[str]) -> int | None:
    """The context the model was trained on (`<arch>.context_length`); None when the file does not say, or is
    not a readable GGUF (llama.cpp then reports it when it opens the file)."""
    try:
        with open(Path(path), "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            arch = None
            for key, value in _values(buf):
                if key == Keys.General.ARCHITECTURE:
                    arch = value
                elif arch is not None and key == Keys.LLM.CONTEXT_LENGTH.format(arch=arch):
                    return int(value) if isinstance(value, int) and value > 0 else None
    except (OSError, ValueError, struct.error):  # ValueError: an empty file (mmap), an unknown value type
        return None
    return None
