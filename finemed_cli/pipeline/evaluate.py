"""`finemed eval`: run variants (TTT on, off, the paper's TTT, other models) on the same benchmark items with
the same seed, or score existing answer files; then score them together and write the report.

The components live in `eval/` (benchmarks, items, contamination, loglik, results, scoring, statistics, the
report); this module chains them with retrieval, TTT and the answer pipeline.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finemed_cli.checkpoints.loading import check_model_value
from finemed_cli.config.eval import EvalConfig
from finemed_cli.config.ttt_settings import with_ttt_settings
from finemed_cli.data.output import OutputLock, ensure_dir
from finemed_cli.errors import ConfigError, DataError
from finemed_cli.eval.records import ContaminationReport, PerplexityScores, Scores, TransferReport
from finemed_cli.eval.results import (
    check_eval_output,
    first_record,
    generators_used,
    load_answer_outcomes_loglik,
)
from finemed_cli.eval.transfer import transfer_report
from finemed_cli.eval.variants import Variant, parse_variants
from finemed_cli.parallel import launched
from finemed_cli.pipeline.answer import settings_model_dir
from finemed_cli.pipeline.eval_runs import EvalRun, Models, run_generate, run_loglik, run_perplexity

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """What a run wrote and scored; the scores are None where the run had none (a rank other than 0 under
    torchrun, and `scores` in perplexity mode, `perplexity` in the others)."""

    paths: dict[str, Path]  # the report files by kind
    lines: list[str] = field(default_factory=list)  # the summary a person reads (the CLI prints it)
    scores: Scores | None = None
    transfer: TransferReport | None = None
    perplexity: PerplexityScores | None = None
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # each variant's, as report.json has them


def evaluate(config: EvalConfig) -> EvalResult:
    """Everything `finemed eval` does, its report folder checked and locked (a second eval into the same
    folder stops at once)."""
    config.validate()
    check_eval_output(config.out, [*config.inputs, *config.extra_inputs()], running=False)
    ranks = launched()
    # under torchrun rank 0 holds the folder; the other ranks write only their own parts inside it
    with OutputLock(config.out) if ranks is None or ranks.main else contextlib.nullcontext():
        # Answer files are JSONL; a benchmark may be one JSON document (PubMedQA's ori_pqal.json) or a CSV
        # (MMLU), which the line reader must not see.
        from finemed_cli.eval.score import is_answer_file

        kinds = [isinstance(p, Path) and p.suffix == ".jsonl" and is_answer_file(first_record(p)) for p in config.inputs]
        if any(kinds) and not all(kinds):
            raise ConfigError("give either answer files (to score) or benchmark files (to run), not both")
        if all(kinds):
            return score_answer_files(config)
        return run_benchmark(config)


def score_answer_files(config: EvalConfig) -> EvalResult:
    """Score existing answer files as they are, or against `config.questions` (its key, options and labels)."""
    from finemed_cli.eval.benchmarks import load_benchmark
    from finemed_cli.eval.report import write_report
    from finemed_cli.eval.score import load_answer_outcomes, score

    if config.mode != "generate":
        raise ConfigError(f"answer files are scored as they are; --mode {config.mode} runs a model on benchmark "
                          "files: drop --mode, or give benchmark files")
    if config.limit is not None:
        raise ConfigError("--limit applies to benchmark files; answer files are scored whole")
    names = [p.stem.removesuffix(".answers") for p in config.inputs]
    if config.compare is not None:  # names for the files, in order
        names = [n.strip() for n in config.compare.split(",") if n.strip()]
        if len(names) != len(config.inputs):
            raise ConfigError(f"--compare names the answer files: give {len(config.inputs)} names, got {len(names)}")
    if len(set(names)) != len(names):
        names = [f"{i + 1}:{n}" for i, n in enumerate(names)]
    report = config.report_config(running=False)
    labels = by_id = None
    if config.questions is not None:  # gold answers, options (to extract again) and labels from the questions
        items = load_benchmark(config.questions, source=config.source, medmcqa_cop_base=config.medmcqa_cop_base)
        by_id = {it.question.id: it.question for it in items}
        labels = item_labels(items)
        report["questions"] = str(config.questions)
    outcomes = {n: load_answer_outcomes(p, by_id, config.trust_letter) for n, p in zip(names, config.inputs, strict=True)}
    scores = score(outcomes, labels)
    if not scores.items:
        raise DataError(_no_common_items(config.inputs, outcomes, config.questions))
    report["compare"] = ",".join(names)
    paths = write_report(config.out, report, scores)
    if by_id is not None and labels is not None:  # lm-eval's samples need the questions (docs, prompts)
        from finemed_cli.eval.lm_eval_output import write_lm_eval

        paths.update(write_lm_eval(config.out, "generate", dict(zip(names, config.inputs, strict=True)), by_id,
                                   outcomes, labels, report))
    return EvalResult(paths, summary_lines(scores), scores)


def run_benchmark(config: EvalConfig) -> EvalResult:
    """Run the variants on benchmark items (generate, loglik) or held-out corpus records (perplexity)."""
    if config.questions is not None:
        raise ConfigError("--questions goes with answer files (to score them against it); benchmark files carry "
                          "their own answers")
    check_eval_output(config.out, [*config.inputs, *config.extra_inputs()], running=True)
    config = with_ttt_settings(config, settings_model_dir(config))  # the base every ttt variant starts from
    variants = parse_variants(config.compare or "ttt,no-ttt", config.model)
    for v in variants:  # every variant's model, before the first variant runs for minutes
        check_model_value(v.model)
    adapts = any(v.ttt != "off" for v in variants)
    if config.mode == "generate" and any(v.oracle for v in variants):
        raise ConfigError("oracle-ttt trains on each item's own gold answer: run it with --mode loglik (or "
                          "perplexity), where the answer is scored, not generated")
    if any(v.retrieves for v in variants) and config.index is None:
        raise ConfigError(f"--compare {','.join(v.name for v in variants)}: TTT and in-context variants need "
                          "--index (an index from `finemed index build`); or compare only no-ttt variants")
    if config.mode == "perplexity":
        return _run_perplexity(config, variants)
    items = _load_items(config)  # before the index and models load: a bad file fails at once
    index, embedder = _open_index(config)
    items, contamination = _decontaminate(config, items, index)
    models = Models(config.device, eval_dtype(config, adapts), config.system_prompt, quantize=config.quantize)
    models.get(variants[0].model)  # a model that cannot load stops the run before anything is written
    return _run_and_score(config, variants, items, contamination, index, embedder, models)


def _run_and_score(config: EvalConfig, variants: list[Variant], items: list[Any],
                   contamination: ContaminationReport | None, index: Any, embedder: Any, models: Models) -> EvalResult:
    from finemed_cli.eval.items import write_questions
    from finemed_cli.eval.report import write_report
    from finemed_cli.eval.score import load_answer_outcomes, rescore, score

    questions_file = ensure_dir(config.out) / "questions.jsonl"
    write_questions(items, questions_file)
    labels = item_labels(items)
    by_id = {it.question.id: it.question for it in items}
    pairs = None
    run = EvalRun(config.out, models, config.ttt, config.seed, config.progress, index, embedder, config.batch_size,
                  ranks=launched())
    if config.mode == "generate":
        files = run_generate(run, variants, questions_file, config.generation)
        if not _reports(run):
            return EvalResult({}, [_share_done(run)])
        # predictions extracted again with the current extractor (a resumed file may predate it)
        outcomes = {name: load_answer_outcomes(path, by_id, config.trust_letter) for name, path in files.items()}
    else:
        files = run_loglik(run, variants, items)
        if not _reports(run):
            return EvalResult({}, [_share_done(run)])
        gold = {it.question.id: it.question.answer for it in items}
        outcomes = {}
        for name, path in files.items():  # judged against this run's key: a resumed file keeps its old `correct`
            outcomes[name] = rescore(load_answer_outcomes_loglik(path), gold)
            outcomes[name + ":norm"] = rescore(load_answer_outcomes_loglik(path, normalised=True), gold)
        # acc against acc, acc_norm against acc_norm: not one scoring rule against another
        names = [v.name for v in variants]
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
        pairs += [(f"{a}:norm", f"{b}:norm") for a, b in pairs]
    scores = score(outcomes, labels, pairs=pairs)
    transfer = transfer_report({n: o for n, o in outcomes.items() if not n.endswith(":norm")},
                               {it.question.id: it.question.answer for it in items})
    report = {**config.report_config(), **run_settings(config, variants, models)}
    if config.mode == "generate":  # `--generator auto` resolved: the backend each variant's answers came from
        for name, path in files.items():
            report["variants"][name]["generator"] = generators_used(path)
    paths = write_report(config.out, report, scores, contamination=contamination, transfer=transfer)
    from finemed_cli.eval.lm_eval_output import write_lm_eval

    paths.update(write_lm_eval(config.out, config.mode, files, by_id, outcomes, labels, report))
    return EvalResult(paths, summary_lines(scores), scores, transfer, settings=report["variants"])


def _run_perplexity(config: EvalConfig, variants: list[Variant]) -> EvalResult:
    from finemed_cli.data.jsonl import read_records
    from finemed_cli.data.records import CorpusRecord
    from finemed_cli.eval.perplexity import score_perplexity
    from finemed_cli.eval.report import write_report

    for p in config.inputs:
        if not isinstance(p, Path):
            raise ConfigError(f"{p}: --mode perplexity reads local corpus files (question, reasoning, answer); "
                              "give a JSONL file")
        first = first_record(p) if p.suffix == ".jsonl" else {}
        if isinstance(first, dict) and "reasoning" not in first:
            raise DataError(f"{p}: --mode perplexity reads corpus records (question, reasoning, answer), like "
                            "`finemed index build`; this file has none. Benchmark files take --mode loglik "
                            "or generate")
    records = [r for p in config.inputs for r in read_records(p, CorpusRecord.from_json)[: config.limit]]
    index, embedder = _open_index(config)
    models = Models(config.device, config.dtype, config.system_prompt, quantize=config.quantize)
    models.get(variants[0].model)  # a model that cannot load stops the run before anything is written
    ensure_dir(config.out)
    run = EvalRun(config.out, models, config.ttt, config.seed, config.progress, index, embedder, ranks=launched())
    files = run_perplexity(run, variants, records, config.max_length)
    if not _reports(run):
        return EvalResult({}, [_share_done(run)])
    ppl = score_perplexity(files, seed=config.seed)
    if not ppl.items:
        raise DataError(f"no record of {', '.join(map(str, config.inputs))} has a response within --max-length "
                        f"{config.max_length}; raise it")
    report = {**config.report_config(), **run_settings(config, variants, models)}
    paths = write_report(config.out, report, perplexity=ppl)
    lines = [f"{name}: {p.bits_per_token:.4f} bits/token [{p.ci95[0]:.4f}, {p.ci95[1]:.4f}] on {p.n} records"
             for name, p in ppl.variants.items()]
    lines += [f"{c.a} - {c.b}: {c.difference:+.4f} bits/token [{c.ci95[0]:+.4f}, {c.ci95[1]:+.4f}]; "
              f"lower under {c.a} for {c.a_lower} of {c.n}" for c in ppl.comparisons]
    return EvalResult(paths, lines, perplexity=ppl, settings=report["variants"])


def _reports(run: EvalRun) -> bool:
    """Whether this process scores and writes the report: the only one, or rank 0 under torchrun."""
    return run.ranks is None or run.ranks.main


def _share_done(run: EvalRun) -> str:
    assert run.ranks is not None
    return f"rank {run.ranks.rank} of {run.ranks.world}: its share is done; rank 0 writes the report"


def item_labels(items: list[Any]) -> Any:
    """What the statistics group items by (source, department) and the options each has (chance level)."""
    from finemed_cli.eval.score import Labels

    return Labels({it.question.id: it.source for it in items}, {it.question.id: it.department for it in items},
                  {it.question.id: len(it.question.options) for it in items if it.question.options})


def run_settings(config: EvalConfig, variants: list[Variant], models: Models) -> dict[str, Any]:
    """What the report adds to the configuration once the variants ran: the device, dtype and system prompts
    they ran with (`auto` resolved) and every variant's own settings."""
    from finemed_cli.checkpoints.loading import pick_device, pick_dtype
    from finemed_cli.config.eval import EMBEDDED

    device = pick_device(config.device)
    described = {v.name: {**v.describe(config.ttt), "model": v.model or config.model or EMBEDDED} for v in variants}
    return {"compare": ",".join(v.name for v in variants), "device": device,
            "dtype": str(pick_dtype(models.dtype, device)).removeprefix("torch."),
            "system_prompts": models.prompts, "variants": described}


def _load_items(config: EvalConfig) -> list[list[Any]]:
    """The benchmark items of each input file (medical subjects only unless --subjects all)."""
    from finemed_cli.eval.benchmarks import load_benchmark
    from finemed_cli.eval.items import medical_only

    per_file = [load_benchmark(p, source=config.source, medmcqa_cop_base=config.medmcqa_cop_base,
                               split=config.split, columns=config.columns) for p in config.inputs]
    if config.subjects == "medical":
        per_file = [medical_only(p, its) for p, its in zip(config.inputs, per_file, strict=True)]
    if not config.drop_contaminated:  # else the first `limit` clean items, after decontamination
        per_file = [its[: config.limit] for its in per_file]
    return per_file


def _open_index(config: EvalConfig) -> tuple[Any, Any]:
    if config.index is None:
        return None, None
    from finemed_cli.retrieval.index import CorpusIndex

    index = CorpusIndex(config.index)
    return index, index.load_embedder()


def _decontaminate(config: EvalConfig, per_file: list[list[Any]],
                   index: Any) -> tuple[list[Any], ContaminationReport | None]:
    """Items checked against the index corpus and --against files (flagged, or dropped), limited, checked."""
    from finemed_cli.eval.contamination import decontaminate, reference_texts
    from finemed_cli.eval.items import check_items, first_clean

    items = [it for its in per_file for it in its]
    refs = reference_texts(list(config.against), index.records if index is not None else [])
    contamination = None
    if refs:
        items, contamination = decontaminate(items, refs, config.ngram, config.overlap, config.drop_contaminated)
    if config.drop_contaminated and config.limit is not None:  # the first `limit` clean items of each file
        items, scanned = first_clean(per_file, {it.question.id for it in items}, config.limit)
        if contamination:  # report the items looked at, not the whole files
            contamination = contamination.among(scanned)
    check_items(config.inputs, items)
    if not items:
        raise DataError(f"no items left to evaluate in {', '.join(map(str, config.inputs))}"
                        + (f": all {contamination.flagged} were dropped as contaminated" if contamination else ""))
    return items, contamination


def eval_dtype(config: EvalConfig, adapts: bool) -> str:
    """`--dtype auto` for loglik without TTT on a CPU with native bf16 matmuls is bfloat16. Measured on the 2-core CI
    machine (AVX512-BF16), no-ttt over 545 items (`--limit 200` of the shared MedQA dev + train sample, MedMCQA,
    MMLU medical, PubMedQA): 236.6 s in fp32, 139.1 s in bf16 (1.70x), acc 36.5% vs 36.7% (532 of 545
    predictions identical, 3 vs 4 items right in one only), acc_norm 38.2% in both. With a TTT variant
    (`adapts`), and in generation and perplexity, load_model's auto stays (fp32 on CPU): what TTT changes is
    small enough for bf16's rounding to blur the paired comparison."""
    from finemed_cli.checkpoints.loading import cpu_has_fast_bf16, pick_device

    if (config.mode == "loglik" and not adapts and config.dtype in (None, "auto")
            and pick_device(config.device) == "cpu" and cpu_has_fast_bf16()):
        return "bfloat16"
    return config.dtype


def summary_lines(scores: Scores) -> list[str]:
    """Accuracy per variant and every comparison, one line each."""
    lines = []
    for name, r in scores.results.items():
        lines.append(f"{name}: accuracy {100 * r.accuracy:.1f}% [{100 * r.ci95[0]:.1f}, "
                     f"{100 * r.ci95[1]:.1f}] on {r.n} items ({r.unanswered} unanswered"
                     + (f"; {r.disagreements} name one option by letter, another by text)" if r.disagreements
                        else ")"))
    for c in scores.comparisons:
        lines.append(f"{c.a} - {c.b}: {100 * c.difference:+.1f} points [{100 * c.ci95[0]:+.1f}, "
                     f"{100 * c.ci95[1]:+.1f}], McNemar p = {c.p_value:.3g} ({c.a_only} vs {c.b_only} discordant)")
    return lines


def _no_common_items(inputs: list[Path], outcomes: dict[str, dict[str, Any]], questions: Path | None) -> str:
    counts = ", ".join(f"{p} {len(o)}" for p, o in zip(inputs, outcomes.values(), strict=True))
    where = f" that are also in {questions}" if questions else ""
    return (f"nothing to score: no item has a gold answer in every answer file{where} (scorable items per file: "
            f"{counts}); give answer files of the same questions")
