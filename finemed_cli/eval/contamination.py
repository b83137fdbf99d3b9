"""Benchmark decontamination by normalised n-gram overlap.

As in GPT-3's and lm-eval-harness's decontamination, texts are normalised (NFKC, lower case, no punctuation)
and split into word n-grams; a question counts as contaminated when a large share of its n-grams occur in
the reference set (a training corpus). Unlike a plain any-n-gram-hit rule, the share makes near-copies and
incidental shared phrases distinguishable, and n is configurable because medical questions are short.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finemed_cli.data.jsonl import iter_jsonl
from finemed_cli.data.text import normalise
from finemed_cli.eval.records import ContaminationReport, FlaggedItem

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Overlap:
    """How much of one text occurs in the index, and the reference it shares most with (None if nothing)."""

    fraction: float
    matched_id: str | None


@dataclass(frozen=True)
class Contamination:
    """A benchmark item whose overlap with the reference set reached the threshold."""

    item_id: str
    fraction: float
    matched_id: str | None


def hash_gram(gram: tuple[str, ...]) -> int:
    """The index key of one n-gram, the same in every process."""
    # blake2b rather than hash(): Python salts str hashes per process, and a stable key lets an index be
    # saved and compared across runs. "\x1f" (unit separator) cannot survive normalise inside a token.
    digest = hashlib.blake2b("\x1f".join(gram).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _grams(tokens: list[str], n: int) -> Iterator[tuple[str, ...]]:
    """The text's n-grams; a text shorter than n tokens is one gram of all its tokens (none if empty)."""
    if len(tokens) < n:
        if tokens:
            yield tuple(tokens)
        return
    for i in range(len(tokens) - n + 1):
        yield tuple(tokens[i : i + n])


class NgramIndex:
    """Hashed n-grams of a reference set, each mapped to the first reference id it was seen in.

    A reference shorter than n tokens is indexed as one gram of its whole text, so a short question only
    matches a reference whose whole normalised text is the same. Keeping one id per gram bounds memory
    (one dict entry per distinct gram); the cost is that a gram shared by several references credits only
    the first when choosing `matched_id`.
    """

    def __init__(self, references: Iterable[tuple[str, str]] = (), n: int = 8) -> None:
        """Index `references`, (id, text) pairs, by their word n-grams.

        Raises:
            ValueError: If n is less than 1.
        """
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        self.n = n
        self._owner: dict[int, str] = {}
        for ref_id, text in references:
            self.add(ref_id, text)

    def __len__(self) -> int:
        """The number of distinct grams indexed."""
        return len(self._owner)

    def add(self, ref_id: str, text: str) -> None:
        """Add one reference; grams already indexed keep their first owner."""
        for gram in _grams(normalise(text), self.n):
            self._owner.setdefault(hash_gram(gram), ref_id)

    def overlap(self, text: str) -> Overlap:
        """The share of the text's distinct n-grams found in the index, and the reference sharing the most.

        Distinct grams are counted, so a phrase repeated within the question does not count twice. Ties
        for `matched_id` go to the reference whose first shared gram comes earliest in the text. A text with
        no tokens has overlap 0.0 and no match.
        """
        seen: set[int] = set()
        shared: dict[str, int] = {}
        for gram in _grams(normalise(text), self.n):
            key = hash_gram(gram)
            if key in seen:
                continue
            seen.add(key)
            owner = self._owner.get(key)
            if owner is not None:
                shared[owner] = shared.get(owner, 0) + 1
        if not seen:
            return Overlap(0.0, None)
        # max() keeps the first of equal counts, and dicts keep insertion (text) order.
        matched = max(shared, key=shared.__getitem__) if shared else None
        return Overlap(sum(shared.values()) / len(seen), matched)


def find_contaminated(
    items: Iterable[tuple[str, str]], index: NgramIndex, threshold: float = 0.5
) -> list[Contamination]:
    """The benchmark items whose n-gram overlap with `index` is at least `threshold`, in input order.

    Args:
        items: (id, text) pairs of the benchmark questions to check.
        index: The reference set (e.g. the training corpus) built with the n to test at.
        threshold: Smallest overlap fraction that counts as contaminated, from 0 to 1.

    Raises:
        ValueError: If threshold lies outside [0, 1].
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie between 0 and 1, got {threshold}")
    found: list[Contamination] = []
    for item_id, text in items:
        result = index.overlap(text)
        if result.fraction >= threshold:
            found.append(Contamination(item_id, result.fraction, result.matched_id))
    return found


def reference_texts(paths: list[Path], index_records: list[Any]) -> list[tuple[str, str]]:
    """(id, text) of every training/index text to check benchmark items against: questions, prompts,
    instructions and user turns, whatever the record shape."""
    refs = [(r.id, r.question) for r in index_records]
    for path in paths:
        for line, obj in iter_jsonl(path):
            if not isinstance(obj, dict):
                continue
            rid = str(obj.get("id", f"{path.name}:{line}"))
            for key in ("question", "prompt", "instruction"):
                value = obj.get(key)
                if isinstance(value, str):
                    refs.append((rid, value))
                elif isinstance(value, list):
                    refs += [(rid, m.get("content", "")) for m in value if isinstance(m, dict)]
            for m in obj.get("messages") or obj.get("conversations") or []:
                if isinstance(m, dict) and m.get("role", m.get("from")) in ("user", "human"):
                    refs.append((rid, m.get("content", m.get("value", ""))))
    return refs


def decontaminate(items: list[Any], refs: list[tuple[str, str]], n: int, threshold: float,
                  drop: bool) -> tuple[list[Any], ContaminationReport]:
    """The items left (all of them unless `drop`) and the report of those whose `n`-grams overlap `refs` by
    `threshold` or more."""
    index = NgramIndex(refs, n=n)
    found = find_contaminated([(it.question.id, it.question.question) for it in items], index, threshold)
    info = ContaminationReport(n, threshold, len(refs), drop,
                               tuple(FlaggedItem(c.item_id, round(c.fraction, 3), c.matched_id) for c in found))
    if found:
        logger.warning("%d of %d benchmark items overlap the reference texts (>= %.0f%% of their %d-grams)%s; "
                       "first: %s", len(found), len(items), 100 * threshold, n,
                       ", dropped" if drop else " (pass --drop-contaminated to leave them out)",
                       ", ".join(f"{c.item_id}~{c.matched_id}" for c in found[:5]))
    if drop:
        bad = {c.item_id for c in found}
        items = [it for it in items if it.question.id not in bad]
    return items, info


