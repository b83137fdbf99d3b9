"""`finemed answer`."""

from __future__ import annotations

from pathlib import Path

import click

from finemed_cli.cli.options import explicit_ttt_fields, option, split_names, threads_option, ttt_options
from finemed_cli.config.answer import (
    GENERATORS,
    GGUF_TYPES,
    QUANTIZE_MODES,
    TTT_ENGINES,
    AnswerConfig,
    GenerationConfig,
    TTTConfig,
)


def _parse_shard(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int]:
    if value is None:
        return (0, 1)
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"{value!r}: use i/n, e.g. 0/4 for the first of four shards") from None
    if n < 1 or not 0 <= i < n:
        raise click.BadParameter(f"{value!r}: need 0 <= i < n")
    return (i, n)


@click.command()
@click.argument("questions", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Answer JSONL, appended and resumed [default: QUESTIONS stem + .answers.jsonl].")
@click.option("--index", "index_dir", type=click.Path(path_type=Path), default=None,
              help="Index directory from `finemed index build` [default with TTT: finemed's example corpus, indexed once "
                   "into $FINEMED_HOME/index].")
@click.option("-m", "--model", default=None, help="HF model dir, .gguf file, hub id (org/name, org/name:Q4_K_M) or "
              "embedded:gemma3-270m [default: embedded SmolLM2-135M-Instruct].")
@click.option("--embedder", default=None, help="Embedder; must match the index [default: the index's].")
@click.option("--ttt/--no-ttt", default=True, show_default=True, help="Test-time training on the neighbours.")
@click.option("--ttt-mode", type=click.Choice(["lora", "paper"]), default="lora", show_default=True,
              help="lora: finemed's LoRA TTT; paper: the reference procedure (full parameters, fresh Adam, "
                   "one step, padded), the baseline.")
@ttt_options()
@option(TTTConfig, "engine", "--ttt-engine", type=click.Choice(TTT_ENGINES))
@option(AnswerConfig, "ttt_settings", "--ttt-settings")
@option(GenerationConfig, "max_new_tokens", "--max-new-tokens")
@option(GenerationConfig, "temperature", "--temperature")
@option(GenerationConfig, "top_p", "--top-p")
@option(GenerationConfig, "backend", "--generator", type=click.Choice(GENERATORS))
@option(GenerationConfig, "gguf", "--gguf", type=click.Path(path_type=Path, dir_okay=False))
@option(GenerationConfig, "gguf_type", "--outtype", "gguf_type", old=("--gguf-type",), type=click.Choice(GGUF_TYPES))
@option(GenerationConfig, "thought_tokens", "--thought-tokens")
@option(GenerationConfig, "n_gpu_layers", "--n-gpu-layers")
@option(GenerationConfig, "n_ctx", "-c", "--ctx-size", "n_ctx", type=click.IntRange(min=16))
@threads_option(expose_value=False)
@option(AnswerConfig, "system_prompt", "--system-prompt")
@option(AnswerConfig, "batch_size", "--batch-size")
@option(AnswerConfig, "icl", "--icl", is_flag=True, show_default=False)
@option(AnswerConfig, "seed", "--seed")
@click.option("--shard", callback=_parse_shard, default=None, help="i/n: answer every n-th question from the i-th.")
@option(AnswerConfig, "limit", "--limit")
@option(AnswerConfig, "device", "--device")
@option(AnswerConfig, "dtype", "--dtype")
@option(AnswerConfig, "quantize", "--quantize", type=click.Choice(QUANTIZE_MODES))
@click.option("--print", "show", is_flag=True, help="Print each answer as it is written.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def answer(questions: Path, output: Path | None, index_dir: Path | None, model: str | None,
           embedder: str | None, ttt: bool, ttt_mode: str, k: int, pick: str, ttt_steps: int | None,
           ttt_lr: float | None, ttt_layers: int | None, ttt_rank: int, ttt_alpha: float, ttt_targets: str,
           ttt_max_length: int, ttt_pad_to: int, ttt_loss_on: str, ttt_min_sim: float | None, ttt_engine: str,
           ttt_settings: str | None, max_new_tokens: int, temperature: float, top_p: float,
           generator: str, gguf: Path | None, gguf_type: str, thought_tokens: int | None,
           n_gpu_layers: int | None, n_ctx: int | None, system_prompt: str | None, batch_size: int,
           icl: bool, seed: int, shard: tuple[int, int], limit: int | None, device: str, dtype: str, quantize: str,
           show: bool, no_progress: bool) -> None:
    """Answer each question of QUESTIONS (JSONL): retrieve neighbours, test-time train, generate.

    Each answer record is appended to the output as soon as it is ready; rerunning the same command
    resumes where it stopped.
    """
    from finemed_cli.pipeline.answer import run_answer

    if output is None:
        output = Path(questions.name.removesuffix(".jsonl") + ".answers.jsonl")
    if index_dir is None and ttt:  # the card's `finemed answer questions.jsonl`: TTT on the shipped corpus
        from finemed_cli.retrieval.default import default_index

        index_dir = default_index(embedder, progress=not no_progress)
    config = AnswerConfig(
        questions=questions, output=output, index=index_dir, model=model, embedder=embedder,
        ttt=TTTConfig(mode=ttt_mode if ttt else "off", k=k, pick=pick, steps=ttt_steps, lr=ttt_lr,
                      layers=ttt_layers,
                      rank=ttt_rank, alpha=ttt_alpha, targets=split_names(ttt_targets),
                      max_length=ttt_max_length, pad_to=ttt_pad_to, loss_on=ttt_loss_on, min_sim=ttt_min_sim,
                      engine=ttt_engine),
        generation=GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    backend=generator, gguf=gguf, gguf_type=gguf_type,
                                    thought_tokens=thought_tokens, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx),
        seed=seed, shard=shard, limit=limit, device=device, dtype=dtype, quantize=quantize, batch_size=batch_size,
        system_prompt=system_prompt, ttt_settings=ttt_settings, ttt_explicit=explicit_ttt_fields(), icl=icl,
    )
    summary = run_answer(config, progress=not no_progress, on_record=_print_record if show else None)
    parts = [f"{summary.answered - summary.rejected} answered"]
    if summary.skipped:
        parts.append(f"{summary.skipped} already in {output}")
    if summary.rejected:
        parts.append(f"{summary.rejected} not answered (see their 'error')")
    if summary.accuracy is not None:
        parts.append(f"accuracy {summary.correct}/{summary.scored} = {summary.accuracy:.1%} (this run)")
    if summary.mean_ttt_seconds is not None:
        parts.append(f"mean TTT {summary.mean_ttt_seconds:.2f} s")
    if summary.mean_generation_seconds is not None:
        parts.append(f"mean generation {summary.mean_generation_seconds:.2f} s")
    click.echo(f"{output}: " + ", ".join(parts))


def _print_record(rec: dict) -> None:
    if rec.get("error"):
        click.echo(f"\n── {rec['id']}  not answered: {rec['error']}")
        return
    ttt = rec["ttt"]
    loss = ""
    if ttt.get("loss_before") is not None:
        loss = f"  TTT loss {ttt['loss_before']:.3f} → {ttt['loss_after']:.3f} in {ttt['seconds']:.1f} s"
    gold = f"  gold {rec['answer']}" if "answer" in rec else ""
    mark = {True: " ✓", False: " ✗"}.get(rec.get("correct"), "")
    nb = ", ".join(n["id"] for n in rec["neighbours"]) or "-"
    click.echo(f"\n── {rec['id']}  prediction {rec['prediction']!r}{gold}{mark}  neighbours {nb}{loss}")
    if d := rec.get("disagreement"):
        click.echo(f"   letter {d['letter']} but the text names option {d['text']}: scored wrong "
                   "(`finemed eval --trust-letter` scores the letter)")
    click.echo(rec["response"])
