"""`finemed ttt-calibrate`: find the TTT strength at which a model gains on its own dev data, or learn that none
does. Each candidate setting runs as an eval variant against no-TTT on the same items (`evaluate`, so every
variant's results are resumable files), within a time budget; the best candidate by a stated rule is written
as a `ttt-settings.json` that `answer` and `eval` take (`--ttt-settings`, or found beside a model or index).

The rule: the candidate with the largest paired improvement over no-TTT whose 95% interval excludes zero —
held-out bits per token of the dev records' gold reasoning and answer (perplexity mode, for corpus records)
or loglik accuracy (for benchmark questions). None if no interval excludes zero: the file then turns TTT off.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finemed_cli.config.calibrate import DEFAULT_CANDIDATES, CalibrateConfig
from finemed_cli.config.eval import EvalConfig
from finemed_cli.config.ttt_settings import FILE_NAME, write_ttt_settings
from finemed_cli.data.output import ensure_dir
from finemed_cli.errors import ConfigError
from finemed_cli.eval.records import Comparison, PerplexityComparison
from finemed_cli.eval.results import first_record
from finemed_cli.eval.transfer import MIN_ITEMS_TO_CHOOSE, gate_from_bands
from finemed_cli.eval.variants import parse_variants
from finemed_cli.parallel import agreed, launched
from finemed_cli.pipeline.evaluate import EvalResult, evaluate

logger = logging.getLogger(__name__)

@dataclass
class Calibration:
    mode: str
    rows: list[dict[str, Any]]  # per candidate: improvement over no-TTT, its interval, minutes
    chosen: str | None
    paths: dict[str, Path]
    skipped: list[str]


def _mode(config: CalibrateConfig) -> str:
    if config.mode != "auto":
        return config.mode
    path = config.inputs[0]
    first = first_record(path) if path.suffix == ".jsonl" else None  # CSV, PubMedQA JSON: benchmark questions
    return "perplexity" if isinstance(first, dict) and "reasoning" in first else "loglik"


def _eval(config: CalibrateConfig, mode: str, compare: str) -> EvalResult:
    from finemed_cli.checkpoints.loading import pick_device

    # One dtype for every call: eval's `auto` would score a no-TTT-only call in bf16 on CPUs with native bf16,
    # and the next call (with TTT, in fp32) would then refuse those results as made under other settings.
    dtype = config.dtype if config.dtype != "auto" or pick_device(config.device) != "cpu" else "float32"
    return evaluate(EvalConfig(inputs=list(config.inputs), out=config.out, mode=mode, compare=compare,
                               index=config.index, model=config.model, limit=config.limit, seed=config.seed,
                               device=config.device, dtype=dtype, system_prompt=config.system_prompt,
                               ttt_settings="none", progress=config.progress))


def calibrate(config: CalibrateConfig) -> Calibration:
    """Run no-TTT and the candidates (resuming what a previous run finished), then pick and write."""
    if not 0 <= config.seed < 2**63:
        raise ConfigError(f"--seed must be from 0 to 2**63 - 1, got {config.seed}")
    candidates = [v.name for v in parse_variants(config.candidates or ",".join(DEFAULT_CANDIDATES), config.model)]
    if any(not c.startswith("ttt") for c in candidates):
        raise ConfigError("--candidates: give ttt variants only, e.g. 'ttt(steps=4),ttt(lr=1e-2)' (no-ttt is the "
                          "baseline every candidate is compared with)")
    mode = _mode(config)
    log_path = config.out / "calibration.json"
    minutes: dict[str, float] = json.loads(log_path.read_text())["minutes"] if log_path.is_file() else {}
    start, done, skipped, ranks = time.perf_counter(), [], [], launched()
    for name in ["no-ttt", *candidates]:
        spent = (time.perf_counter() - start) / 60
        # a candidate finished before resumes at no cost; a new one is judged by the last TTT candidate's time
        last = next((minutes[d] for d in reversed(done) if d != "no-ttt" and d in minutes), 0.0)
        # under torchrun every rank takes rank 0's decision: ranks that ran different candidates would wait
        # for each other forever
        if agreed(name != "no-ttt" and name not in minutes and done[1:] and spent + last > config.max_minutes,
                  ranks):
            skipped.append(name)
            continue
        t0 = time.perf_counter()
        logger.info("calibrate: %s (%.1f of %.0f minutes spent)", name, spent, config.max_minutes)
        _eval(config, mode, "no-ttt" if name == "no-ttt" else ",".join(["no-ttt", name, *_oracle(config, name)]))
        minutes.setdefault(name, (time.perf_counter() - t0) / 60)
        done.append(name)
        if ranks is None or ranks.main:
            ensure_dir(config.out)
            log_path.write_text(json.dumps({"mode": mode, "minutes": minutes}, indent=1) + "\n")  # for a resume
    result = _eval(config, mode, ",".join([*done, *(o for d in done[1:] for o in _oracle(config, d))]))
    if ranks is not None and not ranks.main:  # rank 0 chooses and writes
        return Calibration(mode, [], None, {}, skipped)
    rows = _rows(result, mode, done[1:], minutes)  # every variant resumed: the scores with them all paired
    items = _items(result)
    chosen = _choose(rows, items)
    paths = dict(result.paths)
    paths["settings"] = _write_settings(config, mode, rows, chosen, items)
    paths["plot"] = _plot(rows, chosen, mode, config.out / "calibration.png")
    log_path.write_text(json.dumps({"mode": mode, "minutes": minutes, "rows": rows, "chosen": chosen,
                                    "skipped": skipped}, indent=1) + "\n")
    paths["log"] = log_path
    return Calibration(mode, rows, chosen, paths, skipped)


def _oracle(config: CalibrateConfig, name: str) -> list[str]:
    """The candidate's oracle twin (`ttt(steps=4)` -> `oracle-ttt(steps=4)`), when asked for."""
    return ["oracle-" + name] if config.oracle and name.startswith("ttt") else []


def _items(result: EvalResult) -> int:
    """The items every variant was scored on."""
    scored = result.perplexity if result.scores is None else result.scores
    return scored.items if scored is not None else 0


def _improvement(comparisons: Sequence[Comparison | PerplexityComparison], name: str,
                 mode: str) -> dict[str, Any] | None:
    """`name`'s improvement over no-TTT (positive: better) with its 95% interval, as calibration.json's row."""
    for c in comparisons:
        if {c.a, c.b} != {"no-ttt", name}:
            continue
        # perplexity: bits(no-ttt) − bits(candidate); loglik: acc(candidate) − acc(no-ttt)
        sign = 1.0 if (c.a == "no-ttt") == (mode == "perplexity") else -1.0
        low, high = sorted((sign * c.ci95[0], sign * c.ci95[1]))
        row = {"improvement": sign * c.difference, "ci95": [low, high]}
        if isinstance(c, Comparison):  # accuracy: McNemar's p and the items that changed
            row.update(p_value=c.p_value, changed=c.a_only + c.b_only)
        return row
    return None


def _rows(result: EvalResult, mode: str, names: list[str], minutes: dict[str, float]) -> list[dict[str, Any]]:
    """Each candidate's improvement over no-TTT, its oracle ceiling (the same setting trained on each item's own
    gold) and its letter-leak rise, when they were run: calibration.json's rows."""
    scored = result.perplexity if mode == "perplexity" else result.scores
    comparisons = scored.comparisons if scored is not None else ()
    transfer = result.transfer.variants if result.transfer is not None else {}
    rows = []
    for name in names:
        found = _improvement(comparisons, name, mode)
        if found is None:
            continue
        row = {"variant": name, **found, "minutes": round(minutes.get(name, 0.0), 2),
               "settings": result.settings[name]}
        if (oracle := _improvement(comparisons, "oracle-" + name, mode)) is not None:
            row["oracle"] = {k: oracle[k] for k in ("improvement", "ci95")}
        if name in transfer and (leak := transfer[name].leak) is not None:
            row["leak"] = leak.to_json()
        if name in transfer:  # the relevance gate the dev items' similarity bands support (None: no gate)
            row["gate"] = gate_from_bands(transfer[name].by_similarity)
        rows.append(row)
    return rows


def _choose(rows: list[dict[str, Any]], items: int) -> str | None:
    """The largest improvement whose interval excludes zero, among candidates that do not raise the letter leak
    (its interval above zero); None from fewer items than an exact sign test needs to exclude zero at all."""
    if items < MIN_ITEMS_TO_CHOOSE:
        logger.warning("calibrate: %d dev item(s) cannot show any setting better than no TTT (an exact sign test "
                       "needs %d at least): TTT stays off; give more dev items", items, MIN_ITEMS_TO_CHOOSE)
        return None
    helped = [r for r in rows if r["ci95"][0] > 0 and not (r.get("leak") and r["leak"]["ci95"][0] > 0)]
    return max(helped, key=lambda r: r["improvement"])["variant"] if helped else None


def _write_settings(config: CalibrateConfig, mode: str, rows: list[dict[str, Any]], chosen: str | None,
                    items: int) -> Path:
    unit = "bits per token lower" if mode == "perplexity" else "accuracy points higher"
    rule = ("the largest paired improvement over no-TTT whose 95% interval excludes zero "
            f"({'held-out bits per token' if mode == 'perplexity' else 'loglik accuracy'})")
    rule += (f", among those that do not raise the letter leak, from {MIN_ITEMS_TO_CHOOSE} dev items at least "
             "(fewer cannot exclude zero by an exact sign test)")
    base = {"rule": rule, "dev": [str(p) for p in config.inputs], "mode": mode, "candidates": len(rows),
            "items": items}
    if chosen is None:
        why = (f"{items} dev item(s) are too few to show any setting better than no TTT" if items < MIN_ITEMS_TO_CHOOSE
               else f"no setting tried was better than no TTT ({unit}) with a 95% interval excluding zero "
                    "without raising the letter leak")
        return write_ttt_settings(config.out / FILE_NAME, {"mode": "off"}, "no-ttt",
                                  {**base, "result": f"{why}: TTT stays off"})
    row = next(r for r in rows if r["variant"] == chosen)
    # what the variant set itself (over the defaults), so a file never pins a mode's steps or rate on another
    variant = parse_variants(chosen, None)[0]
    ttt = {"mode": variant.ttt, **{k: list(v) if isinstance(v, tuple) else v for k, v in variant.settings}}
    if row.get("gate") is not None:  # TTT hurt the far items on dev: they are answered without it
        ttt["min_sim"] = row["gate"]
    base["settings"] = row["settings"]  # every setting, written out for a reader
    scale = 100 if mode == "loglik" else 1
    return write_ttt_settings(config.out / FILE_NAME, ttt, chosen, {
        **base, "result": f"{row['improvement'] * scale:.4g} {unit}, 95% interval "
                          f"[{row['ci95'][0] * scale:.4g}, {row['ci95'][1] * scale:.4g}]"})


def _plot(rows: list[dict[str, Any]], chosen: str | None, mode: str, path: Path) -> Path:
    from finemed_cli.plots import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.6))
    scale = 100 if mode == "loglik" else 1
    for y, r in enumerate(rows):
        lo, hi = (v * scale for v in r["ci95"])
        color = "tab:green" if r["variant"] == chosen else ("tab:blue" if lo > 0 else "tab:gray")
        ax.errorbar(r["improvement"] * scale, y, xerr=[[r["improvement"] * scale - lo], [hi - r["improvement"] * scale]],
                    fmt="o", color=color, capsize=3, label="with retrieved neighbours" if y == 0 else None)
        if r.get("oracle"):  # the ceiling: the same setting trained on the item's own gold answer
            o, (olo, ohi) = r["oracle"]["improvement"] * scale, (v * scale for v in r["oracle"]["ci95"])
            ax.errorbar(o, y + 0.25, xerr=[[o - olo], [ohi - o]], fmt="^", color="tab:orange", capsize=2,
                        label="oracle: on the item's own gold answer" if y == 0 else None)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)), [r["variant"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("bits per token saved vs no-TTT (95% interval)" if mode == "perplexity"
                  else "accuracy points gained vs no-TTT (95% interval)")
    ax.set_title(f"TTT calibration: {'chosen ' + chosen if chosen else 'no setting helps'}")
    if any(r.get("oracle") for r in rows):
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)
