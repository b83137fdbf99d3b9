"""The benchmark items an eval runs on: medical subsets, the limit per file, checks that they can be scored,
and the question file written for the run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orjson

from finemed_cli.data.output import atomic_write
from finemed_cli.errors import DataError
from finemed_cli.eval.benchmarks import BenchmarkItem

logger = logging.getLogger(__name__)

# The medical subsets the literature reports: MMLU's six medical subjects (as the Open Medical-LLM Leaderboard and
# Med-PaLM) and MMLU-Pro's health category.
MEDICAL_SUBJECTS = {
    "mmlu": {"anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
             "professional_medicine"},
    "mmlu_pro": {"health"},
}


def medical_only(path: Path, items: list[BenchmarkItem]) -> list[BenchmarkItem]:
    """The items of a full MMLU or MMLU-Pro file that belong to its medical subjects (others pass as they are)."""
    def medical(it: BenchmarkItem) -> bool:
        wanted = MEDICAL_SUBJECTS.get(it.source)
        return wanted is None or it.department is None or it.department.strip().lower().replace(" ", "_") in wanted

    kept = [it for it in items if medical(it)]
    if len(kept) < len(items):
        if not kept:
            raise DataError(f"{path}: none of its subjects is medical ({', '.join(sorted(MEDICAL_SUBJECTS['mmlu']))}; "
                            "MMLU-Pro: health); pass --subjects all to evaluate them anyway")
        logger.warning("%s: %d of %d items are in medical subjects and kept (--subjects all keeps every one)",
                       path, len(kept), len(items))
    return kept


def first_clean(per_file: list[list[BenchmarkItem]], kept_ids: set[str], limit: int) -> tuple[list[BenchmarkItem], set[str]]:
    """With --drop-contaminated and --limit: the first `limit` clean items of each file, and the ids looked at."""
    scanned: set[str] = set()
    final = []
    for items in per_file:
        n = 0
        for it in items:
            if n == limit:
                break
            scanned.add(it.question.id)
            if it.question.id in kept_ids:
                final.append(it)
                n += 1
    return final, scanned


def check_items(inputs: list[Path], items: list[BenchmarkItem]) -> None:
    """The items to evaluate can be scored (options and a gold answer each) and told apart (unique ids)."""
    unlabelled = [it.question.id for it in items if it.question.answer is None or not it.question.options]
    if unlabelled:
        raise DataError(f"{len(unlabelled)} item(s) of {', '.join(map(str, inputs))} have no options or no gold "
                        f"answer, so cannot be scored (first: {', '.join(unlabelled[:3])}); add 'options' and "
                        "'answer', or answer them with `finemed answer`")
    seen: dict[str, int] = {}
    for it in items:
        seen[it.question.id] = seen.get(it.question.id, 0) + 1
    dupes = [i for i, n in seen.items() if n > 1]
    if dupes:
        raise DataError(f"the input files share item ids ({', '.join(dupes[:5])}): the same questions twice, or "
                        "files without an 'id' field, whose ids come from line numbers; evaluate them in "
                        "separate runs")


def write_questions(items: list[BenchmarkItem], path: Path) -> None:
    """The items as a finemed question file (what `finemed answer` reads), written atomically."""
    lines = []
    for it in items:
        q = it.question
        body: dict[str, Any] = {"id": q.id, "question": q.question, "source": it.source}
        for key in ("options", "answer", "context"):
            if getattr(q, key) is not None:
                body[key] = getattr(q, key)
        body["meta"] = {**q.meta, "department": it.department}
        lines.append(orjson.dumps(body))
    atomic_write(path, b"\n".join(lines) + b"\n")
