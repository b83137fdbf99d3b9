"""`finemed synth …`: the FineMed data pipeline, one JSONL → JSONL stage per command."""

from __future__ import annotations

from pathlib import Path

import click

_IN = click.argument("input_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
_OUT = click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
                    help="Output JSONL, appended; a rerun resumes.")
_REJECTS = click.option("--rejects", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="Reject records with the reason [default: OUTPUT stem + .rejects.jsonl].")
_MODEL = click.option("--model", default=None,
                      help="GGUF file of the judge [default: the embedded SmolLM2-135M-Instruct].")
_LIMIT = click.option("--limit", type=int, default=None, help="Only the first N input records.")
_RETRIES = click.option("--retries", type=int, default=3, show_default=True,
                        help="Tries per record before it is rejected.")
_PROGRESS = click.option("--no-progress", is_flag=True, help="No progress bar.")


@click.group()
def synth() -> None:
    """Make, score, classify and filter FineMed-style data with a local GGUF model as judge.

    Every stage keeps every input accounted for: an output record, or a reject record with the reason.
    """


def _judge_stage(name: str, make: str, input_file: Path, output: Path, rejects: Path | None, model: str | None,
                 limit: int | None, retries: int, no_progress: bool) -> None:
    from finemed_cli.synth import judge
    from finemed_cli.synth.llm import LlamaCppModel
    from finemed_cli.synth.stage import read_input, run_stage

    records = read_input(input_file, limit)
    llm = LlamaCppModel(model)
    try:
        summary = run_stage(name, records, output, rejects, getattr(judge, make)(llm, retries), not no_progress)
    finally:
        llm.close()
    click.echo(summary.line())


def _judge_command(name: str, make: str, doc: str) -> None:
    @synth.command(name, help=doc)
    @_IN
    @_OUT
    @_REJECTS
    @_MODEL
    @_LIMIT
    @_RETRIES
    @_PROGRESS
    def command(input_file: Path, output: Path, rejects: Path | None, model: str | None, limit: int | None,
                retries: int, no_progress: bool) -> None:
        _judge_stage(name, make, input_file, output, rejects, model, limit, retries, no_progress)


_judge_command("score", "scorer", "Rate each question's quality, complexity and relevance (1-10) and whether it "
               "is case-specific.")
_judge_command("classify", "classifier", "Give each question its department (and, for internal medicine, its "
               "sub-department).")


@synth.command("filter")
@_IN
@_OUT
@_REJECTS
@click.option("--complex-above", type=int, default=8, show_default=True,
              help="Complexity above this is the 'complex' tier (answered in o1 style).")
@click.option("--min-quality", type=int, default=1, show_default=True)
@click.option("--min-relevance", type=int, default=1, show_default=True)
@click.option("--keep-case-specific", is_flag=True, help="Do not reject case-specific questions.")
@_PROGRESS
def filter_(input_file: Path, output: Path, rejects: Path | None, complex_above: int, min_quality: int,
            min_relevance: int, keep_case_specific: bool, no_progress: bool) -> None:
    """Apply the rule cascade: case-specific out, minimum scores, best question per source text, tiers."""
    from finemed_cli.synth.filter import FilterRules, filterer
    from finemed_cli.synth.stage import read_input, run_stage

    records = read_input(input_file)
    rules = FilterRules(complex_above, min_quality, min_relevance, not keep_case_specific)
    click.echo(run_stage("filter", records, output, rejects, filterer(records, rules), not no_progress).line())


@click.command("report")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for scores.png, tsne.png and summary.md.")
@click.option("--no-tsne", is_flag=True, help="Skip the t-SNE map (it embeds every question).")
def report(files: tuple[Path, ...], out: Path, no_tsne: bool) -> None:
    """Plot the quality/complexity distributions of FILES side by side, a t-SNE of their questions by
    department, and write a summary with the counts per department."""
    from finemed_cli.synth.report import write_report

    for path in write_report(list(files), out, tsne=not no_tsne):
        click.echo(f"wrote {path}")
