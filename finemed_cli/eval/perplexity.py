"""Scoring of `finemed eval --mode perplexity`: token-weighted bits per token of held-out records."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from finemed_cli.eval.records import BitsPerToken, PerplexityComparison, PerplexityScores
from finemed_cli.eval.results import result_records
from finemed_cli.eval.stats import ratio_intervals


def score_perplexity(files: dict[str, Path], seed: int = 0, n_boot: int = 2000) -> PerplexityScores:
    """Bits per token per variant with a bootstrap interval over records, and each pair's paired difference on
    the records all variants have."""
    rows = {name: {r["id"]: r for r in result_records(path, "perplexity") if "skipped" not in r}
            for name, path in files.items()}
    common = sorted(set.intersection(*(set(r) for r in rows.values())))
    nats = {k: np.array([t[i]["nats"] for i in common], dtype=float) / math.log(2) for k, t in rows.items()}
    toks = {k: np.array([t[i]["tokens"] for i in common], dtype=float) for k, t in rows.items()}
    single, pairs = ratio_intervals(nats, toks, n_boot=n_boot, seed=seed)
    variants = {k: BitsPerToken(iv.estimate, len(common), (iv.low, iv.high)) for k, iv in single.items()}
    comparisons = tuple(
        PerplexityComparison(a, b, iv.estimate, len(common), (iv.low, iv.high),
                             int(((nats[a] / toks[a]) < (nats[b] / toks[b])).sum()))
        for (a, b), iv in pairs.items()) if common else ()
    return PerplexityScores(len(common), comparisons, variants)
