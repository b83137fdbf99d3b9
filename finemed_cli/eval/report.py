"""What `finemed eval` leaves in its output folder: report.json (every setting the run used, versions, the
metrics with their intervals), report.md (the tables a person reads) and PNG plots (accuracy per variant with
its interval, the chance level and the values written on the bars; accuracy per department and per source;
the retrieval scores of the neighbours). The lm-eval-harness copy of the results is `eval/lm_eval_output.py`'s."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import orjson

from finemed_cli.data.output import atomic_write
from finemed_cli.eval.records import (
    ContaminationReport,
    PerplexityScores,
    Scores,
    TransferReport,
    VariantScore,
)
from finemed_cli.manifest import package_versions


def _pct(x: float | None) -> str:
    return "—" if x is None or x != x else f"{100 * x:.1f}"


def _ci(pair: list[float]) -> str:
    return f"[{_pct(pair[0])}, {_pct(pair[1])}]"


def write_report(out: Path, config: dict[str, Any], scores: Scores | None = None, *,
                 contamination: ContaminationReport | None = None, transfer: TransferReport | None = None,
                 perplexity: PerplexityScores | None = None) -> dict[str, Path]:
    """Write report.json (each record's `to_json()` under its key), report.md and the plots into `out`; returns
    their paths by kind. Without `scores` (perplexity mode) the report's `items` are the perplexity's."""
    out.mkdir(parents=True, exist_ok=True)
    body: dict[str, Any] = {
        "config": config, "versions": package_versions(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **(scores.to_json() if scores is not None else {"items": perplexity.items if perplexity else 0})}
    for key, record in (("contamination", contamination), ("transfer", transfer), ("perplexity", perplexity)):
        if record is not None:
            body[key] = record.to_json()
    paths = {"json": out / "report.json", "md": out / "report.md"}
    atomic_write(paths["json"], orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    paths.update(plot_scores(out, scores))
    atomic_write(paths["md"], render_markdown(body, {k: v.name for k, v in paths.items()}).encode())
    return paths


def _setting(value: Any) -> str:
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return "—" if value is None else str(value)


def render_markdown(body: dict[str, Any], files: dict[str, str] | None = None) -> str:
    """The report as Markdown tables: accuracy per variant, comparisons, per source, per department, the
    neighbours' retrieval scores, and every setting of the run."""
    cfg = body.get("config", {})
    lines = _md_header(body, cfg) + _md_accuracy(body, cfg) + _md_comparisons(body) + _md_groups(body)
    lines += _md_relevance(body) + _md_transfer(body) + _md_perplexity(body) + _md_disagreements(body)
    if files:
        pngs = [f for k, f in files.items() if f.endswith(".png")]
        if pngs:
            lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in pngs]
    if cfg:
        lines += ["", "## Settings", ""] + [f"- {k}: {_setting(v)}" for k, v in cfg.items() if k != "title"]
    versions = body.get("versions", {})
    lines += ["", "---", "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    return "\n".join(lines)


def _md_header(body: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    lines = [f"# finemed eval: {cfg.get('title', 'report')}", ""]
    lines += [f"- mode: {cfg.get('mode', '—')}; items: {body.get('items', 0)}; seed: {cfg.get('seed', 0)}"]
    if body.get("chance") is not None:
        lines += [f"- chance (a uniform guess over each item's options): {_pct(body['chance'])}%"]
    if body.get("left_out"):
        lines += [f"- left out (missing from some variant): {body['left_out']}"]
    if body.get("contamination"):
        c = body["contamination"]
        lines += [f"- decontamination: {c['flagged']} item(s) overlap the reference texts "
                  f"(≥ {c['threshold']:.0%} of {c['n']}-grams); {'dropped' if c['dropped'] else 'kept'}"]
    return lines


def _md_accuracy(body: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    results = body.get("results", {})
    if not results:
        return []
    trusted = cfg.get("trust_letter")
    lines = ["", "## Accuracy (%, 95% Wilson interval)", "",
             "| variant | accuracy | 95% CI | n | unanswered | letter ≠ text |", "|---|---:|---|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {_pct(r['accuracy'])} | {_ci(r['ci95'])} | {r['n']} | {r.get('unanswered', 0)} "
                     f"| {r.get('disagreements', 0)} |")
    if any(r.get("disagreements") for r in results.values()):
        lines += ["", "letter ≠ text: responses whose letter names one option and whose text another ('the "
                  "answer is D. <option B's text>'); " + ("scored by their letter (--trust-letter)." if trusted
                                                           else "scored unanswered (--trust-letter scores the letter).")]
    return lines


def _md_comparisons(body: dict[str, Any]) -> list[str]:
    if not body.get("comparisons"):
        return []
    lines = ["", "## Paired comparisons (exact McNemar test; Newcombe's 95% paired interval of a − b)", "",
             "| a | b | a − b (points) | 95% CI | p | only a right | only b right | both | neither |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for c in body["comparisons"]:
        lines.append(f"| {c['a']} | {c['b']} | {_pct(c['difference'])} | {_ci(c['ci95'])} | {c['p_value']:.3g} "
                     f"| {c['a_only']} | {c['b_only']} | {c['both']} | {c['neither']} |")
    return lines


def _md_groups(body: dict[str, Any]) -> list[str]:
    results, lines = body.get("results", {}), []
    for key, title in (("by_source", "source"), ("by_department", "department")):
        groups = sorted({g for r in results.values() for g in r.get(key, {})})
        if not groups or (len(groups) < 2 and key == "by_department"):
            continue
        lines += ["", f"## Accuracy per {title} (%, 95% Wilson interval)", "",
                  "| " + title + " | n | " + " | ".join(results) + " |", "|---|---:|" + "---:|" * len(results)]
        for g in groups:
            n = next(r[key][g]["n"] for r in results.values() if g in r.get(key, {}))
            cells = [f"{_pct(r[key][g]['accuracy'])} {_ci(r[key][g]['ci95'])}" if g in r.get(key, {}) else "—"
                     for r in results.values()]
            lines.append(f"| {g} | {n} | " + " | ".join(cells) + " |")
    return lines


def _md_relevance(body: dict[str, Any]) -> list[str]:
    relevance = {name: r["relevance"] for name, r in body.get("results", {}).items() if r.get("relevance")}
    if not relevance:
        return []
    lines = ["", "## Retrieval scores of the neighbours", "",
             "| variant | neighbours | items | mean | median | min | max | best per item: mean | median |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, v in relevance.items():
        lines.append(f"| {name} | {v['neighbours']} | {v['items']} | {v['mean']:.4f} | {v['median']:.4f} "
                     f"| {v['min']:.4f} | {v['max']:.4f} | {v['top1_mean']:.4f} | {v['top1_median']:.4f} |")
    return lines


def _md_transfer(body: dict[str, Any]) -> list[str]:
    """TTT's effect by band of best-neighbour similarity, and the letter leak (eval/transfer.py)."""
    transfer = body.get("transfer")
    if not transfer:
        return []
    base = transfer["baseline"]
    lines = ["", f"## What TTT carries: effect by neighbour similarity, and the letter leak (against {base})", "",
             "| variant | band | similarity | n | with | without | difference | helped | hurt |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for name, t in transfer["variants"].items():
        for b in t["by_similarity"]:
            lines.append(f"| {name} | {b['band']} | {b['similarity'][0]:.3f}–{b['similarity'][1]:.3f} | {b['n']} "
                         f"| {_pct(b['with'])} | {_pct(b['without'])} | {100 * b['difference']:+.1f} "
                         f"| {b['helped']} | {b['hurt']} |")
    leaks = {n: t for n, t in transfer["variants"].items() if t.get("leak")}
    if leaks:
        lines += ["", "Letter leak: how much more often the prediction is the neighbour's own gold letter, on items "
                  "where that letter is wrong (a rise: TTT repeats the neighbour's answer).", "",
                  "| variant | items | rise (points) | 95% CI | p | gated items |", "|---|---:|---:|---|---:|---:|"]
        for name, t in leaks.items():
            k = t["leak"]
            lines.append(f"| {name} | {k['items']} | {100 * k['rise']:+.1f} | [{100 * k['ci95'][0]:+.1f}, "
                         f"{100 * k['ci95'][1]:+.1f}] | {k['p_value']:.3g} | {t['gated']} |")
    return lines


def _md_perplexity(body: dict[str, Any]) -> list[str]:
    if not body.get("perplexity"):
        return []
    lines = ["", "## Held-out bits per token (lower is better)", "", "| variant | bits/token | 95% CI | n |",
             "|---|---:|---|---:|"]
    for name, p in body["perplexity"]["variants"].items():
        lines.append(f"| {name} | {p['bits_per_token']:.4f} | [{p['ci95'][0]:.4f}, {p['ci95'][1]:.4f}] | {p['n']} |")
    for c in body["perplexity"].get("comparisons", []):
        lines.append(f"\n{c['a']} − {c['b']}: {c['difference']:+.4f} bits/token, 95% CI "
                     f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]; {c['a_lower']} of {c['n']} items lower under {c['a']}")
    return lines


def _md_disagreements(body: dict[str, Any]) -> list[str]:
    lines = []
    for c in body.get("comparisons", []):
        if c["a_only_ids"] or c["b_only_ids"]:
            lines += ["", f"### Items {c['a']} and {c['b']} disagree on", "",
                      f"- only {c['a']} right ({c['a_only']}): " + ", ".join(c["a_only_ids"][:50])
                      + (" …" if len(c["a_only_ids"]) > 50 else ""),
                      f"- only {c['b']} right ({c['b_only']}): " + ", ".join(c["b_only_ids"][:50])
                      + (" …" if len(c["b_only_ids"]) > 50 else "")]
    return lines


def _label_bars(ax: Any, xs: Any, values: Any, fontsize: int = 8, dx: float = 0.0) -> None:
    """Each bar's value above it (`dx` to its right); a 0% bar (no height to see) also gets a mark on the axis,
    and a missing one (nan) a dash."""
    for x, v in zip(xs, values, strict=True):
        if v != v:
            ax.annotate("—", (x, 0), ha="center", va="bottom", fontsize=fontsize, color="grey")
            continue
        if v == 0:
            ax.plot([x], [0], marker="^", color="black", markersize=6, clip_on=False, zorder=5)
        ax.annotate(f"{v:.1f}", (x + dx, v), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                    fontsize=fontsize)


def plot_scores(out: Path, scores: Scores | None) -> dict[str, Path]:
    """accuracy.png (each variant with its interval, its value and the chance level), with more than one group
    sources.png and departments.png (grouped bars per variant), and relevance.png (histogram of the
    neighbours' retrieval scores) when a variant retrieved."""
    if scores is None or not scores.results:
        return {}
    results = scores.results
    from finemed_cli.plots import pyplot

    plt = pyplot()
    paths = {"accuracy_png": _plot_accuracy(plt, out, scores)}
    for key, file in (("by_source", "sources.png"), ("by_department", "departments.png")):
        if len({g for r in results.values() for g in r.groups(key)}) >= 2:
            paths[key.removeprefix("by_") + "_png"] = _plot_groups(plt, out / file, scores, key)
    if any(r.relevance for r in results.values()):
        paths["relevance_png"] = _plot_relevance(plt, out, results)
    return paths


def _plot_accuracy(plt: Any, out: Path, scores: Scores) -> Path:
    import numpy as np

    from finemed_cli.plots import save_png

    results = scores.results
    names = list(results)
    x = np.arange(len(names))
    acc = np.array([100 * results[n].accuracy for n in names])
    lo = np.array([100 * results[n].ci95[0] for n in names])
    hi = np.array([100 * results[n].ci95[1] for n in names])
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(names) + 2), 3.8), dpi=120)
    ax.bar(x, acc, color="tab:blue", alpha=0.8)
    ax.errorbar(x, acc, yerr=[acc - lo, hi - acc], fmt="none", ecolor="black", capsize=5)
    _label_bars(ax, x, acc, dx=0.22)  # beside the interval's line, not on it
    chance = scores.chance
    if chance is not None:
        ax.axhline(100 * chance, color="tab:red", linestyle="--", linewidth=1, label=f"chance {100 * chance:.1f}%")
        ax.legend(fontsize=8, loc="upper right")
    ax.set_xticks(x, names, rotation=20 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 110)  # room above 100 for an interval's cap and its label
    ax.set_title(f"accuracy with 95% Wilson interval ({scores.items} items)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_png(fig, out / "accuracy.png")


def _plot_groups(plt: Any, path: Path, scores: Scores, key: str) -> Path:
    """Grouped bars: per source or department, one bar per variant."""
    import numpy as np

    from finemed_cli.plots import save_png

    results, chance = scores.results, scores.chance
    names = list(results)
    groups = sorted({g for r in results.values() for g in r.groups(key)})
    width = 0.8 / len(names)
    gx = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(groups) * len(names) + 2), 4), dpi=120)
    for i, n in enumerate(names):
        vals = [100 * results[n].groups(key)[g].accuracy if g in results[n].groups(key) else float("nan")
                for g in groups]
        pos = gx + i * width - 0.4 + width / 2
        ax.bar(pos, vals, width, label=n)
        _label_bars(ax, pos, vals, fontsize=6)
    if chance is not None:
        ax.axhline(100 * chance, color="tab:red", linestyle="--", linewidth=1, label="chance (all items)")
    ax.set_xticks(gx, [f"{g}\n(n={next(r.groups(key)[g].n for r in results.values() if g in r.groups(key))})"
                       for g in groups], rotation=30 if len(groups) > 4 else 0,
                  ha="right" if len(groups) > 4 else "center", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 110)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"accuracy per {key.removeprefix('by_')}")
    fig.tight_layout()
    return save_png(fig, path)


def _plot_relevance(plt: Any, out: Path, results: dict[str, VariantScore]) -> Path:
    from finemed_cli.plots import save_png

    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120)
    for n, r in results.items():
        v = r.relevance
        if not v:
            continue
        drawn = ax.stairs(list(v.counts), list(v.edges), label=f"{n} (mean {v.mean:.3f}, median {v.median:.3f})")
        ax.axvline(v.median, linestyle=":", linewidth=1, color=drawn.get_edgecolor())
    ax.set_xlabel("retrieval score of a neighbour")
    ax.set_ylabel("neighbours")
    ax.set_title("how close the retrieved neighbours are")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, out / "relevance.png")
