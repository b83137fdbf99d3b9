"""`finemed eval`: benchmark accuracy (or held-out bits per token) of several variants in one run."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("eval")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Report folder (per-variant results inside are resumed on a rerun).")
@click.option("--mode", type=click.Choice(["generate", "loglik", "perplexity"]), default="generate",
              show_default=True,
              help="generate: answer and extract the letter; loglik: score each option's log-likelihood; "
                   "perplexity: bits per token of held-out corpus records' reasoning and answer.")
@click.option("--compare", default=None,
              help="Variants on the same items: ttt, no-ttt, paper, each optionally @MODEL (another model) "
                   "[default: ttt,no-ttt]. When scoring answer files: a name for each file, in order.")
@click.option("--index", "index_dir", type=click.Path(path_type=Path), default=None,
              help="Index directory for TTT neighbours (and the decontamination check).")
@click.option("--model", default=None, help="HF model dir or hub id [default: the embedded model].")
@click.option("--source", type=click.Choice(["finemed", "medqa", "medmcqa", "pubmedqa", "mmlu", "mmlu_pro"]),
              default=None, help="Benchmark format [default: detected from the file].")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Use the first N items of each input file (with --drop-contaminated: the first N clean ones).")
@click.option("--questions", "questions", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="When scoring answer files: the benchmark or question file they answer. Its answer key and "
                   "options are used (the letter is extracted again from each response) and its sources and "
                   "departments label the report.")
@click.option("--subjects", type=click.Choice(["medical", "all"]), default="medical", show_default=True,
              help="MMLU and MMLU-Pro files: keep their medical subjects (MMLU's anatomy, clinical knowledge, "
                   "college biology and medicine, medical genetics, professional medicine; MMLU-Pro's health) "
                   "or all.")
@click.option("--medmcqa-cop-base", type=click.IntRange(0, 1), default=None,
              help="MedMCQA's 'cop': 0 when 0 = A (Hugging Face copies), 1 when 1 = A (the original release) "
                   "[default: inferred from the file].")
@click.option("-k", "--neighbours", "k", default=1, show_default=True, help="Neighbours per item for TTT.")
@click.option("--ttt-steps", type=int, default=None, help="TTT optimizer steps [default: 1].")
@click.option("--ttt-lr", type=float, default=None, help="TTT learning rate [default: lora 3e-3, paper 1e-6].")
@click.option("--batch-size", type=int, default=1, show_default=True,
              help="LoRA TTT variants: questions whose adapters train together in one forward/backward "
                   "(equal to one at a time up to rounding; faster on a GPU).")
@click.option("--max-new-tokens", type=int, default=512, show_default=True, help="generate mode: token budget.")
@click.option("--generator", type=click.Choice(["auto", "llama.cpp", "transformers"]), default="auto",
              show_default=True, help="generate mode: generation backend.")
@click.option("--max-length", type=int, default=2048, show_default=True,
              help="perplexity mode: tokens kept per record.")
@click.option("--against", "against", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Training data to check the items against for contamination (repeatable); the index "
                   "corpus is always checked.")
@click.option("--ngram", type=click.IntRange(min=1), default=8, show_default=True,
              help="Decontamination n-gram length (words).")
@click.option("--overlap", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="Share of an item's n-grams found in the references that flags it.")
@click.option("--drop-contaminated", is_flag=True, help="Leave flagged items out of the evaluation.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def eval_(inputs: tuple[Path, ...], out: Path, mode: str, compare: str | None, index_dir: Path | None,
          model: str | None, source: str | None, limit: int | None, questions: Path | None,
          subjects: str, medmcqa_cop_base: int | None, k: int, ttt_steps: int | None, ttt_lr: float | None,
          batch_size: int, max_new_tokens: int, generator: str, max_length: int, against: tuple[Path, ...], ngram: int,
          overlap: float, drop_contaminated: bool, seed: int, device: str, dtype: str, no_progress: bool) -> None:
    """Evaluate variants on the same items and write report.json, report.md and plots to OUTPUT.

    \b
    finemed eval medqa.jsonl --index corpus.index --compare ttt,no-ttt -o reports/medqa
    finemed eval answers-ttt.jsonl answers-base.jsonl -o reports/medqa      # score existing answer files
    finemed eval a.jsonl b.jsonl --questions medqa.jsonl -o reports/medqa   # ... against a benchmark's key
    finemed eval pubmedqa.jsonl --mode loglik -o reports/pubmedqa
    finemed eval heldout.jsonl --mode perplexity --index corpus.index -o reports/ppl
    """
    from finemed_cli.config.answer import GenerationConfig, TTTConfig
    from finemed_cli.eval.run import evaluate

    paths = evaluate(
        list(inputs), out, mode=mode, compare=compare, index_dir=index_dir, model=model, source=source,
        limit=limit, ttt=TTTConfig(k=k, steps=ttt_steps, lr=ttt_lr),
        generation=GenerationConfig(max_new_tokens=max_new_tokens, backend=generator), max_length=max_length,
        against=list(against), ngram=ngram, overlap=overlap, drop=drop_contaminated, seed=seed, device=device,
        dtype=dtype, progress=not no_progress, batch_size=batch_size, questions=questions,
        medmcqa_cop_base=medmcqa_cop_base, subjects=subjects, echo=click.echo)
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()))
