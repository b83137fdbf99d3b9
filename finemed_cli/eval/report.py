"""What `finemed eval` leaves in its output folder: report.json (lm-eval-harness-like: config, versions,
per-task metrics), report.md (the tables a person reads) and PNG plots (accuracy per variant with its
interval; accuracy per department and per source)."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

import orjson

from finemed_cli.manifest import package_versions


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _pct(x: float | None) -> str:
    return "—" if x is None or x != x else f"{100 * x:.1f}"


def _ci(pair: list[float]) -> str:
    return f"[{_pct(pair[0])}, {_pct(pair[1])}]"


def write_report(out: Path, config: dict[str, Any], scores: dict[str, Any],
                 extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write report.json, report.md and the plots into `out`; returns their paths by kind."""
    out.mkdir(parents=True, exist_ok=True)
    body = {"config": config, "versions": package_versions(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **scores, **(extra or {})}
    paths = {"json": out / "report.json", "md": out / "report.md"}
    _atomic_write(paths["json"], orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    paths.update(plot_scores(out, scores))
    _atomic_write(paths["md"], render_markdown(body, {k: v.name for k, v in paths.items()}).encode())
    return paths


def render_markdown(body: dict[str, Any], files: dict[str, str] | None = None) -> str:
    """The report as Markdown tables: accuracy per variant, comparisons, per source, per department."""
    cfg = body.get("config", {})
    lines = [f"# finemed eval: {cfg.get('title', 'report')}", ""]
    lines += [f"- mode: {cfg.get('mode', '—')}; items: {body.get('items', 0)}; seed: {cfg.get('seed', 0)}"]
    if body.get("left_out"):
        lines += [f"- left out (missing from some variant): {body['left_out']}"]
    if body.get("contamination"):
        c = body["contamination"]
        lines += [f"- decontamination: {c['flagged']} item(s) overlap the reference texts "
                  f"(≥ {c['threshold']:.0%} of {c['n']}-grams); {'dropped' if c['dropped'] else 'kept'}"]
    results = body.get("results", {})
    if results:
        lines += ["", "## Accuracy (%, 95% bootstrap interval)", "", "| variant | accuracy | 95% CI | n | unanswered |",
                  "|---|---:|---|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {_pct(r['accuracy'])} | {_ci(r['ci95'])} | {r['n']} | {r.get('unanswered', 0)} |")
    if body.get("comparisons"):
        lines += ["", "## Paired comparisons (exact McNemar test)", "",
                  "| a | b | a − b (points) | 95% CI | p | only a right | only b right | both | neither |",
                  "|---|---|---:|---|---:|---:|---:|---:|---:|"]
        for c in body["comparisons"]:
            lines.append(f"| {c['a']} | {c['b']} | {_pct(c['difference'])} | {_ci(c['ci95'])} | {c['p_value']:.3g} "
                         f"| {c['a_only']} | {c['b_only']} | {c['both']} | {c['neither']} |")
    for key, title in (("by_source", "source"), ("by_department", "department")):
        groups = sorted({g for r in results.values() for g in r.get(key, {})})
        if not groups or (len(groups) < 2 and key == "by_department"):
            continue
        lines += ["", f"## Accuracy per {title} (%, 95% bootstrap interval)", "", "| " + title + " | n | " + " | ".join(results) + " |",
                  "|---|---:|" + "---:|" * len(results)]
        for g in groups:
            n = next(r[key][g]["n"] for r in results.values() if g in r.get(key, {}))
            cells = [f"{_pct(r[key][g]['accuracy'])} {_ci(r[key][g]['ci95'])}" if g in r.get(key, {}) else "—"
                     for r in results.values()]
            lines.append(f"| {g} | {n} | " + " | ".join(cells) + " |")
    if body.get("perplexity"):
        lines += ["", "## Held-out bits per token (lower is better)", "", "| variant | bits/token | 95% CI | n |",
                  "|---|---:|---|---:|"]
        for name, p in body["perplexity"]["variants"].items():
            lines.append(f"| {name} | {p['bits_per_token']:.4f} | [{p['ci95'][0]:.4f}, {p['ci95'][1]:.4f}] | {p['n']} |")
        for c in body["perplexity"].get("comparisons", []):
            lines.append(f"\n{c['a']} − {c['b']}: {c['difference']:+.4f} bits/token, 95% CI "
                         f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]; {c['a_lower']} of {c['n']} items lower under {c['a']}")
    for c in body.get("comparisons", []):
        if c["a_only_ids"] or c["b_only_ids"]:
            lines += ["", f"### Items {c['a']} and {c['b']} disagree on", "",
                      f"- only {c['a']} right ({c['a_only']}): " + ", ".join(c["a_only_ids"][:50])
                      + (" …" if len(c["a_only_ids"]) > 50 else ""),
                      f"- only {c['b']} right ({c['b_only']}): " + ", ".join(c["b_only_ids"][:50])
                      + (" …" if len(c["b_only_ids"]) > 50 else "")]
    if files:
        pngs = [f for k, f in files.items() if f.endswith(".png")]
        if pngs:
            lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in pngs]
    versions = body.get("versions", {})
    lines += ["", "---", "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    return "\n".join(lines)


def plot_scores(out: Path, scores: dict[str, Any]) -> dict[str, Path]:
    """accuracy.png (each variant with its interval) and, with more than one group, sources.png and
    departments.png (grouped bars per variant)."""
    results = scores.get("results", {})
    if not results:
        return {}
    import numpy as np

    from finemed_cli.plots import pyplot, save_png

    plt = pyplot()
    paths = {}
    names = list(results)
    acc = np.array([100 * results[n]["accuracy"] for n in names])
    lo = np.array([100 * results[n]["ci95"][0] for n in names])
    hi = np.array([100 * results[n]["ci95"][1] for n in names])
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(names) + 2), 3.5), dpi=120)
    ax.bar(names, acc, color="tab:blue", alpha=0.8)
    ax.errorbar(names, acc, yerr=[acc - lo, hi - acc], fmt="none", ecolor="black", capsize=5)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)  # room above 100 for an interval's cap
    ax.set_title(f"accuracy with 95% bootstrap interval ({scores.get('items', 0)} items)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths["accuracy_png"] = save_png(fig, out / "accuracy.png")
    for key, file in (("by_source", "sources.png"), ("by_department", "departments.png")):
        groups = sorted({g for r in results.values() for g in r.get(key, {})})
        if len(groups) < 2:
            continue
        width = 0.8 / len(names)
        x = np.arange(len(groups))
        fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(groups) * len(names) + 2), 4), dpi=120)
        for i, n in enumerate(names):
            vals = [100 * results[n][key][g]["accuracy"] if g in results[n][key] else 0 for g in groups]
            ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=n)
        ax.set_xticks(x, [f"{g}\n(n={next(r[key][g]['n'] for r in results.values() if g in r[key])})"
                          for g in groups], rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center",
                      fontsize=8)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 105)  # room above 100 for an interval's cap
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"accuracy per {key.removeprefix('by_')}")
        fig.tight_layout()
        paths[key.removeprefix("by_") + "_png"] = save_png(fig, out / file)
    return paths

