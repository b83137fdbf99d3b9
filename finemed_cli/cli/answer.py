"""`finemed answer`."""

from __future__ import annotations

from pathlib import Path

import click


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
              help="Index directory from `finemed index build` (needed for TTT).")
@click.option("--model", default=None, help="HF model dir, .gguf file or hub id [default: embedded SmolLM2-135M-Instruct].")
@click.option("--embedder", default=None, help="Embedder; must match the index [default: the index's].")
@click.option("--ttt/--no-ttt", default=True, show_default=True, help="Test-time training on the neighbours.")
@click.option("--ttt-mode", type=click.Choice(["lora", "paper"]), default="lora", show_default=True,
              help="lora: finemed's LoRA TTT; paper: the reference procedure (full parameters, fresh Adam, "
                   "one step, padded), the baseline.")
@click.option("-k", "--neighbours", "k", default=1, show_default=True, help="Neighbours retrieved per question.")
@click.option("--ttt-steps", type=int, default=None, help="Optimizer steps [default: 1].")
@click.option("--ttt-lr", type=float, default=None, help="Learning rate [default: lora 3e-3, paper 1e-6].")
@click.option("--ttt-layers", type=int, default=None,
              help="Top decoder layers given LoRA [default: a quarter of them].")
@click.option("--ttt-rank", type=int, default=8, show_default=True, help="LoRA rank.")
@click.option("--ttt-alpha", type=float, default=16.0, show_default=True, help="LoRA alpha.")
@click.option("--ttt-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
              show_default=True, help="Comma-separated projections that get LoRA.")
@click.option("--ttt-max-length", type=int, default=2048, show_default=True,
              help="Tokens kept per neighbour in lora mode.")
@click.option("--ttt-pad-to", type=int, default=6144, show_default=True,
              help="Paper mode pads each neighbour to this many tokens, as the reference code; 0: no padding.")
@click.option("--max-new-tokens", type=int, default=512, show_default=True, help="Response token budget.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-p", type=float, default=0.95, show_default=True, help="Nucleus sampling (temperature > 0).")
@click.option("--generator", type=click.Choice(["auto", "llama.cpp", "transformers"]), default="auto",
              show_default=True,
              help="Generation backend; auto measures both once per machine and model and takes the faster.")
@click.option("--gguf", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The model's GGUF for llama.cpp [default: exported once from --model into $FINEMED_HOME].")
@click.option("--gguf-type", type=click.Choice(["f16", "bf16", "q8_0", "f32"]), default="f16", show_default=True,
              help="Outtype of that one-time export.")
@click.option("--thought-tokens", type=int, default=None,
              help="Token budget of the Thought section; past it '## Summarization' is written for the model.")
@click.option("--batch-size", type=int, default=1, show_default=True,
              help="Questions whose LoRA TTT adapters train together in one forward/backward (multi-adapter "
                   "LoRA); each keeps its own adapter, optimizer state and loss.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--shard", callback=_parse_shard, default=None, help="i/n: answer every n-th question from the i-th.")
@click.option("--limit", type=int, default=None, help="Answer at most this many questions (of this shard).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--dtype", default="auto", show_default=True, help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16.")
@click.option("--print", "show", is_flag=True, help="Print each answer as it is written.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def answer(questions: Path, output: Path | None, index_dir: Path | None, model: str | None,
           embedder: str | None, ttt: bool, ttt_mode: str, k: int, ttt_steps: int | None,
           ttt_lr: float | None, ttt_layers: int | None, ttt_rank: int, ttt_alpha: float, ttt_targets: str, ttt_max_length: int,
           ttt_pad_to: int, max_new_tokens: int, temperature: float, top_p: float, generator: str, gguf: Path | None,
           gguf_type: str, thought_tokens: int | None, batch_size: int, seed: int,
           shard: tuple[int, int], limit: int | None, device: str, dtype: str, show: bool,
           no_progress: bool) -> None:
    """Answer each question of QUESTIONS (JSONL): retrieve neighbours, test-time train, generate.

    Each answer record is appended to the output as soon as it is ready; rerunning the same command
    resumes where it stopped.
    """
    from finemed_cli.config.answer import AnswerConfig, GenerationConfig, TTTConfig
    from finemed_cli.pipeline.answer import run_answer

    if output is None:
        output = Path(questions.name.removesuffix(".jsonl") + ".answers.jsonl")
    config = AnswerConfig(
        questions=questions, output=output, index=index_dir, model=model, embedder=embedder,
        ttt=TTTConfig(mode=ttt_mode if ttt else "off", k=k, steps=ttt_steps, lr=ttt_lr, layers=ttt_layers, rank=ttt_rank,
                      alpha=ttt_alpha, targets=tuple(t.strip() for t in ttt_targets.split(",") if t.strip()),
                      max_length=ttt_max_length, pad_to=ttt_pad_to),
        generation=GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    backend=generator, gguf=gguf, gguf_type=gguf_type,
                                    thought_tokens=thought_tokens),
        seed=seed, shard=shard, limit=limit, device=device, dtype=dtype, batch_size=batch_size,
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
    click.echo(rec["response"])
