"""The `finemed` command. Thin: parse, build a config, call one library function, report.

Heavy imports (torch, transformers) happen inside the commands, so `finemed --help` is instant.
"""

from __future__ import annotations

import os
import re
import sys

import click

from finemed_cli import __version__, console
from finemed_cli.cli.answer import answer
from finemed_cli.cli.calibrate import ttt_calibrate
from finemed_cli.cli.chat import chat
from finemed_cli.cli.env import env
from finemed_cli.cli.eval import eval_
from finemed_cli.cli.export import export, export_lora
from finemed_cli.cli.index import index
from finemed_cli.cli.merge import merge
from finemed_cli.cli.serve import serve
from finemed_cli.cli.synth import report, synth
from finemed_cli.cli.train import train
from finemed_cli.errors import FinemedError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="finemed")
@click.option("-v", "--verbose", count=True, help="More output: other libraries' progress bars and warnings too "
              "(-vv: debug lines). Also accepted after the verb.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors, no progress bars. Also accepted after "
              "the verb.")
def cli(verbose: int, quiet: bool) -> None:
    """finemed: offline medical-reasoning LLMs with retrieval and test-time training (TTT).

    \b
    finemed index build corpus.jsonl -o corpus.index
    finemed answer questions.jsonl -o answers.jsonl --index corpus.index
    finemed export MODEL_DIR -o model.gguf --outtype q4_k_m
    finemed chat model.gguf
    finemed serve model.gguf --port 8080
    finemed train examples/train-tiny.yaml
    finemed ttt-calibrate dev.jsonl --index corpus.index -o calib
    """
    console.configure(-1 if quiet else verbose)
    # Offline-capable, not offline-forced: every hub id is resolved to a local directory by hub.py
    # (cache first, a download only on a miss), so transformers and sentence-transformers never go online.
    # HF_HUB_OFFLINE=1 from the user still refuses every download.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


cli.add_command(answer)
cli.add_command(merge)
cli.add_command(index)
cli.add_command(export)
cli.add_command(export_lora)
cli.add_command(chat)
cli.add_command(serve)
cli.add_command(train)
cli.add_command(eval_)
cli.add_command(ttt_calibrate)
cli.add_command(synth)
cli.add_command(report)
cli.add_command(env)


def _verbosity_after_the_verb(command: click.Command) -> None:
    """Give every command `-v`/`-q` too (`finemed answer … -v`, as other CLIs take them); they apply at once."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _verbosity_after_the_verb(sub)
        return

    def verbose(ctx: click.Context, param: click.Parameter, value: int) -> None:
        if value:
            console.configure(value)

    def quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if value:
            console.configure(-1)

    command.params.append(click.Option(["-v", "--verbose"], count=True, expose_value=False, callback=verbose,
                                       is_eager=True, help="More output (-vv: debug lines)."))
    command.params.append(click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, callback=quiet,
                                       is_eager=True, help="Only warnings and errors, no progress bars."))


for _command in cli.commands.values():
    _verbosity_after_the_verb(_command)


def printable(message: str, args: list[str]) -> str:
    """`message` with every control character that came from the command line (a file name with a newline in
    it) written as an escape, so one error stays one line for the person and for tools that read `error:`."""
    pieces = {piece for arg in args for piece in [arg, *re.split(r"[,@=]", arg)]
              if any(not c.isprintable() for c in piece)}
    for piece in sorted(pieces, key=len, reverse=True):
        message = message.replace(piece, piece.encode("unicode_escape").decode("ascii"))
    return message


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, docker and Slurm send), raised where the run is, as Ctrl-C is: every `finally`
    and `with` on the way out runs, so temporary files are removed and locks released."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated


def main() -> None:
    """Console-script entry: FinemedErrors become one clean line and exit code 2; others keep tracebacks."""
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        _main()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort as e:  # click turns KeyboardInterrupt (and so Terminated) into Abort
        if isinstance(e.__cause__, Terminated):
            click.echo("terminated; rerun the same command to resume", err=True)
            sys.exit(143)
        click.echo("interrupted; rerun the same command to resume", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except FinemedError as e:
        click.echo(f"error: {printable(str(e), sys.argv[1:])}", err=True)
        sys.exit(2)
    except OSError as e:
        if e.filename is None:  # not about a path the user gave: a bug, keep its traceback
            raise
        from finemed_cli.data.output import os_error

        click.echo(f"error: {os_error(e)}", err=True)
        sys.exit(2)
    except Terminated:
        click.echo("terminated; rerun the same command to resume", err=True)
        sys.exit(143)
    except KeyboardInterrupt:
        click.echo("interrupted; rerun the same command to resume", err=True)
        sys.exit(130)
