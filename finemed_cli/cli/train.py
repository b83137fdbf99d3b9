"""`finemed train`: the curriculum of one YAML config (SFT stages, then DPO)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from finemed_cli.cli.options import threads_option
from finemed_cli.config.train import BACKENDS


@click.command()
@click.argument("config_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set stages.0.epochs=2 (repeatable; values read as YAML).")
@click.option("--resume", is_flag=True, help="Continue the run in output_dir/name from its last checkpoint.")
@click.option("--dry-run", is_flag=True, help="Print the plan (records, tokens, steps per stage) and stop.")
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="Force a training backend (default: the config's).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@threads_option(help="CPU threads of torch [default: the physical cores torch finds].", expose_value=False)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def train(config_file: Path, overrides: tuple[str, ...], resume: bool, dry_run: bool, backend: str | None,
          device: str, no_progress: bool) -> None:
    """Train the stages of CONFIG_FILE in order: each SFT or DPO stage starts from the previous one's result.

    \b
    finemed train examples/train-tiny.yaml
    finemed train CONFIG --set stages.0.epochs=2 --resume
    finemed train CONFIG --dry-run
    torchrun --nproc-per-node 2 -m finemed_cli train CONFIG    (data parallel; or accelerate launch)

    Writes output_dir/name/stage-K-<kind>/ (adapter, metrics.jsonl, loss.png, summary.json) and final/, a
    merged model directory for `finemed answer --model` and `finemed export`.
    """
    from finemed_cli.config.train import load_train_config

    cfg = load_train_config(config_file, overrides)
    if dry_run:
        from finemed_cli.checkpoints.loading import load_tokenizer
        from finemed_cli.train.recipe import plan

        tok = load_tokenizer(cfg.model.name)  # the plan needs token counts, not an 8B model in memory
        click.echo(f"run: {cfg.run_dir}  model: {cfg.model.name or 'embedded default'}  "
                   f"method: {cfg.model.method}  seed: {cfg.seed}")
        for row in plan(cfg, tok):
            held = f", {row['held_out']} held out" if row["held_out"] else ""
            filt = f", {row['filtered_out']} filtered out" if row["filtered_out"] else ""
            click.echo(f"stage {row['stage']} {row['kind']} ({row['label']}): {row['records']} records{filt}"
                       f" -> {row['train']} {'pairs' if row['kind'] == 'dpo' else 'sequences'}{held}, {row['tokens']:,} tokens, "
                       f"{row['truncated']} truncated, {row['steps']} steps at lr {row['lr']:g}")
            for path, shape in row["files"].items():
                click.echo(f"    {path} ({shape})")
        return
    from finemed_cli.train.recipe import run_train

    run = run_train(cfg, resume=resume, backend=backend, device=device, progress=not no_progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun / accelerate launch: once, not once per process
        click.echo(f"done: {run}/final (finemed answer --model {run}/final; finemed export {run}/final -o m.gguf)")
