"""`manifest.json` for every produced directory: inputs with hashes, config, package versions, seed."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

import orjson

MANIFEST = "manifest.json"
_PACKAGES = ("finemed", "torch", "transformers", "sentence-transformers", "hnswlib", "peft", "triton",
             "gguf", "llama_cpp_python")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def write_manifest(directory: str | os.PathLike[str], **fields: Any) -> Path:
    """Write `directory/manifest.json` with the given fields plus versions, machine and time."""
    body = {
        **fields,
        "versions": package_versions(),
        "machine": platform.machine(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    from finemed_cli.data.output import atomic_write

    return atomic_write(Path(directory) / MANIFEST, orjson.dumps(body, option=orjson.OPT_INDENT_2))


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    return orjson.loads((Path(directory) / MANIFEST).read_bytes())
