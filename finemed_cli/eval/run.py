"""`finemed eval`: run variants (TTT on, off, the paper's TTT, other models) on the same benchmark items
with the same seed, keep each variant's per-item results resumably, score them together and write the
report.

Output folder:
    questions.jsonl               the items, in finemed's question schema (after decontamination)
    answers/<variant>.jsonl       generate mode: `finemed answer` records
    loglik/<variant>.jsonl        loglik mode: option log-likelihoods per item
    perplexity/<variant>.jsonl    perplexity mode: nats and tokens per held-out record
    report.json, report.md, *.png
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from finemed_cli.data.jsonl import JsonlAppender, iter_jsonl
from finemed_cli.data.output import ensure_dir
from finemed_cli.errors import ConfigError, DataError
from finemed_cli.models.embedded import DEFAULT_MODEL_NAME

logger = logging.getLogger(__name__)
MODES = ("generate", "loglik", "perplexity")
EMBEDDED = f"{DEFAULT_MODEL_NAME} (embedded)"  # what an unset --model loads
TTT_MODES = {"ttt": "lora", "no-ttt": "off", "paper": "paper"}


@dataclass(frozen=True)
class Variant:
    name: str
    ttt: str  # lora, off or paper
    model: str | None


def parse_variants(spec: str, model: str | None) -> list[Variant]:
    """`ttt,no-ttt,paper,ttt@runs/x/final`: a TTT setting, optionally `@` another model (HF dir or id)."""
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        kind, _, other = part.partition("@")
        if kind not in TTT_MODES:
            raise ConfigError(f"--compare: unknown variant {part!r}; use {', '.join(TTT_MODES)}, each optionally "
                              "followed by @MODEL (e.g. ttt@runs/tiny/final)")
        out.append(Variant(part, TTT_MODES[kind], other or model))
    if len({v.name for v in out}) != len(out):
        raise ConfigError(f"--compare: a variant is named twice in {spec!r}")
    if not out:
        raise ConfigError("--compare: name at least one variant, e.g. ttt,no-ttt")
    return out


def file_name(variant: str) -> str:
    """A file name for the variant's results; distinct variants get distinct names (`ttt@runs/a b` and
    `ttt@runs/a_b` differ by a short hash of the variant)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", variant).strip("_") or "variant"
    if safe != variant:
        safe += "-" + hashlib.sha1(variant.encode()).hexdigest()[:8]
    return safe


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
        diff = sorted(k for k in old.keys() | settings.keys() if old.get(k) != settings.get(k))
        if diff:
            was = ", ".join(f"{k}={old.get(k)!r}" for k in diff)
            now = ", ".join(f"{k}={settings.get(k)!r}" for k in diff)
            raise ConfigError(f"{path} holds results made with {was}; this run has {now}. Use another -o "
                              f"folder, rerun with the same settings, or delete {path} to recompute it")
        return
    if has_results:
        logger.warning("%s: results from a run that did not record its settings; resuming them as they are", path)
    tmp = side.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(settings, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    tmp.replace(side)


def first_record(path: Path) -> Any:
    for _, obj in iter_jsonl(path):
        return obj
    raise DataError(f"{path}: the file is empty")


# --- decontamination ------------------------------------------------------------------------------------

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
                  drop: bool) -> tuple[list[Any], dict[str, Any]]:
    from finemed_cli.eval.contamination import NgramIndex, find_contaminated

    index = NgramIndex(refs, n=n)
    found = find_contaminated([(it.question.id, it.question.question) for it in items], index, threshold)
    info = {"n": n, "threshold": threshold, "references": len(refs), "flagged": len(found), "dropped": drop,
            "items": [{"id": c.item_id, "overlap": round(c.fraction, 3), "matched": c.matched_id} for c in found]}
    if found:
        logger.warning("%d of %d benchmark items overlap the reference texts (>= %.0f%% of their %d-grams)%s; "
                       "first: %s", len(found), len(items), 100 * threshold, n,
                       ", dropped" if drop else " (pass --drop-contaminated to leave them out)",
                       ", ".join(f"{c.item_id}~{c.matched_id}" for c in found[:5]))
    if drop:
        bad = {c.item_id for c in found}
        items = [it for it in items if it.question.id not in bad]
    return items, info


def write_questions(items: list[Any], path: Path) -> None:
    """The items as a finemed question file (what `finemed answer` reads), written atomically."""
    lines = []
    for it in items:
        q = it.question
        body = {"id": q.id, "question": q.question, "source": it.source}
        for key in ("options", "answer", "context"):
            if getattr(q, key) is not None:
                body[key] = getattr(q, key)
        body["meta"] = {**q.meta, "department": it.department}
        lines.append(orjson.dumps(body))
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(b"\n".join(lines) + b"\n")
    tmp.replace(path)


# --- running variants ---------------------------------------------------------------------------------

def _auto_dtype(mode: str, dtype: str, device: str, adapts: bool) -> str:
    """`--dtype auto` for loglik without TTT on a CPU with native bf16 matmuls is bfloat16. Measured on the 2-core CI
    machine (AVX512-BF16), no-ttt over 545 items (`--limit 200` of the shared MedQA dev + train sample, MedMCQA,
    MMLU medical, PubMedQA): 236.6 s in fp32, 139.1 s in bf16 (1.70x), acc 36.5% vs 36.7% (532 of 545
    predictions identical, 3 vs 4 items right in one only), acc_norm 38.2% in both. With a TTT variant
    (`adapts`), and in generation and perplexity, load_model's auto stays (fp32 on CPU): what TTT changes is
    small enough for bf16's rounding to blur the paired comparison."""
    from finemed_cli.models.loading import cpu_has_fast_bf16, pick_device

    if (mode == "loglik" and not adapts and dtype in (None, "auto") and pick_device(device) == "cpu"
            and cpu_has_fast_bf16()):
        return "bfloat16"
    return dtype


def variant_settings(v: Variant, models: Models, ttt: Any, seed: int, index: Path | None,
                     **extra: Any) -> dict[str, Any]:
    """What a variant's results depend on: not the batch size (equal up to rounding), and the seed only where
    something is random (TTT, sampled generation)."""
    mine = _ttt(ttt, v.ttt)
    settings = {"variant": v.name, "model": v.model or EMBEDDED, "dtype": models.dtype,
                "ttt": "off" if v.ttt == "off" else {"mode": v.ttt, "k": ttt.k, "steps": mine.resolved_steps(),
                                                     "lr": mine.resolved_lr(),
                                                     "index": str(Path(index).resolve()) if index else None}}
    if v.ttt != "off" or extra.get("temperature"):
        settings["seed"] = seed
    return {**settings, **extra}


class Models:
    """Loads each model once, whatever the number of variants using it."""

    def __init__(self, device: str, dtype: str) -> None:
        self.device, self.dtype, self._cache = device, dtype, {}

    def get(self, name: str | None) -> Any:
        if name not in self._cache:
            from finemed_cli.models.loading import load_model

            self._cache.clear()  # one model in memory at a time
            self._cache[name] = load_model(name, device=self.device, dtype=self.dtype)
        return self._cache[name]


# Extra hits searched when an item's own record must be skipped: itself and copies of it under other ids.
_SELF_MARGIN = 3


def _neighbours(index: Any, embedder: Any, texts: list[str], k: int, exclude: list[str] | None = None) -> list[list[Any]]:
    """k neighbours per text; with `exclude` (the items' ids: held-out records of the index corpus), neither an
    item's own record nor a copy of its question under another id is its neighbour."""
    from finemed_cli.eval.contamination import normalise

    hits = index.search(embedder.encode(texts), k + (_SELF_MARGIN if exclude else 0))
    out = []
    for i, hs in enumerate(hits):
        own = normalise(texts[i]) if exclude else None
        keep = [h.record for h in hs
                if not exclude or (h.record.id != exclude[i] and normalise(h.record.question) != own)]
        out.append(keep[:k])
    return out


def run_generate(variants: list[Variant], questions: Path, out: Path, index: Path | None, models: Models,
                 ttt: Any, generation: Any, seed: int, progress: bool, batch_size: int = 1) -> dict[str, Path]:
    from finemed_cli.config.answer import AnswerConfig
    from finemed_cli.pipeline.answer import run_answer

    (out / "answers").mkdir(parents=True, exist_ok=True)
    files = {}
    for v in variants:
        path = out / "answers" / f"{file_name(v.name)}.jsonl"
        claim_results(path, variant_settings(v, models, ttt, seed, index, max_new_tokens=generation.max_new_tokens,
                                             generator=generation.backend, temperature=generation.temperature,
                                             top_p=generation.top_p, thought_tokens=generation.thought_tokens))
        config = AnswerConfig(questions=questions, output=path, index=index if v.ttt != "off" else None,
                              model=v.model, ttt=_ttt(ttt, v.ttt), generation=generation, seed=seed,
                              device=models.device, dtype=models.dtype,
                              batch_size=batch_size if v.ttt == "lora" else 1)
        logger.info("variant %s: answering into %s", v.name, path)
        run_answer(config, progress=progress, loaded=models.get(v.model))
        files[v.name] = path
    return files


def _ttt(base: Any, mode: str) -> Any:
    import dataclasses

    return dataclasses.replace(base, mode=mode)


def _run_items(kind: str, variants: list[Variant], ids: list[str], texts: list[str], out: Path, index: Any,
               embedder: Any, models: Models, ttt: Any, seed: int, progress: bool, compute: Any,
               exclude_self: bool = False, batch: int = 1, ttt_batch: int = 1,
               settings: dict[str, Any] | None = None) -> dict[str, Path]:
    """For each variant, `compute(loaded, items, adapted, adapter)` on the items not yet in
    `out/kind/<variant>.jsonl` (one record or None per item index). Without TTT `batch` items at once; with
    TTT inside a TTT session on each item's neighbours: one item at a time, or with LoRA TTT `ttt_batch`
    items whose adapters train together (`ttt_batch_session`; `adapter` is then the batched adapter, whose
    segments `compute` sets to the items' token counts). Records are appended as soon as they exist."""
    from tqdm import tqdm

    from finemed_cli.ttt.update import ttt_batch_session, ttt_session

    (out / kind).mkdir(parents=True, exist_ok=True)
    files = {}
    for v in variants:
        path = out / kind / f"{file_name(v.name)}.jsonl"
        files[v.name] = path
        claim_results(path, variant_settings(v, models, ttt, seed, getattr(index, "path", None), **(settings or {})))
        with JsonlAppender(path) as writer:
            todo = [i for i, item_id in enumerate(ids) if item_id not in writer.done_ids]
            if not todo:
                continue
            loaded = models.get(v.model)
            adapted = v.ttt != "off"
            nbrs = (_neighbours(index, embedder, [texts[i] for i in todo], ttt.k,
                                exclude=[ids[i] for i in todo] if exclude_self else None)
                    if adapted else [[] for _ in todo])
            bar = tqdm(total=len(ids), initial=len(ids) - len(todo), desc=f"{kind} {v.name}", unit="item",
                       disable=not progress, dynamic_ncols=True)
            right = scored = 0
            together = adapted and v.ttt == "lora" and ttt_batch > 1
            step = max(1, ttt_batch if together else 1 if adapted else batch)
            for at in range(0, len(todo), step):
                chunk = todo[at : at + step]
                if together:
                    with ttt_batch_session(loaded.model, loaded.tokenizer, nbrs[at : at + step], _ttt(ttt, v.ttt),
                                           seed=seed) as session:
                        recs = compute(loaded, chunk, adapted, session.adapter)
                else:
                    with ttt_session(loaded.model, loaded.tokenizer, nbrs[at], _ttt(ttt, v.ttt), seed=seed):
                        recs = compute(loaded, chunk, adapted, None)
                for j, rec in enumerate(recs):
                    if rec is None:
                        continue
                    writer.append({**rec, "variant": v.name, "neighbours": [n.id for n in nbrs[at + j]]})
                    if "correct" in rec:
                        right, scored = right + int(rec["correct"]), scored + 1
                if scored:
                    bar.set_postfix(acc=f"{right}/{scored}")
                bar.update(len(chunk))
            bar.close()
    return files


# Questions scored per forward pass without TTT. Packing 8 MedQA questions (about 2,000 tokens) with the shared
# system prompt run once took the embedded model from 2.84 to 4.11 questions/s in bf16 and from 1.57 to 2.24 in
# fp32, against one question per pass (80 questions, 2 cores; bench/eval.py).
LOGLIK_BATCH = 8


def run_loglik(variants: list[Variant], items: list[Any], out: Path, index: Any, embedder: Any,
               models: Models, ttt: Any, seed: int, progress: bool, batch_size: int = 1) -> dict[str, Path]:
    import weakref

    from finemed_cli.eval.loglik import loglik_record, option_logliks_batch, shared_prefix

    prefixes: Any = weakref.WeakKeyDictionary()  # model -> its shared prefix, gone with the model

    def compute(loaded: Any, idxs: list[int], adapted: bool, adapter: Any) -> list[dict[str, Any]]:
        qs = [items[i].question for i in idxs]
        prefix = None
        if not adapted:  # the shared system-prompt start, run once per model (TTT changes it per question)
            if loaded.model not in prefixes:
                prefixes[loaded.model] = shared_prefix(loaded.model, loaded.tokenizer)
            prefix = prefixes[loaded.model]
        scores = option_logliks_batch(loaded.model, loaded.tokenizer, qs, prefix, adapter)
        return [loglik_record(q, s, "") for q, s in zip(qs, scores, strict=True)]

    return _run_items("loglik", variants, [it.question.id for it in items], [it.question.question for it in items],
                      out, index, embedder, models, ttt, seed, progress, compute, batch=LOGLIK_BATCH,
                      ttt_batch=batch_size)


def run_perplexity(variants: list[Variant], records: list[Any], out: Path, index: Any, embedder: Any,
                   models: Models, ttt: Any, seed: int, progress: bool, max_length: int) -> dict[str, Path]:
    from finemed_cli.eval.loglik import response_example, response_nll

    def one(loaded: Any, i: int) -> dict[str, Any] | None:
        example = response_example(loaded.tokenizer, records[i], max_length)
        if example is None:  # kept as done, so a rerun does not try it again
            return {"id": records[i].id, "skipped": f"no response token within --max-length {max_length}"}
        nats, tokens = response_nll(loaded.model, example)
        return {"id": records[i].id, "nats": round(nats, 5), "tokens": tokens}

    return _run_items("perplexity", variants, [r.id for r in records], [r.question for r in records], out, index,
                      embedder, models, ttt, seed, progress, lambda loaded, idxs, *_: [one(loaded, i) for i in idxs],
                      exclude_self=True, settings={"max_length": max_length})


def score_perplexity(files: dict[str, Path], seed: int = 0, n_boot: int = 2000) -> dict[str, Any]:
    """Token-weighted bits per token per variant with a bootstrap interval over records, and each pair's
    paired difference on the records both have."""
    rows = {name: {r["id"]: r for _, r in iter_jsonl(path) if "skipped" not in r} for name, path in files.items()}
    common = sorted(set.intersection(*(set(r) for r in rows.values())))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(common), size=(n_boot, len(common))) if common else None
    result: dict[str, Any] = {"items": len(common), "variants": {}, "comparisons": []}
    per_item = {}
    for name, table in rows.items():
        nats = np.array([table[i]["nats"] for i in common])
        toks = np.array([table[i]["tokens"] for i in common], dtype=float)
        per_item[name] = (nats, toks)
        est = nats.sum() / toks.sum() / math.log(2) if common else float("nan")
        boot = nats[picks].sum(1) / toks[picks].sum(1) / math.log(2) if common else np.array([np.nan])
        result["variants"][name] = {"bits_per_token": float(est), "n": len(common),
                                    "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]}
    names = list(rows)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (na, ta), (nb, tb) = per_item[a], per_item[b]
            if not common:
                continue
            diff = na.sum() / ta.sum() / math.log(2) - nb.sum() / tb.sum() / math.log(2)
            boot = (na[picks].sum(1) / ta[picks].sum(1) - nb[picks].sum(1) / tb[picks].sum(1)) / math.log(2)
            result["comparisons"].append({
                "a": a, "b": b, "difference": float(diff), "n": len(common),
                "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
                "a_lower": int(((na / ta) < (nb / tb)).sum())})
    return result


# --- the command --------------------------------------------------------------------------------------

def _summary_lines(scores: dict[str, Any]) -> list[str]:
    lines = []
    for name, r in scores.get("results", {}).items():
        lines.append(f"{name}: accuracy {100 * r['accuracy']:.1f}% [{100 * r['ci95'][0]:.1f}, "
                     f"{100 * r['ci95'][1]:.1f}] on {r['n']} items ({r['unanswered']} unanswered)")
    for c in scores.get("comparisons", []):
        lines.append(f"{c['a']} - {c['b']}: {100 * c['difference']:+.1f} points [{100 * c['ci95'][0]:+.1f}, "
                     f"{100 * c['ci95'][1]:+.1f}], McNemar p = {c['p_value']:.3g} "
                     f"({c['a_only']} vs {c['b_only']} discordant)")
    return lines


# What `finemed eval` writes into its output folder (reports always; the rest when it runs variants): none of
# it may be an input.
REPORT_FILES = ("report.json", "report.md", "accuracy.png", "sources.png", "departments.png")
RUN_FILES = ("questions.jsonl",)
RUN_DIRS = ("answers", "loglik", "perplexity")


def check_eval_output(out: Path, inputs: list[Any], running: bool) -> None:
    """The report folder and every file eval writes into it are not inputs and can be written (nothing made);
    `running`: variants are run, so their questions and results are written too."""
    from finemed_cli.data.output import check_output

    check_output(out, inputs=inputs, kind="dir", what="report folder")
    for name in REPORT_FILES + (RUN_FILES if running else ()):
        check_output(out / name, inputs=inputs, what="report file")
    for name in RUN_DIRS if running else ():
        check_output(out / name, inputs=inputs, kind="dir", replaces=True, what="results folder")


def evaluate(inputs: list[Path], out: Path, **kwargs: Any) -> dict[str, Path]:
    """Everything `finemed eval` does (see `_evaluate` for the arguments), with its report folder checked and
    locked: a second eval into the same folder stops at once."""
    from finemed_cli.data.output import OutputLock

    extra = [kwargs.get("index_dir"), kwargs.get("questions"), kwargs.get("model"), *(kwargs.get("against") or [])]
    check_eval_output(out, [*inputs, *extra], running=False)
    with OutputLock(out):
        return _evaluate(inputs, out, inputs_all=[*inputs, *extra], **kwargs)


def _evaluate(inputs: list[Path], out: Path, *, mode: str = "generate", compare: str | None = None,
              index_dir: Path | None = None, model: str | None = None, source: str | None = None,
              limit: int | None = None, ttt: Any = None, generation: Any = None, max_length: int = 2048,
              against: list[Path] | None = None, ngram: int = 8, overlap: float = 0.5, drop: bool = False,
              seed: int = 0, device: str = "auto", dtype: str = "auto", progress: bool = True,
              batch_size: int = 1, questions: Path | None = None, medmcqa_cop_base: int | None = None,
              subjects: str = "medical", echo: Any = print, inputs_all: list[Any] | None = None) -> dict[str, Path]:
    from finemed_cli.config.answer import GenerationConfig, TTTConfig
    from finemed_cli.eval.benchmarks import load_benchmark
    from finemed_cli.eval.report import write_report
    from finemed_cli.eval.score import Labels, is_answer_file, load_answer_outcomes, rescore, score

    if mode not in MODES:
        raise ConfigError(f"--mode {mode!r}: use one of {', '.join(MODES)}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: give 1 or more questions per TTT batch")
    ttt = ttt or TTTConfig()
    generation = generation or GenerationConfig()
    config: dict[str, Any] = {"mode": mode, "inputs": [str(p) for p in inputs], "compare": compare,
                              "index": str(index_dir) if index_dir else None, "model": model or EMBEDDED,
                              "seed": seed, "limit": limit, "ttt": {"k": ttt.k, "steps": ttt.steps, "lr": ttt.lr},
                              "title": ", ".join(p.stem for p in inputs)}

    # 1. Existing answer files: score them as they are.
    # Answer files are JSONL; a benchmark may be one JSON document (PubMedQA's ori_pqal.json) or a CSV (MMLU),
    # which the line reader must not see.
    firsts = [first_record(p) if p.suffix == ".jsonl" else {} for p in inputs]
    answer_files = [is_answer_file(f) for f in firsts]
    if any(answer_files) and not all(answer_files):
        raise ConfigError("give either answer files (to score) or benchmark files (to run), not both")
    if all(answer_files):
        if mode != "generate":
            raise ConfigError(f"answer files are scored as they are; --mode {mode} runs a model on benchmark "
                              "files: drop --mode, or give benchmark files")
        if limit is not None:
            raise ConfigError("--limit applies to benchmark files; answer files are scored whole")
        names = [p.stem.removesuffix(".answers") for p in inputs]
        if compare is not None:  # names for the files, in order
            names = [n.strip() for n in compare.split(",") if n.strip()]
            if len(names) != len(inputs):
                raise ConfigError(f"--compare names the answer files: give {len(inputs)} names, got {len(names)}")
        if len(set(names)) != len(names):
            names = [f"{i + 1}:{n}" for i, n in enumerate(names)]
        labels = by_id = None
        if questions is not None:  # gold answers, options (to extract again) and labels from the questions
            items = load_benchmark(questions, source=source, medmcqa_cop_base=medmcqa_cop_base)
            by_id = {it.question.id: it.question for it in items}
            labels = Labels({it.question.id: it.source for it in items},
                            {it.question.id: it.department for it in items})
            config["questions"] = str(questions)
        outcomes = {n: load_answer_outcomes(p, by_id) for n, p in zip(names, inputs, strict=True)}
        scores = score(outcomes, labels, seed=seed)
        if not scores["items"]:
            raise DataError(_no_common_items(inputs, outcomes, questions))
        config["compare"] = ",".join(names)
        paths = write_report(out, config, scores)
        for line in _summary_lines(scores):
            echo(line)
        return paths

    if questions is not None:
        raise ConfigError("--questions goes with answer files (to score them against it); benchmark files carry "
                          "their own answers")
    check_eval_output(out, inputs_all or list(inputs), running=True)
    variants = parse_variants(compare or "ttt,no-ttt", model)
    config["compare"] = ",".join(v.name for v in variants)
    needs_index = any(v.ttt != "off" for v in variants)
    if needs_index and index_dir is None:
        raise ConfigError(f"--compare {config['compare']}: TTT variants need --index (an index from `finemed index "
                          "build`); or compare only no-ttt variants")
    if mode == "perplexity":
        from finemed_cli.data.jsonl import read_records
        from finemed_cli.data.records import CorpusRecord

        for p, first in zip(inputs, firsts, strict=True):
            if isinstance(first, dict) and "reasoning" not in first:
                raise DataError(f"{p}: --mode perplexity reads corpus records (question, reasoning, answer), like "
                                "`finemed index build`; this file has none. Benchmark files take --mode loglik "
                                "or generate")
        records = [r for p in inputs for r in read_records(p, CorpusRecord.from_json)[:limit]]
    else:
        items_per_file = [load_benchmark(p, source=source, medmcqa_cop_base=medmcqa_cop_base) for p in inputs]
        if subjects == "medical":
            items_per_file = [medical_only(p, its) for p, its in zip(inputs, items_per_file, strict=True)]
        if not drop:  # else the first `limit` clean items, after decontamination
            items_per_file = [its[:limit] for its in items_per_file]
    index = embedder = None
    if index_dir is not None:
        from finemed_cli.retrieval.embed import load_embedder
        from finemed_cli.retrieval.index import CorpusIndex

        index = CorpusIndex(index_dir)
        embedder = load_embedder(index.embedder)
    dtype = _auto_dtype(mode, dtype, device, adapts=needs_index)
    config["dtype"] = dtype
    models = Models(device, dtype)

    if mode == "perplexity":
        models.get(variants[0].model)  # a model that cannot load stops the run before anything is written
        ensure_dir(out)
        files = run_perplexity(variants, records, out, index, embedder, models, ttt, seed, progress, max_length)
        ppl = score_perplexity(files, seed=seed)
        if not ppl["items"]:
            raise DataError(f"no record of {', '.join(map(str, inputs))} has a response within --max-length "
                            f"{max_length}; raise it")
        paths = write_report(out, config, {"items": ppl["items"]}, extra={"perplexity": ppl})
        for name, p in ppl["variants"].items():
            echo(f"{name}: {p['bits_per_token']:.4f} bits/token [{p['ci95'][0]:.4f}, {p['ci95'][1]:.4f}] "
                 f"on {p['n']} records")
        for c in ppl["comparisons"]:
            echo(f"{c['a']} - {c['b']}: {c['difference']:+.4f} bits/token [{c['ci95'][0]:+.4f}, "
                 f"{c['ci95'][1]:+.4f}]; lower under {c['a']} for {c['a_lower']} of {c['n']}")
        return paths

    items = [it for its in items_per_file for it in its]
    refs = reference_texts(list(against or []), index.records if index is not None else [])
    items, contamination = decontaminate(items, refs, ngram, overlap, drop) if refs else (items, None)
    if drop and limit is not None:  # the first `limit` clean items of each file
        kept, scanned, final = {it.question.id for it in items}, set(), []
        for its in items_per_file:
            n = 0
            for it in its:
                if n == limit:
                    break
                scanned.add(it.question.id)
                if it.question.id in kept:
                    final.append(it)
                    n += 1
        items = final
        if contamination:  # report the items looked at, not the whole files
            contamination["items"] = [c for c in contamination["items"] if c["id"] in scanned]
            contamination["flagged"] = len(contamination["items"])
    _check_items(inputs, items)
    if not items:
        raise DataError(f"no items left to evaluate in {', '.join(map(str, inputs))}"
                        + (f": all {contamination['flagged']} were dropped as contaminated" if contamination else ""))
    models.get(variants[0].model)  # a model that cannot load stops the run before anything is written
    questions_file = ensure_dir(out) / "questions.jsonl"
    write_questions(items, questions_file)
    labels = Labels({it.question.id: it.source for it in items}, {it.question.id: it.department for it in items})
    if mode == "generate":
        files = run_generate(variants, questions_file, out, index_dir, models, ttt, generation, seed, progress,
                             batch_size)
        # predictions extracted again with the current extractor (a resumed file may predate it)
        by_id = {it.question.id: it.question for it in items}
        outcomes = {name: load_answer_outcomes(path, by_id) for name, path in files.items()}
    else:
        files = run_loglik(variants, items, out, index, embedder, models, ttt, seed, progress, batch_size)
        outcomes, gold = {}, {it.question.id: it.question.answer for it in items}
        for name, path in files.items():
            outcomes[name] = load_answer_outcomes_loglik(path)
            outcomes[name + ":norm"] = load_answer_outcomes_loglik(path, normalised=True)
        # Judged against this run's answer key: a file resumed from an earlier run keeps its old `correct`.
        outcomes = {n: rescore(oc, gold) for n, oc in outcomes.items()}
    pairs = None
    if mode == "loglik":  # acc against acc, acc_norm against acc_norm: not one scoring rule against another
        names = [v.name for v in variants]
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
        pairs += [(f"{a}:norm", f"{b}:norm") for a, b in pairs]
    scores = score(outcomes, labels, seed=seed, pairs=pairs)
    paths = write_report(out, config, scores, extra={"contamination": contamination} if contamination else None)
    for line in _summary_lines(scores):
        echo(line)
    return paths


def _check_items(inputs: list[Path], items: list[Any]) -> None:
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


# The medical subsets the literature reports: MMLU's six medical subjects (as the Open Medical-LLM Leaderboard and
# Med-PaLM) and MMLU-Pro's health category.
MEDICAL_SUBJECTS = {
    "mmlu": {"anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
             "professional_medicine"},
    "mmlu_pro": {"health"},
}


def medical_only(path: Path, items: list[Any]) -> list[Any]:
    """The items of a full MMLU or MMLU-Pro file that belong to its medical subjects (others pass as they are)."""
    def medical(it: Any) -> bool:
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


def _no_common_items(inputs: list[Path], outcomes: dict[str, dict[str, Any]], questions: Path | None) -> str:
    counts = ", ".join(f"{p} {len(o)}" for p, o in zip(inputs, outcomes.values(), strict=True))
    where = f" that are also in {questions}" if questions else ""
    return (f"nothing to score: no item has a gold answer in every answer file{where} (scorable items per file: "
            f"{counts}); give answer files of the same questions")


def load_answer_outcomes_loglik(path: Path, normalised: bool = False) -> dict[str, Any]:
    """Outcomes of a loglik file: `acc` (highest sum) or `acc_norm` (highest sum per character)."""
    from finemed_cli.eval.score import Outcome

    key = "_norm" if normalised else ""
    return {r["id"]: Outcome(r["id"], r["prediction" + key], r.get("correct" + key))
            for _, r in iter_jsonl(path) if "prediction" in r}
