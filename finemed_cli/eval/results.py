"""Where `finemed eval` keeps each variant's per-item results, and what they were made with.

Output folder:
    questions.jsonl               the items, in finemed's question schema (after decontamination)
    answers/<variant>.jsonl       generate mode: `finemed answer` records
    loglik/<variant>.jsonl        loglik mode: option log-likelihoods per item
    perplexity/<variant>.jsonl    perplexity mode: nats and tokens per held-out record
    <kind>/<variant>.settings.json   what the results depend on; a rerun with other settings is refused
    report.json, report.md, *.png
    lm-eval/<variant>/            the results in lm-evaluation-harness's format (results_*.json, samples_*.jsonl)
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from finemed_cli.config.answer import TTTConfig
from finemed_cli.config.eval import EMBEDDED
from finemed_cli.config.loader import settings_diff
from finemed_cli.data.jsonl import iter_jsonl
from finemed_cli.data.output import atomic_write, check_output, ensure_parent
from finemed_cli.errors import ConfigError, DataError
from finemed_cli.eval.score import Outcome, relevance_of
from finemed_cli.eval.variants import Variant

logger = logging.getLogger(__name__)

# What eval writes into its output folder (reports always; the rest when it runs variants): none of it may be
# an input.
REPORT_FILES = ("report.json", "report.md", "accuracy.png", "sources.png", "departments.png", "relevance.png")
REPORT_DIRS = ("lm-eval",)  # lm-eval-harness's results_<date>.json and samples_<task>_<date>.jsonl per variant
RUN_FILES = ("questions.jsonl",)
RUN_DIRS = ("answers", "loglik", "perplexity")


def check_eval_output(out: Path, inputs: list[Any], running: bool) -> None:
    """The report folder and every file eval writes into it are not inputs and can be written (nothing made);
    `running`: variants are run, so their questions and results are written too."""
    check_output(out, inputs=inputs, kind="dir", what="report folder")
    for name in REPORT_FILES + (RUN_FILES if running else ()):
        check_output(out / name, inputs=inputs, what="report file")
    for name in REPORT_DIRS:
        check_output(out / name, inputs=inputs, kind="dir", what="report folder")
    for name in RUN_DIRS if running else ():
        check_output(out / name, inputs=inputs, kind="dir", replaces=True, what="results folder")


def file_name(variant: str) -> str:
    """A file name for the variant's results; distinct variants get distinct names (`ttt@runs/a b` and
    `ttt@runs/a_b` differ by a short hash of the variant)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", variant).strip("_") or "variant"
    if safe != variant:
        safe += "-" + hashlib.sha1(variant.encode()).hexdigest()[:8]
    return safe


def variant_settings(v: Variant, dtype: str, ttt: TTTConfig, seed: int, index: Path | None,
                     **extra: Any) -> dict[str, Any]:
    """What a variant's results depend on: not the batch size (equal up to rounding), and the seed only where
    something is random (TTT, sampled generation)."""
    # every TTT setting the results depend on (a settings file beside the index may change any of them)
    full = {k: val for k, val in v.describe(ttt).items() if k not in ("model", "ttt")}
    settings = {"variant": v.name, "model": v.model or EMBEDDED, "dtype": dtype,
                "ttt": "off" if v.ttt == "off" else {"mode": v.ttt, **full,
                                                     "index": str(Path(index).resolve()) if index else None}}
    if v.icl:  # the neighbours shown in the prompt (recorded only then: earlier results still resume)
        settings["icl"] = {**v.describe(ttt)["icl"], "index": str(Path(index).resolve()) if index else None}
    if v.retrieves or extra.get("temperature"):  # random-of-3 picks by the seed
        settings["seed"] = seed
    return {**settings, **extra}


def claim_results(path: Path, settings: dict[str, Any]) -> None:
    """Record the settings `path`'s results are made with (`<path>.settings.json`) before any is written,
    and refuse to resume results made with other settings: they would be reported under this run's."""
    side = path.with_name(path.stem + ".settings.json")
    data = path.read_bytes() if path.is_file() else b""
    has_results = bool(data[: data.rfind(b"\n") + 1].strip())  # a complete line (a torn one is cut on resume)
    if has_results and side.is_file():
        try:
            old = orjson.loads(side.read_bytes())
        except orjson.JSONDecodeError:
            raise ConfigError(f"{side} is not valid JSON; delete it and {path} to recompute the results") from None
        if (diff := settings_diff(old, settings)) is not None:
            was, now = diff
            raise ConfigError(f"{path} holds results made with {was}; this run has {now}. Use another -o "
                              f"folder, rerun with the same settings, or delete {path} to recompute it")
        return
    if has_results:
        logger.warning("%s: results from a run that did not record its settings; resuming them as they are", path)
    ensure_parent(side)
    atomic_write(side, orjson.dumps(settings, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))


def first_record(path: Path) -> Any:
    for _, obj in iter_jsonl(path):
        return obj
    raise DataError(f"{path}: the file is empty")


# The fields a variant's per-item record has, by mode; a record without them was written by something else.
RESULT_FIELDS = {"loglik": ("prediction", "prediction_norm"), "perplexity": ("nats", "tokens")}


def result_records(path: Path, kind: str) -> Iterator[dict[str, Any]]:
    """The per-item records of a `kind` results file (an item eval skipped is yielded as it is).

    Raises:
        DataError: a line is not such a record (another verb wrote into the file while eval was not running).
    """
    fields = RESULT_FIELDS[kind]
    for line, r in iter_jsonl(path):
        if isinstance(r, dict) and isinstance(r.get("id"), str) and ("skipped" in r or all(f in r for f in fields)):
            yield r
            continue
        raise DataError(f"{path}:{line}: not a {kind} result of finemed eval (no {'/'.join(fields)}; something "
                        "else wrote into this file); delete the file to recompute its results")


def load_answer_outcomes_loglik(path: Path, normalised: bool = False) -> dict[str, Outcome]:
    """Outcomes of a loglik file: `acc` (highest sum) or `acc_norm` (highest sum per character)."""
    key = "_norm" if normalised else ""
    return {r["id"]: Outcome(r["id"], r["prediction" + key], r.get("correct" + key), relevance=relevance_of(r),
                             neighbour_letter=r.get("neighbour_letter"), gated="gated" in r)
            for r in result_records(path, "loglik") if "skipped" not in r}


def generators_used(path: Path) -> list[str]:
    """The generation backends an answer file's responses came from (`--generator auto` resolved)."""
    return sorted({r["generation"]["backend"] for _, r in iter_jsonl(path)
                   if isinstance(r, dict) and isinstance(r.get("generation"), dict) and "backend" in r["generation"]})
