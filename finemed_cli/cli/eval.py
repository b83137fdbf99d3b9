"""`finemed eval`: benchmark accuracy (or held-out bits per token) of several variants in one run."""

from __future__ import annotations

from pathlib import Path

import click

from finemed_cli.cli.options import FiniteFloat, explicit_ttt_fields, option, threads_option
from finemed_cli.config.answer import GENERATORS, GenerationConfig, TTTConfig
from finemed_cli.config.eval import MODES, SOURCES, EvalConfig


class _Input(click.Path):
    """A file that exists, or a Hub dataset `hf:org/name[:config]` (passed on as text)."""

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> object:
        return value if isinstance(value, str) and value.startswith("hf:") else super().convert(value, param, ctx)


@click.command("eval")
@click.argument("inputs", nargs=-1, required=True, type=_Input(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Report folder (per-variant results inside are resumed on a rerun).")
@option(EvalConfig, "mode", "--mode", type=click.Choice(MODES))
@option(EvalConfig, "compare", "--compare")
@option(EvalConfig, "index", "--index", "index_dir")
@option(EvalConfig, "model", "-m", "--model")
@option(EvalConfig, "source", "--source", type=click.Choice(SOURCES))
@option(EvalConfig, "split", "--split")
@option(EvalConfig, "columns", "--columns", type=str, default=None, show_default=False)
@option(EvalConfig, "limit", "--limit", type=click.IntRange(min=1))
@option(EvalConfig, "questions", "--questions", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@option(EvalConfig, "subjects", "--subjects", type=click.Choice(["medical", "all"]))
@option(EvalConfig, "medmcqa_cop_base", "--medmcqa-cop-base", type=click.IntRange(0, 1))
@option(TTTConfig, "k", "-k", "--neighbours", "k")
@option(TTTConfig, "steps", "--ttt-steps")
@option(TTTConfig, "lr", "--ttt-lr")
@option(EvalConfig, "ttt_settings", "--ttt-settings")
@option(EvalConfig, "batch_size", "--batch-size")
@option(GenerationConfig, "max_new_tokens", "--max-new-tokens", help="Response token budget (generate mode).")
@option(GenerationConfig, "backend", "--generator", type=click.Choice(GENERATORS))
@option(GenerationConfig, "n_ctx", "-c", "--ctx-size", "n_ctx", type=click.IntRange(min=16))
@threads_option(expose_value=False)
@option(EvalConfig, "max_length", "--max-length")
@option(EvalConfig, "against", "--against", multiple=True, default=(), show_default=False,
        type=click.Path(exists=True, dir_okay=False, path_type=Path))
@option(EvalConfig, "ngram", "--ngram", type=click.IntRange(min=1))
@option(EvalConfig, "overlap", "--overlap", type=FiniteFloat(0, 1, min_open=True))
@option(EvalConfig, "drop_contaminated", "--drop-contaminated", is_flag=True, show_default=False)
@option(EvalConfig, "trust_letter", "--trust-letter", is_flag=True, show_default=False)
@option(EvalConfig, "system_prompt", "--system-prompt")
@option(EvalConfig, "seed", "--seed")
@option(EvalConfig, "device", "--device")
@option(EvalConfig, "dtype", "--dtype")
@option(EvalConfig, "quantize", "--quantize", type=click.Choice(["none", "nf4"]))
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def eval_(inputs: tuple[Path, ...], out: Path, mode: str, compare: str | None, index_dir: Path | None,
          model: str | None, source: str | None, split: str | None, columns: str | None, limit: int | None,
          questions: Path | None,
          subjects: str, medmcqa_cop_base: int | None, k: int, ttt_steps: int | None, ttt_lr: float | None, ttt_settings: str | None,
          batch_size: int, max_new_tokens: int, generator: str, n_ctx: int | None, max_length: int, against: tuple[Path, ...], ngram: int,
          overlap: float, drop_contaminated: bool, trust_letter: bool, system_prompt: str | None, seed: int, device: str, dtype: str, quantize: str, no_progress: bool) -> None:
    """Evaluate variants on the same items and write report.json, report.md, plots and lm-eval-harness results
    (lm-eval/<variant>/results_*.json, samples_*.jsonl) to OUTPUT.

    \b
    finemed eval medqa.jsonl --index corpus.index --compare ttt,no-ttt -o reports/medqa
    finemed eval answers-ttt.jsonl answers-base.jsonl -o reports/medqa      # score existing answer files
    finemed eval a.jsonl b.jsonl --questions medqa.jsonl -o reports/medqa   # ... against a benchmark's key
    finemed eval pubmedqa.jsonl --mode loglik -o reports/pubmedqa
    finemed eval hf:openlifescienceai/medmcqa --split validation --mode loglik -o reports/medmcqa
    finemed eval heldout.jsonl --mode perplexity --index corpus.index -o reports/ppl
    """
    from finemed_cli.data.sources import parse_columns
    from finemed_cli.pipeline.evaluate import evaluate

    config = EvalConfig(
        inputs=list(inputs), out=out, mode=mode, compare=compare, index=index_dir, model=model, source=source,
        split=split, columns=parse_columns(columns),
        limit=limit, questions=questions, subjects=subjects, medmcqa_cop_base=medmcqa_cop_base,
        ttt=TTTConfig(k=k, steps=ttt_steps, lr=ttt_lr), ttt_settings=ttt_settings, ttt_explicit=explicit_ttt_fields(),
        generation=GenerationConfig(max_new_tokens=max_new_tokens, backend=generator, n_ctx=n_ctx), batch_size=batch_size,
        max_length=max_length, against=list(against), ngram=ngram, overlap=overlap,
        drop_contaminated=drop_contaminated, trust_letter=trust_letter, system_prompt=system_prompt, seed=seed, device=device, dtype=dtype, quantize=quantize, progress=not no_progress)
    result = evaluate(config)
    for line in result.lines:
        click.echo(line)
    if result.paths:  # under torchrun only rank 0 writes the report
        click.echo("wrote " + ", ".join(str(p) for p in result.paths.values()))
