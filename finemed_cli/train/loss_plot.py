"""Loss curves of a training stage, from its metrics JSONL."""

from __future__ import annotations

from pathlib import Path

import orjson


def plot_losses(metrics: Path, out: Path, title: str) -> Path | None:
    """A PNG of loss (and DPO accuracy, when logged) per optimizer step; None when nothing was logged."""
    if not metrics.is_file():
        return None
    rows = [orjson.loads(line) for line in metrics.read_bytes().splitlines() if line.strip()]
    if not rows:
        return None
    from finemed_cli.plots import pyplot, save_png

    plt = pyplot()
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, [r["loss"] for r in rows], label="train loss", color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if "accuracy" in rows[0]:
        ax2 = ax.twinx()
        ax2.plot(steps, [r["accuracy"] for r in rows], label="chosen wins", color="tab:orange", alpha=0.7)
        ax2.set_ylabel("chosen wins (share)")
        ax2.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, out)
