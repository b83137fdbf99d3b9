"""YAML → config dataclasses, shared by every config finemed reads (`finemed train`, `finemed synth run`).

Every problem is collected, each named by its key path (`stages.1.lr`) with what was expected, so a user fixes
a config in one edit. `--set a.b=c` overrides any key; the value is read as YAML (numbers, lists, null).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from finemed_cli.errors import ConfigError


def read_yaml(path: Path) -> Any:
    """A YAML file's content; a missing, unreadable, non-UTF-8 or malformed file is one ConfigError line."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give the YAML config file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        line = text_line(path.read_bytes(), e.start)
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (byte 0x{e.object[e.start]:02x}); re-save the file as "
                          "UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f":{where.line + 1}" if where is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{path}{at}: not valid YAML ({what})") from None
    if _expanded_size(data, MAX_VALUES) > MAX_VALUES:
        raise ConfigError(f"{path}: expands to more than {MAX_VALUES:,} values (aliases of aliases: a YAML bomb?); "
                          "a finemed config is a few dozen keys: write it without nested aliases")
    return data


# A config is tens of values; a document whose aliases expand past this is refused before anything walks it
# (nine nested aliases of nine items each make 387 million values from a few hundred bytes).
MAX_VALUES = 100_000


def _expanded_size(data: Any, budget: int) -> int:
    """How many values `data` holds with every alias expanded, counted until `budget` is passed."""
    count, stack = 0, [data]
    while stack and count <= budget:
        value = stack.pop()
        count += 1
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return count


def text_line(data: bytes, offset: int) -> int:
    """The 1-based line number of a byte offset."""
    return data.count(b"\n", 0, offset) + 1


def plain_name(name: str) -> bool:
    """A name that is one folder inside its parent: no separators, no '.'/'..', no control characters."""
    return (bool(name) and name not in (".", "..") and not any(c in name for c in "/\\:")
            and name.isprintable() and name == name.strip())


_INVALID = object()  # a value that failed its check: the field keeps its default (no second error later)


def _coerce(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    """`value` as type `tp` (a dataclass, list[...], X | None, int, float, str, bool), or `_INVALID` with
    the problem added to `errors`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if isinstance(value, dict):  # `str | SomeConfig`: a mapping is the dataclass (a synth role's endpoint)
            args = [a for a in args if dataclasses.is_dataclass(a)] or args
        return None if value is None else _coerce(value, args[0], key, errors)
    if value is None:
        errors.append(f"{key}: null is not allowed here; give a value or remove the key for its default")
        return _INVALID
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key, errors)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, dict)) or not isinstance(value, list):
            value = [value]  # a single file or stage may be written without brackets
        items = [_coerce(v, item, f"{key}.{i}", errors) for i, v in enumerate(value)]
        return [v for v in items if v is not _INVALID]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp, True)
    if not ok:
        errors.append(f"{key}: expected {tp.__name__}, got {type(value).__name__} {reprlib.repr(value):.40}")
        return _INVALID
    if tp is float:
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            errors.append(f"{key}: must be a finite number, got {value!r}")
            return _INVALID
    return value


def build_dataclass(cls: Any, data: Any, prefix: str, errors: list[str]) -> Any:
    """An instance of the dataclass `cls` from a YAML mapping: unknown keys (with the closest known one), wrong
    types, nulls and non-finite numbers are added to `errors` under their key path and keep their defaults."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{prefix or 'config'}: expected a mapping of keys, got {type(data).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "base_dir"]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            errors.append(f"{full}: unknown key{hint}")
            continue
        coerced = _coerce(value, hints[key], full, errors)
        if coerced is not _INVALID:
            kwargs[key] = coerced
    return cls(**kwargs)


def apply_override(data: dict[str, Any], assignment: str, errors: list[str]) -> None:
    """Apply one `--set KEY=VALUE` (a dotted key path; VALUE read as YAML) to the loaded mapping."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        errors.append(f"--set {assignment!r}: write KEY=VALUE, e.g. stages.0.epochs=2")
        return
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    if _expanded_size(value, MAX_VALUES) > MAX_VALUES:
        errors.append(f"--set {key}: the value expands to more than {MAX_VALUES:,} values; give a plain value")
        return
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                errors.append(f"--set {key}: {'.'.join(parts[:i]) or 'config'} has {len(node)} entries; "
                              f"{part!r} is not an index of one")
                return
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        else:
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, (dict, list)):
                    errors.append(f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a mapping")
                    return


def settings_diff(old: dict[str, Any], new: dict[str, Any], limit: int = 160) -> tuple[str, str] | None:
    """What differs between the settings results were made with and a run's (`key=value, …` for each side, each
    value cut to `limit` characters), or None: how a resumed run names why it is refused."""
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if not keys:
        return None

    def cut(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= limit else text[:limit - 3] + "..."

    def show(d: dict[str, Any]) -> str:
        return ", ".join(f"{k}={cut(d.get(k))}" for k in keys)

    return show(old), show(new)
