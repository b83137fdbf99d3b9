"""`finemed env`."""

from __future__ import annotations

import json
from typing import Any

import click


@click.command("env")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts and bug reports).")
def env(as_json: bool) -> None:
    """Print versions, CPU and GPUs, llama.cpp's build, caches and paths: paste it into a bug report."""
    from finemed_cli.envinfo import environment

    info = environment()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for section, value in info.items():
        if isinstance(value, dict) and value:
            click.echo(f"{section}:")
            for key, item in value.items():
                click.echo(f"  {key}: {_show(item)}")
        else:
            click.echo(f"{section}: {_show(value)}")


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (dict, list)):
        return json.dumps(value) if value else "none"
    return str(value)
