"""`finemed report`: what a FineMed-style dataset looks like: quality and complexity distributions (several
datasets side by side, as the paper's figure compares them), a t-SNE map of the question embeddings coloured
by input file and by department, and a Markdown summary with the counts per department."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

from finemed_cli.data.jsonl import iter_jsonl

SCALES = ("quality", "complexity")


def load_dataset(path: Path) -> list[dict[str, Any]]:
    return [obj for _, obj in iter_jsonl(path) if isinstance(obj, dict)]


def plot_scores(datasets: dict[str, list[dict[str, Any]]], out: Path) -> Path | None:
    """Share of records at each score 1-10, per scale, datasets side by side; None without scores."""
    if not any(r.get(s) is not None for rs in datasets.values() for r in rs for s in SCALES):
        return None
    import numpy as np

    from finemed_cli.plots import pyplot, save_png

    plt = pyplot()
    fig, axes = plt.subplots(1, len(SCALES), figsize=(11, 3.8), dpi=120, sharey=True)
    width = 0.8 / len(datasets)
    for ax, scale in zip(axes, SCALES, strict=True):
        for i, (name, recs) in enumerate(datasets.items()):
            values = [r[scale] for r in recs if isinstance(r.get(scale), int)]
            counts = np.array([values.count(v) for v in range(1, 11)], dtype=float)
            share = counts / max(1, len(values))
            ax.bar(np.arange(1, 11) + i * width - 0.4 + width / 2, 100 * share, width,
                   label=f"{name} (n={len(values)}, mean {np.mean(values) if values else float('nan'):.1f})")
        ax.set_xticks(range(1, 11))
        ax.set_xlabel(scale)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("share of records (%)")
    fig.suptitle("score distributions")
    fig.tight_layout()
    return save_png(fig, out / "scores.png")


def tsne_points(datasets: dict[str, list[dict[str, Any]]]) -> tuple[list[str], list[str], list[str]]:
    """(question texts, the input file of each, the department of each) of every record with a question."""
    rows = [(r["question"], name, r.get("department") or "unclassified")
            for name, recs in datasets.items() for r in recs if isinstance(r.get("question"), str)]
    return [t for t, _, _ in rows], [f for _, f, _ in rows], [d for _, _, d in rows]


def tsne_figure(xy: Any, files: list[str], departments: list[str]) -> Any:
    """The map coloured by input file (one colour per file, so datasets can be compared where they overlap)
    and, beside it, by department."""
    from finemed_cli.plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 6), dpi=120)
    for ax, labels, what in ((axes[0], files, "input file"), (axes[1], departments, "department")):
        order = list(dict.fromkeys(files)) if what == "input file" else sorted(set(labels))
        for label in order:
            idx = [i for i, lab in enumerate(labels) if lab == label]
            ax.scatter(xy[idx, 0], xy[idx, 1], s=10, alpha=0.7, label=f"{label} ({len(idx)})")
        ax.legend(fontsize=7, markerscale=2)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"by {what}")
    fig.suptitle(f"t-SNE of {len(files)} question embeddings")
    fig.tight_layout()
    return fig


def plot_tsne(datasets: dict[str, list[dict[str, Any]]], out: Path, embedder: Any, seed: int = 0) -> Path | None:
    """t-SNE of the question embeddings, coloured by input file and by department; None with fewer than 5
    records."""
    texts, files, departments = tsne_points(datasets)
    if len(texts) < 5:
        return None
    from sklearn.manifold import TSNE

    from finemed_cli.plots import save_png

    vectors = embedder.encode(texts)
    xy = TSNE(n_components=2, perplexity=min(30.0, (len(texts) - 1) / 3), init="pca", random_state=seed,
              metric="cosine").fit_transform(vectors)
    return save_png(tsne_figure(xy, files, departments), out / "tsne.png")


def summary_markdown(datasets: dict[str, list[dict[str, Any]]], plots: list[Path]) -> str:
    lines = ["# finemed report", ""]
    for name, recs in datasets.items():
        lines += [f"## {name}: {len(recs)} records", ""]
        for scale in SCALES:
            values = [r[scale] for r in recs if isinstance(r.get(scale), int)]
            if values:
                lines.append(f"- {scale}: mean {sum(values) / len(values):.2f} over {len(values)} records")
        counts = collections.Counter((r.get("department") or "unclassified", r.get("subdepartment")) for r in recs)
        lines += ["", "| department | sub-department | records |", "|---|---|---:|"]
        for (dept, sub), n in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0]))):
            lines.append(f"| {dept} | {sub or '—'} | {n} |")
        lines.append("")
    lines += [f"![{p.name}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


REPORT_FILES = ("scores.png", "tsne.png", "summary.md")


def dataset_labels(files: list[Path]) -> list[str]:
    """Each file's label in the report: its name without .jsonl, with as many parent folders as it takes to tell
    files of the same name apart (`a/corpus`, `b/corpus`): keyed by name alone, one silently replaced the other."""
    parts = [Path(str(p).removesuffix(".jsonl")).resolve().parts for p in files]
    depth = [1] * len(files)
    while True:
        labels = ["/".join(q[-d:]) for q, d in zip(parts, depth, strict=True)]
        clash = [i for i, label in enumerate(labels) if labels.count(label) > 1 and depth[i] < len(parts[i])]
        if not clash:
            return labels
        for i in clash:
            depth[i] += 1


def write_report(files: list[Path], out: Path, tsne: bool = True, embedder: Any = None) -> list[Path]:
    from finemed_cli.data.output import check_output, ensure_dir

    for name in REPORT_FILES:
        check_output(out / name, inputs=files, what="report file")
    names = dataset_labels(files)
    datasets = {n: load_dataset(p) for n, p in zip(names, files, strict=True)}
    ensure_dir(out)
    plots = [p for p in [plot_scores(datasets, out)] if p]
    if tsne:
        if embedder is None:
            from finemed_cli.retrieval.embed import load_embedder

            embedder = load_embedder(None)
        p = plot_tsne(datasets, out, embedder)
        if p:
            plots.append(p)
    md = out / "summary.md"
    md.write_text(summary_markdown(datasets, plots))
    return [*plots, md]
