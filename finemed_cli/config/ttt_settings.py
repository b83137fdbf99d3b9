"""Tuned TTT settings that travel: the small JSON file `finemed ttt-calibrate` writes, read by `answer` and
`eval` (`--ttt-settings FILE`), and found by default as `ttt-settings.json` in the model's directory (a
trained model's final/) or beside the index. Options given on the command line win over the file."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from finemed_cli.config.answer import TTTConfig
from finemed_cli.errors import ConfigError

logger = logging.getLogger(__name__)

FILE_NAME = "ttt-settings.json"
FORMAT = "finemed-ttt-settings/1"
# what a settings file may set: every TTTConfig field but the LM-head chunking
FIELDS = ("mode", "k", "steps", "lr", "rank", "alpha", "layers", "targets", "loss_on", "max_length", "pad_to",
          "min_sim")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_KINDS = {"mode": lambda v: isinstance(v, str), "loss_on": lambda v: isinstance(v, str),
          "k": _int, "steps": _int, "rank": _int, "max_length": _int, "pad_to": _int,
          "lr": lambda v: _int(v) or isinstance(v, float), "alpha": lambda v: _int(v) or isinstance(v, float),
          "layers": lambda v: v is None or _int(v) or v in ("all", "a quarter"),
          "targets": lambda v: isinstance(v, list) and bool(v) and all(isinstance(t, str) for t in v),
          "min_sim": lambda v: v is None or _int(v) or isinstance(v, float)}
_WANT = {k: "a whole number" for k in ("k", "steps", "rank", "max_length", "pad_to")} | {
    "mode": "a string", "loss_on": "a string", "lr": "a number", "alpha": "a number",
    "layers": "a whole number, \"all\" or null", "targets": "a list of projection names",
    "min_sim": "a number or null"}


def find_ttt_settings(value: str | Path | None, model_dir: str | Path | None,
                      index_dir: str | Path | None) -> Path | None:
    """The settings file a run uses: `value` (a path; "auto": ttt-settings.json in the model's directory,
    else beside the index; None or "none": no file)."""
    if value is None or str(value) == "none":
        return None
    if str(value) != "auto":
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"--ttt-settings {value}: no such file; make one with `finemed ttt-calibrate`")
        return path
    for where in (model_dir, index_dir):
        if where is not None and (Path(where) / FILE_NAME).is_file():
            return Path(where) / FILE_NAME
    return None


def load_ttt_settings(path: Path) -> dict[str, Any]:
    """The `ttt` settings of a file, checked."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a readable TTT settings file ({e}); rerun `finemed ttt-calibrate`") \
            from None
    ttt = body.get("ttt") if isinstance(body, dict) else None
    if not isinstance(body, dict) or body.get("format") != FORMAT or not isinstance(ttt, dict):
        raise ConfigError(f"{path}: not a {FORMAT} file (no 'format' and 'ttt'); rerun `finemed ttt-calibrate`")
    unknown = sorted(set(ttt) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{path}: unknown TTT settings {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    for key, value in ttt.items():
        if not _KINDS[key](value):
            raise ConfigError(f"{path}: 'ttt.{key}' is {value!r}, not {_WANT[key]}; fix the file or rerun "
                              "`finemed ttt-calibrate`")
    return ttt


def apply_ttt_settings(base: TTTConfig, settings: dict[str, Any], explicit: tuple[str, ...] = ()) -> TTTConfig:
    """`base` with a settings file's values, except the fields in `explicit` (given on the command line). A
    file's steps and learning rate belong to its mode: a run in another mode (paper instead of lora) keeps
    its own (one LoRA step at 3e-3 would be 3000× the paper's full-parameter rate)."""
    mode = base.mode if "mode" in explicit else settings.get("mode", base.mode)
    values = {k: (tuple(v) if k == "targets" else v) for k, v in settings.items() if k not in explicit
              and not (k in ("steps", "lr") and mode != settings.get("mode", mode))}
    if values.get("layers") == "all":
        values["layers"] = 0
    if values.get("layers") == "a quarter":
        values["layers"] = None
    try:
        out = dataclasses.replace(base, **values)
    except TypeError as e:
        raise ConfigError(f"TTT settings file: {e}") from None
    problems = out.validate()
    if problems:
        raise ConfigError("TTT settings file: " + "; ".join(problems))
    return out


def write_ttt_settings(path: Path, ttt: dict[str, Any], variant: str, chosen_by: dict[str, Any]) -> Path:
    body = {"format": FORMAT, "variant": variant, "ttt": ttt, "chosen_by": chosen_by}
    from finemed_cli.data.output import atomic_write

    return atomic_write(path, (json.dumps(body, indent=1) + "\n").encode("utf-8"))


def with_ttt_settings(config: Any, model_dir: str | Path | None) -> Any:
    """`config` (any run config with `ttt`, `ttt_settings`, `ttt_explicit` and `index`) with its TTT settings
    file applied (`--ttt-settings FILE`, or found beside the model in `model_dir` or the index); `ttt_settings`
    then names the file used, or "none". Options given on the command line (`ttt_explicit`) win."""
    path = find_ttt_settings(config.ttt_settings, model_dir, config.index)
    if path is None:
        return dataclasses.replace(config, ttt_settings="none")
    ttt = apply_ttt_settings(config.ttt, load_ttt_settings(path), config.ttt_explicit)
    logger.info("TTT settings from %s: %s", path, ttt)
    return dataclasses.replace(config, ttt=ttt, ttt_settings=str(path))
