"""A GGUF writer that never leaves a partial file under the final name."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finemed_cli.data.output import atomic_file, ensure_parent


@contextlib.contextmanager
def gguf_writer(output: Path, arch: str) -> Iterator[Any]:
    """A `gguf.GGUFWriter` on a temporary name beside `output`, renamed over it when the block completes;
    on any error the partial file is removed and `output` is untouched."""
    import gguf

    ensure_parent(output)
    with atomic_file(output) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        try:
            yield writer
        finally:
            writer.close()
