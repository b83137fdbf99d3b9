"""Where finemed keeps what it makes once and reuses ($FINEMED_HOME, default ~/.cache/finemed)."""

from __future__ import annotations

import os
from pathlib import Path


def finemed_home() -> Path:
    """The cache root: `$FINEMED_HOME`, else `~/.cache/finemed`."""
    return Path(os.environ.get("FINEMED_HOME") or Path.home() / ".cache" / "finemed").expanduser()
