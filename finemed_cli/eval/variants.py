"""`finemed eval --compare`: the variants run on the same items. A variant is a kind (`ttt`, `no-ttt`,
`paper`, and the in-context ones `icl`, `ttt+icl`, `paper+icl`), optionally with TTT settings of its own and
another model: `no-ttt,ttt,icl,ttt+icl,ttt(steps=4,lr=1e-3),ttt(k=3,layers=all,loss_on=reasoning)@runs/x/final`.

The in-context variants put the k retrieved neighbours in the prompt as worked examples (earlier user and
assistant turns: the question with its options, the o1 response) — the baseline a reviewer asks TTT to beat:
`icl` trains nothing, `ttt+icl` trains on the neighbours and also shows them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from finemed_cli.config.answer import TTTConfig
from finemed_cli.errors import ConfigError

# variant kind -> (TTT mode, neighbours in the prompt)
VARIANT_KINDS = {"ttt": ("lora", False), "no-ttt": ("off", False), "paper": ("paper", False), "icl": ("off", True),
                 "ttt+icl": ("lora", True), "paper+icl": ("paper", True), "oracle-ttt": ("lora", False)}
ORACLE = "oracle-ttt"  # TTT on the item's own gold question and answer: the ceiling of what a setting transfers
_INT = ("k", "steps", "rank", "layers", "max_length", "pad_to")
_FLOAT = ("lr", "alpha", "min_sim")
SETTINGS = (*_INT, *_FLOAT, "targets", "loss_on")  # what a variant may set (every TTTConfig field but mode)


@dataclass(frozen=True)
class Variant:
    name: str
    ttt: str  # lora, off or paper
    model: str | None
    settings: tuple[tuple[str, Any], ...] = ()  # this variant's own TTT settings, over the run's
    icl: bool = False  # the retrieved neighbours are shown in the prompt

    @property
    def oracle(self) -> bool:
        """TTT on each item's own gold answer (eval/transfer.py), not on retrieved neighbours."""
        return self.name.startswith(ORACLE)

    @property
    def retrieves(self) -> bool:
        """Whether the variant needs each item's neighbours (to train on, to show, or both)."""
        return (self.ttt != "off" or self.icl) and not self.oracle

    def ttt_config(self, base: TTTConfig) -> TTTConfig:
        return dataclasses.replace(base, mode=self.ttt, **dict(self.settings))

    def describe(self, base: TTTConfig) -> dict[str, Any]:
        """Every setting this variant runs with, written out (the report's record of it)."""
        out: dict[str, Any] = {"model": self.model, "ttt": self.ttt}
        c = self.ttt_config(base)
        if self.icl:
            out["icl"] = {"k": c.k, "pick": c.pick}  # the neighbours shown, as many as TTT retrieves
        if self.ttt == "off":
            return out
        layers = "all" if c.layers == 0 else ("a quarter" if c.layers is None else c.layers)
        out.update(k=c.k, steps=c.resolved_steps(), lr=c.resolved_lr(), rank=c.rank, alpha=c.alpha, layers=layers,
                   targets=list(c.targets), loss_on=c.loss_on, max_length=c.max_length)
        if self.ttt == "paper":
            out["pad_to"] = c.pad_to
        if c.min_sim is not None:  # only when set: results made before the gate existed still resume
            out["min_sim"] = c.min_sim
        if self.oracle:
            out["oracle"] = True
        return out


def _split(spec: str) -> list[str]:
    """Split on the commas outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        depth += (ch == "(") - (ch == ")")
        if depth < 0:
            raise ConfigError(f"--compare: unbalanced parentheses in {spec!r}")
        if ch == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    if depth:
        raise ConfigError(f"--compare: unbalanced parentheses in {spec!r}")
    return [p.strip() for p in [*parts, spec[start:]] if p.strip()]


def _value(key: str, text: str, part: str) -> Any:
    try:
        if key == "layers" and text == "all":
            return 0
        if key in _INT:
            return int(text)
        if key in _FLOAT:
            return float(text)
    except ValueError:
        raise ConfigError(f"--compare {part}: {key}={text!r} is not a number") from None
    if key == "targets":
        return tuple(t for t in text.split("+") if t)
    return text


def _settings(text: str, part: str) -> tuple[tuple[str, Any], ...]:
    out = {}
    for item in (i.strip() for i in text.split(",") if i.strip()):
        key, eq, value = (x.strip() for x in item.partition("="))
        if not eq or key not in SETTINGS:
            raise ConfigError(f"--compare {part}: {item!r} is not a TTT setting; use key=value with a key of "
                              f"{', '.join(SETTINGS)} (layers=all, targets=q_proj+v_proj)")
        out[key] = _value(key, value, part)
    return tuple(sorted(out.items()))


def parse_variants(spec: str, model: str | None) -> list[Variant]:
    """`ttt,no-ttt,paper,ttt(steps=4,lr=1e-3),ttt@runs/x/final`: a TTT kind with optional settings, optionally
    `@` another model (HF dir or id)."""
    out = []
    for part in _split(spec):
        settings: tuple[tuple[str, Any], ...] = ()
        if "(" in part:  # kind(settings)[@MODEL]
            open_at, close_at = part.index("("), part.rindex(")")
            kind, after = part[:open_at].strip(), part[close_at + 1:].strip()
            if after and not after.startswith("@"):
                raise ConfigError(f"--compare {part}: only @MODEL may follow the settings")
            other = after[1:]
            settings = _settings(part[open_at + 1:close_at], part)
        else:
            kind, _, other = (x.strip() for x in part.partition("@"))
        if kind not in VARIANT_KINDS:
            raise ConfigError(f"--compare: unknown variant {part!r}; use {', '.join(VARIANT_KINDS)}, each "
                              "optionally with settings, ttt(steps=4,lr=1e-3), and @MODEL (e.g. ttt@runs/tiny/final)")
        mode, icl = VARIANT_KINDS[kind]
        if settings and kind == "no-ttt":
            raise ConfigError(f"--compare {part}: no-ttt takes no TTT settings")
        if mode == "off" and any(k != "k" for k, _ in settings):
            raise ConfigError(f"--compare {part}: {kind} trains nothing; of the TTT settings it takes only k (the "
                              "neighbours shown)")
        variant = Variant(part.replace(" ", ""), mode, other.strip() or model, settings, icl)
        problems = variant.ttt_config(TTTConfig()).validate()
        if problems:
            raise ConfigError(f"--compare {part}: " + "; ".join(problems))
        out.append(variant)
    if len({v.name for v in out}) != len(out):
        raise ConfigError(f"--compare: a variant is named twice in {spec!r}")
    if not out:
        raise ConfigError("--compare: name at least one variant, e.g. ttt,no-ttt")
    return out
