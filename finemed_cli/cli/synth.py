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


def _scorer(llm: object, retries: int) -> object:
    from finemed_cli.synth.judge import scorer

    return scorer(llm, retries)  # type: ignore[arg-type]


def _classifier(llm: object, retries: int) -> object:
    from finemed_cli.synth.judge import classifier

    return classifier(llm, retries)  # type: ignore[arg-type]


def _questioner(llm: object, retries: int) -> object:
    from finemed_cli.synth.generate import questioner

    return questioner(llm, retries)  # type: ignore[arg-type]


def _model_command(name: str, make: object, doc: str, **kw: object) -> None:
    """A stage command whose whole work is one model-backed stage function: `make(llm, retries)`."""

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
        _with_model(input_file, output, rejects, model, limit, no_progress, name,
                    lambda llm: make(llm, retries), **kw)  # type: ignore[operator]


_model_command("questions", _questioner, 'Write two self-contained questions per raw text ({"id", "text"} per '
               "line).", done_key=lambda r: f"{r['id']}-q1")
_model_command("score", _scorer, "Rate each question's quality, complexity and relevance (1-10) and whether it "
               "is case-specific.")
_model_command("classify", _classifier, "Give each question its department (and, for internal medicine, its "
               "sub-department).")


@synth.command()
@_IN
@_OUT
@_REJECTS
@_MODEL
@_LIMIT
@click.option("--max-tokens", type=int, default=1024, show_default=True, help="Response token budget.")
@_PROGRESS
def respond(input_file: Path, output: Path, rejects: Path | None, model: str | None, limit: int | None,
            max_tokens: int, no_progress: bool) -> None:
    """Answer each question in o1 style (## Thought, ## Summarization) with the reasoner: a corpus record."""
    from finemed_cli.synth.generate import responder

    _with_model(input_file, output, rejects, model, limit, no_progress, "respond",
                lambda llm: responder(llm, max_tokens=max_tokens))


@synth.command()
@_IN
@_OUT
@_REJECTS
@_MODEL
@click.option("--base", default=None, help="GGUF for the cold-start (rejected) replies [default: --model].")
@click.option("--samples", type=int, default=4, show_default=True,
              help="Responses sampled per question with a gold letter.")
@click.option("--max-tokens", type=int, default=1024, show_default=True)
@click.option("--reward-model", default=None,
              help="GGUF that scores both sides of each pair 1-10 ('embedded': the embedded model); pairs whose "
                   "chosen side does not win by --min-margin are rejected [default: no reward scoring].")
@click.option("--min-margin", type=click.IntRange(0, 9), default=1, show_default=True,
              help="With --reward-model: how much higher chosen must score than rejected.")
@_RETRIES
@_LIMIT
@_PROGRESS
def pairs(input_file: Path, output: Path, rejects: Path | None, model: str | None, base: str | None, samples: int,
          max_tokens: int, reward_model: str | None, min_margin: int, retries: int, limit: int | None,
          no_progress: bool) -> None:
    """Preference pairs: chosen reaches the gold answer and rejected does not; without a gold answer, the
    record's own response against a cold-start reply of the base model. Optionally checked by a reward model."""
    import contextlib

    from finemed_cli.synth.generate import pairer, rewarder
    from finemed_cli.synth.llm import LlamaCppModel

    with contextlib.ExitStack() as models:
        def make(llm: object) -> object:  # after the outputs are checked and the main model loaded
            cold = models.enter_context(contextlib.closing(LlamaCppModel(base))) if base else llm
            judge = (models.enter_context(contextlib.closing(
                LlamaCppModel(None if reward_model == "embedded" else reward_model))) if reward_model else None)
            return pairer(llm, cold, samples, max_tokens,  # type: ignore[arg-type]
                          rewarder(judge, min_margin, retries) if judge else None)

        _with_model(input_file, output, rejects, model, limit, no_progress, "pairs", make)


@synth.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_PROGRESS
def run(config: Path, no_progress: bool) -> None:
    """Every stage in order (questions, score, classify, filter, respond, pairs) from one YAML file."""
    from finemed_cli.synth.pipeline import run_pipeline

    out = run_pipeline(config, progress=not no_progress, echo=click.echo)
    click.echo(f"done: {out}")


def _with_model(input_file: Path, output: Path, rejects: Path | None, model: str | None, limit: int | None,
                no_progress: bool, name: str, make: object, **kw: object) -> None:
    from finemed_cli.synth.llm import LlamaCppModel
    from finemed_cli.synth.stage import read_input, run_stage, stage_outputs

    with stage_outputs([input_file, Path(model) if model else None], output, rejects) as rejects:
        records = read_input(input_file, limit)
        llm = LlamaCppModel(model)
        try:
            click.echo(run_stage(name, records, output, rejects, make(llm), not no_progress, **kw).line())
        finally:
            llm.close()


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
    from finemed_cli.synth.stage import read_input, run_stage, stage_outputs

    with stage_outputs([input_file], output, rejects) as rejects:
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
    from finemed_cli.data.output import output_slot
    from finemed_cli.synth.report import write_report

    with output_slot(out, inputs=files, kind="dir", what="report folder"):
        paths = write_report(list(files), out, tsne=not no_tsne)
    for path in paths:
        click.echo(f"wrote {path}")
