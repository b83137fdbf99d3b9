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


def option(cls: type, name: str, *decls: str, old: tuple[str, ...] = (), **overrides: Any) -> Any:
    """A click option for field `name` of the dataclass `cls`: its default, help and type come from the field
    (a tuple default is shown comma-separated); `overrides` are passed to click.option as they are; `old`:
    spellings that still parse, hidden from --help (`renamed`)."""
    _, tp = _fields(cls)[name]
    default = field_default(cls, name)
    if isinstance(default, tuple):
        default = ",".join(default)
    kwargs: dict[str, Any] = {"default": default, "help": field_help(cls, name)}
    if (click_type := _click_type(tp)) is not None and "is_flag" not in overrides:
        kwargs["type"] = click_type
    kwargs["show_default"] = default is not None and not isinstance(default, bool)
    kwargs.update(overrides)
    return renamed(*decls, old=old, **kwargs) if old else click.option(*decls, **kwargs)


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


class AliasedOption(click.Option):
    """An option whose old spellings (`hidden_names`) still parse but are left out of --help, so every verb shows
    one name per idea (issue 33): `--max-tokens` reads as `--max-new-tokens`, `--ctx` as `--ctx-size`."""

    def __init__(self, *args: Any, hidden_names: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hidden_names = hidden_names

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        shown = self.opts, self.secondary_opts
        self.opts = [o for o in self.opts if o not in self.hidden_names]
        self.secondary_opts = [o for o in self.secondary_opts if o not in self.hidden_names]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts, self.secondary_opts = shown



def renamed(*decls: str, old: tuple[str, ...], **kwargs: Any) -> Any:
    """click.option(*decls, **kwargs) that also parses the old spellings `old`, left out of --help. Put the new
    long name first in `decls` (click names the parameter after it) or give the parameter name last."""
    names = (*decls[:-1], *old, decls[-1]) if decls[-1].isidentifier() else (*decls, *old)
    return click.option(*names, cls=AliasedOption, hidden_names=old, **kwargs)


def _set_threads(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None:  # torch too: TTT, the embedder and llama.cpp's default (torch's count) all follow -t
        import torch

        torch.set_num_threads(value)
    return value


def threads_option(help: str = "CPU threads of torch and llama.cpp [default: the physical cores torch finds].",
                   **kwargs: Any) -> Any:
    """`-t/--threads` of every verb that runs a model: torch.set_num_threads before anything loads, and
    llama.cpp's n_threads (which follows torch's count unless a verb passes its own)."""
    return click.option("-t", "--threads", type=click.IntRange(min=1), default=None, callback=_set_threads,
                        help=help, **kwargs)


def model_option(what: str = "The model, as MODEL (llama.cpp's -m).") -> Any:
    """`-m/--model` beside a verb's MODEL argument (chat, serve), so `-m` names the model on every verb."""
    return click.option("-m", "--model", "model_option", default=None, metavar="MODEL", help=what)


def one_model(argument: str | None, option: str | None) -> str:
    """The model of a verb that takes it as MODEL or -m/--model: one of them, or both the same."""
    if argument is not None and option is not None and argument != option:
        raise click.UsageError(f"two models: MODEL {argument!r} and -m {option!r}; give one")
    if argument is None and option is None:
        raise click.UsageError("Missing argument 'MODEL' (or -m/--model).")
    return argument if argument is not None else option  # type: ignore[return-value]
