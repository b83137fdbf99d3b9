"""A checkpoint's own files, read where a damaged one becomes one line naming it: its JSON configs and its
.safetensors weights (a download or copy cut short, a disk that filled up during `save_pretrained`).

A model folder's weights are checked here as the folder resolves (checkpoints/loading.py), and the readers open them
here too (the memory plan's header read, the export, the NF4 loader, peft adapters), so a truncated file is
reported the same way whichever verb meets it first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from finemed_cli.errors import ModelError


def read_json_object(path: str | os.PathLike[str], fix: str) -> dict[str, Any]:
    """The JSON object in `path`; anything else (not UTF-8, not JSON, a list) is a ModelError ending in `fix`."""
    p = Path(path)
    try:
        value = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
        what = getattr(e, "strerror", None) or " ".join(str(e).split())[:200]
        raise ModelError(f"{p}: not a readable JSON object ({what}); {fix}") from None
    if not isinstance(value, dict):
        raise ModelError(f"{p}: not a JSON object (a {type(value).__name__}); {fix}")
    return value


def corrupt_safetensors(path: str | os.PathLike[str], error: BaseException) -> ModelError:
    """One line for a .safetensors file that cannot be opened: which file, safetensors' reason, the fix."""
    why = " ".join(str(error).split()).removeprefix("Error while deserializing header: ")[:200]
    return ModelError(f"{path}: truncated or corrupt safetensors file ({why}); re-download or re-export it")


def open_safetensors(path: str | os.PathLike[str]) -> Any:
    """`safetensors.safe_open` on `path` (torch tensors). safetensors checks the header and that its offsets
    cover the file exactly, so a file cut short anywhere past its header is refused here, before any tensor is
    read.

    Raises:
        ModelError: the file is truncated, its header is not safetensors, or it cannot be read.
    """
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:  # OSError: a folder named *.safetensors, a read error
        raise corrupt_safetensors(path, e) from None


def check_safetensors(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Open each file's header and drop it (milliseconds: the tensors are not read), for readers that go
    through another library (transformers' `from_pretrained`, `safetensors.torch.load_file`).

    Raises:
        ModelError: as `open_safetensors`, for the first bad file.
    """
    for path in paths:
        with open_safetensors(path):
            pass
