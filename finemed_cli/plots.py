"""Shared by every command that draws: matplotlib without a display, and PNGs written atomically (a reader
never sees half a file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path) -> Path:
    """Write `fig` to `path` (via a temporary file) and close it."""
    from finemed_cli.data.output import atomic_file

    plt = pyplot()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
