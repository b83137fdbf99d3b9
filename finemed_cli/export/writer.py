"""A GGUF writer that never leaves a partial file under the final name."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def gguf_writer(output: Path, arch: str) -> Iterator[Any]:
    """A `gguf.GGUFWriter` on a temporary name beside `output`, renamed over it when the block completes;
    on any error the partial file is removed and `output` is untouched."""
    import gguf

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        yield writer
        writer.close()
        os.replace(tmp, output)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
