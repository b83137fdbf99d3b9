"""Click options derived from config dataclass fields: each default and help text is declared once, on the
field, and the CLI shows exactly what the library applies."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from pathlib import Path
from typing import Any

import click


class FiniteFloat(click.FloatRange):
    """A float option that refuses NaN and infinity (issue 31): `x < lo` is False for NaN, so a range check alone
    lets `--temperature nan` or `--ttt-lr inf` through to the model. Every float option of the CLI is one."""

    name = "float"

    def _describe_range(self) -> str:
        return super()._describe_range() if self.min is not None or self.max is not None else ""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


FINITE = FiniteFloat()


@functools.cache
def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _click_type(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is Path:
        return click.Path(path_type=Path)
    if typing.get_origin(tp) is tuple:  # a comma-separated list on the command line
        return str
    if tp is float:
        return FINITE
    return tp if tp in (int, str) else None


# command-line parameter -> the TTTConfig field it sets
TTT_PARAMS = {"ttt": "mode", "ttt_mode": "mode", "k": "k", "pick": "pick", "ttt_steps": "steps", "ttt_lr": "lr",
              "ttt_layers": "layers", "ttt_rank": "rank", "ttt_alpha": "alpha", "ttt_targets": "targets",
              "ttt_max_length": "max_length", "ttt_pad_to": "pad_to", "ttt_loss_on": "loss_on",
              "ttt_min_sim": "min_sim", "ttt_engine": "engine"}


def explicit_ttt_fields() -> tuple[str, ...]:
    """The TTT fields this command's line gave (a TTT settings file must not override them)."""
    ctx = click.get_current_context()
    return tuple(sorted({field for param, field in TTT_PARAMS.items() if param in ctx.params
                         and ctx.get_parameter_source(param) == click.core.ParameterSource.COMMANDLINE}))


def field_default(cls: type, name: str) -> Any:
    f, _ = _fields(cls)[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise KeyError(f"{cls.__name__}.{name} has no default")


def field_help(cls: type, name: str) -> str:
    f, _ = _fields(cls)[name]
    text = f.metadata.get("help", "")
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") or not text else ".")


def option(cls: type, name: str, *decls: str, **overrides: Any) -> Any:
    """A click option for field `name` of the dataclass `cls`: its default, help and type come from the field
    (a tuple default is shown comma-separated); `overrides` are passed to click.option as they are."""
    _, tp = _fields(cls)[name]
    default = field_default(cls, name)
    if isinstance(default, tuple):
        default = ",".join(default)
    kwargs: dict[str, Any] = {"default": default, "help": field_help(cls, name)}
    if (click_type := _click_type(tp)) is not None and "is_flag" not in overrides:
        kwargs["type"] = click_type
    kwargs["show_default"] = default is not None and not isinstance(default, bool)
    kwargs.update(overrides)
    return click.option(*decls, **kwargs)


def split_names(value: str) -> tuple[str, ...]:
    """`q_proj, v_proj` → ("q_proj", "v_proj")."""
    return tuple(t.strip() for t in value.split(",") if t.strip())


def ttt_options(*, pad_to: bool = True) -> Any:
    """The TTT options every command that runs TTT takes (`-k`, `--ttt-steps`, … `--ttt-loss-on`), declared
    once; `pad_to`: also the paper mode's `--ttt-pad-to`."""
    from finemed_cli.config.answer import LOSS_ON, PICKS, TTTConfig

    decls: list[tuple[str, tuple[str, ...], dict[str, Any]]] = [
        ("k", ("-k", "--neighbours", "k"), {}), ("pick", ("--neighbour-pick", "pick"), {"type": click.Choice(PICKS)}),
        ("steps", ("--ttt-steps",), {}), ("lr", ("--ttt-lr",), {}),
        ("layers", ("--ttt-layers",), {}), ("rank", ("--ttt-rank",), {}), ("alpha", ("--ttt-alpha",), {}),
        ("targets", ("--ttt-targets",), {}), ("max_length", ("--ttt-max-length",), {}),
        ("pad_to", ("--ttt-pad-to",), {}), ("loss_on", ("--ttt-loss-on",), {"type": click.Choice(LOSS_ON)}),
        ("min_sim", ("--ttt-min-sim",), {})]

    def decorate(f: Any) -> Any:
        for name, names, extra in reversed(decls):
            if name != "pad_to" or pad_to:
                f = option(TTTConfig, name, *names, **extra)(f)
        return f

    return decorate
