"""`finemed synth …`: the FineMed data pipeline, one JSONL → JSONL stage per command."""

from __future__ import annotations

from pathlib import Path

import click

from finemed_cli.cli.options import option, threads_option
from finemed_cli.config.synth import SynthConfig

_IN = click.argument("input_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
_OUT = click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
                    help="Output JSONL, appended; a rerun resumes.")
_REJECTS = click.option("--rejects", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="Reject records with the reason [default: OUTPUT stem + .rejects.jsonl].")
_JUDGE = option(SynthConfig, "judge", "-m", "--model")
_REASONER = option(SynthConfig, "reasoner", "--reasoner")
_LIMIT = option(SynthConfig, "limit", "--limit")
_RETRIES = option(SynthConfig, "retries", "--retries")
_SEED = option(SynthConfig, "seed", "--seed")
_PROGRESS = click.option("--no-progress", is_flag=True, help="No progress bar.")
_THREADS = threads_option(expose_value=False)


@click.group()
def synth() -> None:
    """Make, score, filter, classify and answer FineMed-style data with local GGUF models, step by step as the
    FineMed reference code does; in a `synth run` config any model may be an OpenAI-compatible server instead.

    Every stage keeps every input accounted for: an output record, or a reject record with the reason.
    """


def _run(name: str, input_file: Path, output: Path, rejects: Path | None, limit: int | None, no_progress: bool,
         side: Path | None = None, **settings: object) -> None:
    from finemed_cli.synth.stages import Models, StageFiles, run_named_stage

    models = Models()
    try:
        summary = run_named_stage(name, StageFiles(input_file, output, rejects, side), SynthConfig(**settings),  # type: ignore[arg-type]
                                  models, not no_progress, limit=limit)
    finally:
        models.close()
    click.echo(summary.line())


def _judge_command(name: str, doc: str) -> None:
    """A stage command whose model is the judge: questions, score, classify."""

    @synth.command(name, help=doc)
    @_IN
    @_OUT
    @_REJECTS
    @_JUDGE
    @_LIMIT
    @_RETRIES
    @_PROGRESS
    @_THREADS
    def command(input_file: Path, output: Path, rejects: Path | None, model: str | None, limit: int | None,
                retries: int, no_progress: bool) -> None:
        _run(name, input_file, output, rejects, limit, no_progress, judge=model, retries=retries)


_judge_command("questions", 'Write two self-contained questions per raw text ({"id", "text"} per line); a line '
               'with its own "question" (and "options", "answer") is taken as it is.')
_judge_command("score", "Rate each question's quality (1-10), complexity (1-10) and medical relevance (1-6), "
               "and whether it is case-specific.")
_judge_command("classify", "Give each record's source text (its question when it has none) a department, then "
               "a sub-department of that department or none, in two steps.")


@synth.command()
@_IN
@_OUT
@click.option("--common-output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The common tier's instruction/output records [default: OUTPUT stem + .common.jsonl].")
@_REJECTS
@_JUDGE
@_REASONER
@option(SynthConfig, "reward_model", "--reward-model")
@option(SynthConfig, "common_max_tokens", "--common-max-tokens")
@option(SynthConfig, "complex_max_tokens", "--complex-max-tokens")
@option(SynthConfig, "system_prompt", "--system-prompt")
@_SEED
@_RETRIES
@_LIMIT
@_PROGRESS
@_THREADS
def respond(input_file: Path, output: Path, common_output: Path | None, rejects: Path | None, model: str | None,
            reasoner: str | None, reward_model: str | None, common_max_tokens: int, complex_max_tokens: int,
            system_prompt: str | None, seed: int, retries: int, limit: int | None, no_progress: bool) -> None:
    """Answer each filtered question by its tier, with its source text in the prompt: the complex tier by the
    reasoner at length in o1 style (## Thought, ## Summarization) into OUTPUT as corpus records; the common tier
    by the instruction model (--model), two candidates of which the reward model keeps the better, into the
    common-tier file."""
    _run("respond", input_file, output, rejects, limit, no_progress, side=common_output, judge=model,
         reasoner=reasoner, reward_model=reward_model, common_max_tokens=common_max_tokens,
         complex_max_tokens=complex_max_tokens, system_prompt=system_prompt, seed=seed, retries=retries)


@synth.command()
@_IN
@_OUT
@_REJECTS
@option(SynthConfig, "reasoner", "-m", "--model", "reasoner",
        help="GGUF sampling the o1-style responses [default: the embedded SmolLM2-135M-Instruct].")
@option(SynthConfig, "base", "--base", help="GGUF for the cold-start (rejected) replies [default: --model].")
@option(SynthConfig, "pair_samples", "--samples")
@option(SynthConfig, "complex_max_tokens", "--max-new-tokens", "complex_max_tokens", old=("--max-tokens",),
        help="Token budget of each sampled response.")
@click.option("--reward-model", default=None,
              help="GGUF that scores both sides of each pair 1-10 ('embedded': the embedded model); pairs whose "
                   "chosen side does not win by the margin are rejected (finemed's check, not the reference's) "
                   "[default: no check].")
@option(SynthConfig, "reward_min_margin", "--min-margin", "reward_min_margin", type=click.IntRange(0, 9))
@_RETRIES
@_LIMIT
@_PROGRESS
@_THREADS
def pairs(input_file: Path, output: Path, rejects: Path | None, reasoner: str | None, base: str | None,
          samples: int, complex_max_tokens: int, reward_model: str | None, reward_min_margin: int, retries: int,
          limit: int | None, no_progress: bool) -> None:
    """Preference pairs: chosen reaches the gold answer and rejected does not; without a gold answer, the
    record's own response against a cold-start reply of the base model. Optionally checked by a reward model."""
    _run("pairs", input_file, output, rejects, limit, no_progress, reasoner=reasoner, judge=reasoner,
         base=base or reasoner, pair_samples=samples, complex_max_tokens=complex_max_tokens,
         reward_model=reward_model, reward_pairs=reward_model is not None, reward_min_margin=reward_min_margin,
         retries=retries)


@synth.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_PROGRESS
@_THREADS
def run(config: Path, no_progress: bool) -> None:
    """Every stage in order (questions, score, filter, classify, respond, pairs) from one YAML file."""
    from finemed_cli.parallel import launched
    from finemed_cli.synth.pipeline import run_pipeline

    out, summaries = run_pipeline(config, progress=not no_progress)
    if (ranks := launched()) is not None and not ranks.main:
        return  # under torchrun every rank holds the same summed counts: rank 0 says them once
    for s in summaries:
        click.echo(s.line())
    click.echo(f"done: {out}")


@synth.command("filter")
@_IN
@_OUT
@_REJECTS
@option(SynthConfig, "complex_above", "--complex-above")
@option(SynthConfig, "min_quality", "--min-quality")
@option(SynthConfig, "min_relevance", "--min-relevance")
@option(SynthConfig, "keep_case_specific", "--keep-case-specific", is_flag=True, show_default=False)
@_SEED
@_PROGRESS
def filter_(input_file: Path, output: Path, rejects: Path | None, complex_above: int, min_quality: int,
            min_relevance: int, keep_case_specific: bool, seed: int, no_progress: bool) -> None:
    """Select as the reference does: case-specific out, then of each text's questions the best by summed
    score, quality + complexity, quality, and a seeded draw; then the tiers (complex above --complex-above)."""
    _run("filter", input_file, output, rejects, None, no_progress, complex_above=complex_above,
         min_quality=min_quality, min_relevance=min_relevance, keep_case_specific=keep_case_specific, seed=seed)


@click.command("report")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for scores.png, tsne.png and summary.md.")
@click.option("--no-tsne", is_flag=True, help="Skip the t-SNE map (it embeds every question).")
def report(files: tuple[Path, ...], out: Path, no_tsne: bool) -> None:
    """Plot the quality/complexity distributions of FILES side by side, a t-SNE of their questions by
    department, and write a summary with the counts per department."""
    from finemed_cli.data.output import output_slot
    from finemed_cli.synth.report import write_report

    with output_slot(out, inputs=files, kind="dir", what="report folder"):
        paths = write_report(list(files), out, tsne=not no_tsne)
    for path in paths:
        click.echo(f"wrote {path}")
