"""`finemed ttt-calibrate`."""

from __future__ import annotations

from pathlib import Path

import click

from finemed_cli.cli.options import FiniteFloat, option, threads_option
from finemed_cli.config.calibrate import CalibrateConfig


@click.command("ttt-calibrate")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Calibration folder: per-variant results (resumed on a rerun), report, calibration.png, "
                   "ttt-settings.json.")
@click.option("--index", "index_dir", type=click.Path(path_type=Path), required=True,
              help="Index directory of the TTT neighbours (the dev records themselves are never their own).")
@click.option("-m", "--model", default=None, help="The model to calibrate [default: the embedded SmolLM2].")
@option(CalibrateConfig, "mode", "--mode", type=click.Choice(["auto", "perplexity", "loglik"]))
@option(CalibrateConfig, "candidates", "--candidates")
@option(CalibrateConfig, "limit", "--limit", type=click.IntRange(min=1))
@option(CalibrateConfig, "max_minutes", "--max-minutes", type=FiniteFloat(min=0, min_open=True))
@option(CalibrateConfig, "seed", "--seed")
@click.option("--oracle/--no-oracle", default=True, show_default=True,
              help="Also run each candidate on every item's own gold answer (oracle-ttt): how much the setting "
                   "can transfer, beside how much it does with real neighbours (doubles the time).")
@click.option("--system-prompt", default=None, help="As `finemed eval --system-prompt`.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
@threads_option(expose_value=False)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def ttt_calibrate(inputs: tuple[Path, ...], out: Path, index_dir: Path, model: str | None, mode: str,
                  candidates: str | None, limit: int | None, max_minutes: float, seed: int, oracle: bool,
                  system_prompt: str | None, device: str, dtype: str, no_progress: bool) -> None:
    """Find the TTT setting that improves MODEL on its own dev data (or learn that none does).

    Each candidate runs as an eval variant against no-TTT on the same items: held-out bits per token of dev
    corpus records' reasoning (perplexity), or loglik accuracy of benchmark questions. The candidate with the
    largest paired improvement whose 95% interval excludes zero is written to ttt-settings.json (none: TTT
    off), which `answer --ttt-settings` and `eval --ttt-settings` take, and find by default beside a model or
    index. Rerunning resumes.

    \b
    finemed ttt-calibrate dev-traces.jsonl --index corpus.index -o calib --max-minutes 60
    finemed ttt-calibrate medqa-dev.jsonl --index corpus.index -o calib --candidates 'ttt(steps=4),ttt(k=3)'
    """
    from finemed_cli.pipeline.calibrate import calibrate

    result = calibrate(CalibrateConfig(
        inputs=list(inputs), out=out, index=index_dir, model=model, mode=mode, candidates=candidates, limit=limit,
        max_minutes=max_minutes, seed=seed, oracle=oracle, device=device, dtype=dtype, system_prompt=system_prompt,
        progress=not no_progress))
    scale, unit = (1, "bits/token saved") if result.mode == "perplexity" else (100, "points gained")
    for r in result.rows:
        lo, hi = (v * scale for v in r["ci95"])
        mark = "  <- chosen" if r["variant"] == result.chosen else ""
        ceiling = f"; oracle {r['oracle']['improvement'] * scale:+.4f}" if r.get("oracle") else ""
        leak = f"; letter leak {100 * r['leak']['rise']:+.1f} points" if r.get("leak") else ""
        click.echo(f"{r['variant']:<45} {r['improvement'] * scale:+.4f} {unit} [{lo:+.4f}, {hi:+.4f}]{ceiling}{leak} "
                   f"in {r['minutes']:.1f} min{mark}")
    if result.skipped:
        click.echo(f"not run within --max-minutes: {', '.join(result.skipped)} (rerun with more to add them)")
    if not result.paths:  # under torchrun, a rank other than 0: rank 0 chooses and writes
        click.echo("this rank's share is done; rank 0 chooses and writes the settings")
        return
    click.echo(f"chosen: {result.chosen or 'none (no setting helps: TTT off)'}; wrote "
               + ", ".join(str(p) for p in (result.paths["settings"], result.paths["plot"], result.paths["json"])))
