"""Benchmarks as they come (MedQA, MedMCQA, PubMedQA, MMLU, MMLU-Pro, finemed), in files or Hub datasets
(`hf:org/name[:config]`, data/sources.py) → `QuestionRecord`s.

`finemed eval` should not need a conversion step per benchmark, so each upstream shape is read directly. The
shape is detected from the first record and every later record must fit it, because a silently mixed file
would skew the per-source statistics. Each item also carries the labels that the report groups by: its
`source` (benchmark name) and `department` (subject or category, when the benchmark has one).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from finemed_cli.config.eval import SOURCES
from finemed_cli.data.csvfile import iter_csv
from finemed_cli.data.jsonl import MAX_REPORTED_ERRORS, RecordError, check_input_file, iter_jsonl
from finemed_cli.data.records import OPTION_LETTERS, QuestionRecord
from finemed_cli.data.sources import EVAL_SPLITS, parse_hub_dataset, source_rows
from finemed_cli.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}
_MMLU_SPLIT_SUFFIX = re.compile(r"_(test|dev|val|train)$")
Label = int | str  # a line number, or "PMID <n>" for the one-object ori_pqal.json


@dataclass(frozen=True)
class BenchmarkItem:
    """One question with the labels used for per-group statistics."""

    question: QuestionRecord
    source: str
    department: str | None


def detect_source(obj: dict) -> str | None:
    """The benchmark whose shape one record has (its keys), or None when it fits none of `SOURCES`."""
    if "opa" in obj and "cop" in obj:
        return "medmcqa"
    if "final_decision" in obj or "pubid" in obj or "QUESTION" in obj:
        return "pubmedqa"
    if "question_id" in obj and isinstance(obj.get("options"), list):
        return "mmlu_pro"
    if "answer_idx" in obj or "meta_info" in obj:
        return "medqa"
    if "choices" in obj and "question" in obj:
        return "mmlu"
    if "question" in obj and "reasoning" not in obj:  # reasoning traces also have a question: not a benchmark
        return "finemed"
    return None


def normalise_source(value: str) -> str:
    """'medqa_usmle', 'MedQA-dev', 'mmlu_medical' → the SOURCES name they start with; others unchanged."""
    v = value.strip().lower().replace("-", "_")
    for name in sorted(SOURCES, key=len, reverse=True):  # longest first: mmlu_pro before mmlu
        if v == name or (v.startswith(name) and not v[len(name)].isalnum()):
            return name
    return value


def _prefixed(source: str, raw: Any) -> str:
    raw = str(raw).strip()
    return raw if raw.startswith(f"{source}-") else f"{source}-{raw}"


def _text(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value.strip() or None if isinstance(value, str) else None


def _index(value: Any, n: int, field: str) -> int:
    """A 0-based option index from an int or an option letter."""
    letter = value.strip().upper() if isinstance(value, str) else None
    if letter and len(letter) == 1 and letter in OPTION_LETTERS[:n]:
        return OPTION_LETTERS.index(letter)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n:
        return value
    letters = f"A–{OPTION_LETTERS[n - 1]}" if n else "A–"
    raise RecordError(f"field {field!r} is {value!r}; expected an index below {n} or a letter {letters}")


# Each parser: (record, label) → (QuestionRecord, source, department); raises RecordError naming the field.
Parsed = tuple[QuestionRecord, str, str | None]


def _finemed(obj: dict[str, Any], label: Label) -> Parsed:
    if (shape := detect_source(obj)) != "finemed":  # else a MedMCQA row would pass as an open question
        raise RecordError(f"this record has the shape of {shape or 'no known benchmark'}, not finemed's")
    rec = QuestionRecord.from_json(obj)
    source = normalise_source(s) if (s := _text(obj, "source")) else "finemed"
    keys = ("department", "subject", "subject_name", "category")
    return rec, source, next((t for k in keys if (t := _text(rec.meta, k))), None)


def _medqa(obj: dict[str, Any], label: Label) -> Parsed:
    options = obj.get("options")
    if not isinstance(options, dict):
        raise RecordError('field \'options\' must be an object like {"A": "…", "B": "…"}')
    letter = obj.get("answer_idx")
    if letter is None:  # no letter: find the answer text among the options
        answer = str(obj.get("answer")).strip()
        letter = next((k for k, t in options.items() if isinstance(t, str) and t.strip() == answer), None)
        if letter is None:
            raise RecordError(f"no 'answer_idx', and 'answer' {obj.get('answer')!r:.60} is not an option")
    elif letter in options and _text(obj, "answer") not in (None, str(options[letter]).strip()):
        gold, answer = options[letter], obj["answer"]
        raise RecordError(f"'answer_idx' {letter!r} is {gold!r:.50} but 'answer' is {answer!r:.50}; fix one")
    rid = _prefixed("medqa", obj["id"]) if obj.get("id") is not None else f"medqa-{label}"
    meta = {"meta_info": obj["meta_info"]} if "meta_info" in obj else {}
    rec = QuestionRecord.from_json(
        {"id": rid, "question": obj.get("question"), "options": options, "answer": letter, "meta": meta}
    )
    return rec, "medqa", None


def _medmcqa(obj: dict[str, Any], label: Label, base: int) -> Parsed:
    cop = obj.get("cop")
    if isinstance(cop, bool) or not isinstance(cop, int) or not base <= cop <= base + 3:
        hint = "; -1 marks the unlabelled test split, use the validation split" if cop == -1 else ""
        raise RecordError(f"field 'cop' is {cop!r}; {base}-based cop must be {base}–{base + 3}{hint}")
    if obj.get("id") is None:
        raise RecordError("missing field 'id'")
    meta = {k: obj[k] for k in ("topic_name", "choice_type") if obj.get(k) is not None}
    if obj.get("exp"):
        meta["explanation"] = obj["exp"]
    rec = QuestionRecord.from_json({
        "id": _prefixed("medmcqa", obj["id"]), "question": obj.get("question"),
        "options": {L: obj.get(f"op{L.lower()}") for L in "ABCD"}, "answer": "ABCD"[cop - base], "meta": meta,
    })
    return rec, "medmcqa", _text(obj, "subject_name")


def _pubmedqa(obj: dict[str, Any], label: Label) -> Parsed:
    if "QUESTION" in obj:  # ori_pqal.json
        question, long = obj["QUESTION"], obj.get("LONG_ANSWER")
        passages, labels = obj.get("CONTEXTS"), obj.get("LABELS")
    else:  # Hugging Face pqa_labeled
        ctx = obj.get("context") if isinstance(obj.get("context"), dict) else {}
        question, long = obj.get("question"), obj.get("long_answer")
        passages, labels = ctx.get("contexts"), ctx.get("labels")
    if not isinstance(passages, list) or not all(isinstance(t, str) for t in passages):
        raise RecordError("the context passages must be a list of strings (CONTEXTS or context.contexts)")
    if labels is not None and (not isinstance(labels, list) or len(labels) != len(passages)):
        raise RecordError(f"{len(passages)} passages but labels {labels!r:.80}; give one label per passage")
    decision = str(obj.get("final_decision", "")).strip().lower()
    if decision not in PUBMEDQA_OPTIONS.values():
        raise RecordError(f"field 'final_decision' is {obj.get('final_decision')!r}; use yes, no or maybe")
    if obj.get("pubid") is None:
        raise RecordError("missing field 'pubid' (the PMID)")
    labels = labels or [None] * len(passages)
    context = "\n".join(f"{lab}: {t}" if lab else t for lab, t in zip(labels, passages, strict=True))
    rec = QuestionRecord.from_json({
        "id": _prefixed("pubmedqa", obj["pubid"]), "question": question, "options": PUBMEDQA_OPTIONS,
        "answer": next(k for k, v in PUBMEDQA_OPTIONS.items() if v == decision), "context": context,
        "meta": {"pmid": str(obj["pubid"]), **({"long_answer": long} if long else {})},
    })
    return rec, "pubmedqa", None


def _mmlu(obj: dict[str, Any], label: Label) -> Parsed:
    opts, subject = obj.get("choices"), _text(obj, "subject")
    if not isinstance(opts, list):
        raise RecordError(f"field 'choices' must be a list of texts, got {type(opts).__name__}")
    a = OPTION_LETTERS[_index(obj.get("answer"), len(opts), "answer")]
    rid = f"mmlu-{subject}-{label}" if subject else f"mmlu-{label}"
    rec = QuestionRecord.from_json({"id": rid, "question": obj.get("question"), "options": opts, "answer": a})
    return rec, "mmlu", subject


def _mmlu_pro(obj: dict[str, Any], label: Label) -> Parsed:
    options = obj.get("options")
    if not isinstance(options, list):
        raise RecordError(f"field 'options' must be a list of texts, got {type(options).__name__}")
    index = _index(obj.get("answer_index", obj.get("answer")), len(options), "answer_index")
    if obj.get("answer") is not None and _index(obj["answer"], len(options), "answer") != index:
        raise RecordError(f"'answer' {obj['answer']!r} disagrees with 'answer_index' {index}; fix one")
    # MMLU-Pro pads short option lists with "N/A"; they are not choices, so drop them and re-letter.
    if str(options[index]).strip() == "N/A":
        raise RecordError("the gold option is the 'N/A' padding; this item has no real answer")
    keep = [i for i, t in enumerate(options) if str(t).strip() != "N/A"]
    meta = {"src": obj["src"]} if obj.get("src") else {}
    rec = QuestionRecord.from_json({
        "id": _prefixed("mmlu_pro", obj.get("question_id")), "question": obj.get("question"),
        "options": [options[i] for i in keep], "answer": OPTION_LETTERS[keep.index(index)], "meta": meta,
    })
    return rec, "mmlu_pro", _text(obj, "category")


def _read_rows(p: Path, errors: list[str]) -> list[tuple[Label, dict[str, Any]]]:
    """(label, record) pairs from JSONL, a one-object JSON file (ori_pqal.json) or an MMLU CSV."""
    check_input_file(p, "a benchmark file")
    if p.suffix.lower() == ".csv":  # MMLU: question,A,B,C,D,answer; re-exports from HF add a header
        subject = _MMLU_SPLIT_SUFFIX.sub("", p.stem)
        rows: list[tuple[Label, dict[str, Any]]] = []
        for number, cells in iter_csv(p):
            if not cells:
                continue
            if number == 1 and cells[0].strip().lower() == "question":
                continue
            if len(cells) != 6:
                errors.append(f"{p}:{number}: {len(cells)} columns; expected question,A,B,C,D,answer")
                continue
            answer = int(cells[5]) if cells[5].strip().isdigit() else cells[5]
            row = {"question": cells[0], "choices": cells[1:5], "answer": answer, "subject": subject}
            rows.append((number, row))
        return rows
    if p.suffix.lower() == ".json":
        try:
            whole = orjson.loads(p.read_bytes().removeprefix(b"\xef\xbb\xbf"))
        except orjson.JSONDecodeError:
            whole = None  # not one JSON document: read it as JSONL
        if isinstance(whole, list):
            out = p.with_suffix(".jsonl")
            raise DataError(f"{p}: a JSON array, not JSONL; convert it first: jq -c '.[]' {p} > {out}")
        if isinstance(whole, dict) and all(isinstance(v, dict) for v in whole.values()):
            return [(f"PMID {k}", {**v, "pubid": k}) for k, v in whole.items()]  # ori_pqal.json: PMID → item
        if isinstance(whole, dict):
            return [(1, whole)]  # one record, maybe pretty-printed
    rows = []
    for number, value in iter_jsonl(p, errors):
        if isinstance(value, dict):
            rows.append((number, value))
        else:
            errors.append(f"{p}:{number}: expected a JSON object, got {type(value).__name__}")
    return rows


def _infer_cop_base(p: Path, rows: list[tuple[Label, dict[str, Any]]]) -> int:
    """MedMCQA's release is 1-based; Hugging Face copies are 0-based. Only a 0 or a 4 tells them apart."""
    zero = next((n for n, o in rows if o.get("cop") == 0 and not isinstance(o.get("cop"), bool)), None)
    four = next((n for n, o in rows if o.get("cop") == 4), None)
    if zero is not None and four is not None:
        raise DataError(f"{p}: line {zero} has cop 0 (0-based) but line {four} has cop 4 (1-based); fix one")
    if zero is None and four is None:
        raise DataError(
            f"{p}: every 'cop' is 1–3, so its base cannot be inferred; pass --medmcqa-cop-base 0 "
            "(Hugging Face copies, 0 = A) or 1 (the original MedMCQA release, 1 = A)"
        )
    return 0 if zero is not None else 1


def _unknown_shape(p: Path, first: tuple[Label, dict[str, Any]]) -> DataError:
    """Why the first record fits no known benchmark, and what to do."""
    label, first_row = first
    keys = ", ".join(list(first_row)[:8])
    if "reasoning" in first_row:
        why = ("it holds reasoning examples (question, reasoning, answer): score those with --mode perplexity, "
               "or give a benchmark file")
    elif not any(k in first_row for k in ("question", "Question", "QUESTION", "prompt")):
        why = ("it has no 'question' field, and every item needs its question text (finemed's schema: id, "
               f"question, options, answer); add it, or pass --source (one of {', '.join(SOURCES)})")
    else:
        why = f"pass --source (one of {', '.join(SOURCES)})"
    return DataError(f"{p}:{label}: cannot tell which benchmark this is (keys: {keys}); {why}")


def _parse_rows(p: Path, rows: list[tuple[Label, dict[str, Any]]], source: str, explicit: bool,
                parse: Callable[[dict[str, Any], Label], Parsed], errors: list[str]) -> list[BenchmarkItem]:
    """Every row parsed as `source`; a row of another shape (one file, one benchmark), a bad field or a
    duplicate id goes to `errors`."""
    items: list[BenchmarkItem] = []
    first: dict[str, Label] = {}
    for label, obj in rows:
        shape = detect_source(obj)
        if not explicit and shape != source:  # one file, one benchmark: a mixed file would skew the groups
            errors.append(
                f"{p}:{label}: this record looks like {shape or 'no known benchmark'}, but line "
                f"{rows[0][0]} is {source}; keep one benchmark per file"
            )
            continue
        try:
            rec, src, dept = parse(obj, label)
        except (ValueError, TypeError) as e:  # RecordError, or a field of the wrong type
            hint = f"; this record looks like {shape}, not {source}" if shape not in (None, source) else ""
            errors.append(f"{p}:{label}: {e}{hint}")
            continue
        if rec.id in first:
            at = first[rec.id]
            errors.append(f"{p}:{label}: duplicate id {rec.id!r} (first at line {at}); make ids unique")
            continue
        first[rec.id] = label
        items.append(BenchmarkItem(rec, src, dept))
    return items


def load_benchmark(
    path: str | os.PathLike[str], source: str | None = None, limit: int | None = None,
    medmcqa_cop_base: int | None = None, split: str | None = None, columns: dict[str, str] | None = None,
) -> list[BenchmarkItem]:
    """Read a benchmark in its upstream shape, reporting every bad record at once.

    Args:
        path: a JSONL file, PubMedQA's `ori_pqal.json`, an MMLU `<subject>_<split>.csv`, or `hf:org/name[:config]`.
        source: one of `SOURCES`, to skip detection; records that do not fit it are errors.
        limit: keep the first N items (the whole file is still validated: a short run fails as a full one).
        medmcqa_cop_base: 0 or 1, the base of MedMCQA's `cop`; inferred from the file when None.
        split, columns: a Hub dataset's split [default: test, else validation]; {our_field: their_field}.

    Raises:
        ConfigError: an unknown source, a bad limit or cop base.
        DataError: one `path:line: …` line per bad record (the first 20), or an unknown or empty file.
    """
    if source is not None and source not in SOURCES:
        raise ConfigError(f"source {source!r} is unknown; choose one of {', '.join(SOURCES)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit is {limit}; give a positive number of items, or none for all")
    if medmcqa_cop_base not in (None, 0, 1):
        raise ConfigError(f"medmcqa_cop_base is {medmcqa_cop_base!r}; use 0 (Hugging Face) or 1 (original)")
    if str(path).lower().endswith(".csv") and source not in (None, "mmlu"):
        raise ConfigError(f"{path}: a .csv file is read as MMLU (question,A,B,C,D,answer), not {source}")
    explicit = source is not None
    errors: list[str] = []
    # a file's rows labelled by their line, a Hub dataset's by their 0-based index
    p, _, found = source_rows(parse_hub_dataset(path) or Path(path), split, columns, errors, EVAL_SPLITS, _read_rows)
    rows = list(found)
    if not rows and not errors:
        raise DataError(f"{p}: no records (the file is empty); write one JSON object per line")
    if rows and source is None and (source := detect_source(rows[0][1])) is None:
        raise _unknown_shape(p, rows[0])
    parse: Callable[[dict[str, Any], Label], Parsed]
    if source == "medmcqa":
        base = medmcqa_cop_base if medmcqa_cop_base is not None else _infer_cop_base(p, rows)
        parse = lambda o, n: _medmcqa(o, n, base)  # noqa: E731
    else:
        parsers = {"medqa": _medqa, "pubmedqa": _pubmedqa, "mmlu": _mmlu, "mmlu_pro": _mmlu_pro}
        parse = parsers.get(source or "finemed", _finemed)
    items = _parse_rows(p, rows, source, explicit, parse, errors)
    if errors:
        extra = len(errors) - MAX_REPORTED_ERRORS
        more = f"\n… and {extra} more" if extra > 0 else ""
        raise DataError("\n".join(errors[:MAX_REPORTED_ERRORS]) + more)
    logger.info("%s: %d %s items", p, len(items), source)
    return items[:limit] if limit is not None else items
