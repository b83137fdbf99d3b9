"""Shared by the benchmarks: append rows to bench/results/<name>.csv with the date, machine and versions."""

from __future__ import annotations

import csv
import datetime as dt
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
VERSIONS = ("finemed", "torch", "transformers", "gguf", "llama_cpp_python")


def append_results(name: str, columns: list[str], rows: list[list[object]]) -> Path:
    """Append `rows` (values for `columns`) to results/<name>.csv, each prefixed by date, machine and CPU
    count and followed by the package versions; the header is written when the file is new."""
    from finemed_cli.manifest import package_versions

    versions = package_versions()
    out = RESULTS / f"{name}.csv"
    new = not out.exists()
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    machine = platform.processor() or platform.machine()
    with out.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["date", "machine", "cpus", *columns, *VERSIONS])
        for row in rows:
            w.writerow([date, machine, os.cpu_count(), *row, *(versions.get(v, "-") for v in VERSIONS)])
    print(f"appended to {out}")
    return out
