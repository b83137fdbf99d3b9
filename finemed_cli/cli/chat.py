"""`finemed chat`: a terminal conversation with a GGUF model, streaming, with line editing and history."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import click

from finemed_cli.cli.options import FiniteFloat, model_option, one_model, renamed, threads_option
from finemed_cli.config.answer import GPU_LAYERS_HELP

_HELP = ("/reset forgets the conversation, /system TEXT sets the system prompt, /exit (or Ctrl-D) quits; "
         "Ctrl-C stops a reply")


@click.command()
@click.argument("model", required=False)
@model_option()
@click.option("-p", "--prompt", default=None, help="Answer this one message and exit.")
@click.option("--system-prompt", "--system", "system", default=None,
              help="System prompt: TEXT, @FILE, none, model or finemed [default: the one a finemed-trained model "
                   "carries in its GGUF; finemed's o1-style prompt for the embedded models; else the model's own "
                   "(model)].")
@click.option("--lora", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="A llama.cpp LoRA GGUF applied for the session (finemed export-lora makes one).")
@renamed("--max-new-tokens", old=("--max-tokens",), type=click.IntRange(min=1), default=512, show_default=True,
         help="Token budget of each answer.")
@click.option("--temperature", type=FiniteFloat(min=0), default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-p", type=FiniteFloat(0, 1, min_open=True), default=0.95, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@renamed("-c", "--ctx-size", "n_ctx", old=("--ctx",), type=click.IntRange(min=16), default=None,
         help="Context length in tokens, at most the model's trained context [default: 4096, or the trained "
              "context when shorter].")
@threads_option()
@click.option("--n-gpu-layers", type=click.IntRange(min=-1), default=None, help=GPU_LAYERS_HELP[:1].upper() +
              GPU_LAYERS_HELP[1:] + ".")
def chat(model: str | None, model_option: str | None, prompt: str | None, system: str | None, lora: Path | None,
         max_new_tokens: int, temperature: float, top_p: float, seed: int, n_ctx: int | None, threads: int | None,
         n_gpu_layers: int | None) -> None:
    """Chat with a GGUF MODEL in the terminal, streaming, with the model's own chat template.

    MODEL is a .gguf file, a hub GGUF (org/name:Q4_K_M, org/name:FILE.gguf) or embedded:gemma3-270m. Lines
    are edited and recalled (Up) as in a shell, with history in $FINEMED_HOME/chat_history. In the
    conversation: /reset, /system TEXT, /exit; Ctrl-C stops the current reply and keeps the conversation.
    """
    from finemed_cli.checkpoints.embedded import caution_line, gguf_caution
    from finemed_cli.checkpoints.loading import resolve_gguf
    from finemed_cli.generate.chat import ChatSession
    from finemed_cli.generate.llamacpp import Sampling
    from finemed_cli.modeling.prompts import gguf_system_prompt

    path = resolve_gguf(one_model(model, model_option))
    session = ChatSession(path, max_tokens=max_new_tokens, sampling=Sampling(temperature, top_p, seed=seed),
                          n_ctx=n_ctx, threads=threads, n_gpu_layers=n_gpu_layers)
    caution = gguf_caution(path, session.general_name)
    if caution:
        click.echo(f"note: {caution_line(caution)}", err=True)
    try:
        session.set_system(gguf_system_prompt(system, session.trained_system_prompt, caution))
        with session.adapter_applied(lora) if lora else contextlib.nullcontext():
            if prompt is not None:
                _stream(session, prompt)
            else:
                click.echo(f"{path.name}: {_HELP}", err=True)
                _converse(session)
    finally:
        session.close()


def _converse(session: Any) -> None:
    from finemed_cli.generate.chat import MessageTooLong

    history = _line_editing()
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
            click.echo("\n(Ctrl-D or /exit quits)", err=True)
            continue
        if history is not None:
            history()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            session.reset()
            click.echo("(conversation reset)", err=True)
        elif line.startswith("/system"):
            session.set_system(line.removeprefix("/system").strip() or None)
            session.reset()
            click.echo(f"(system prompt {'set' if session.system else 'cleared'}; conversation reset)", err=True)
        elif line.startswith("/"):
            click.echo(_HELP, err=True)
        else:
            try:
                _stream(session, line)
            except MessageTooLong as e:  # that message is refused, not the session: the conversation goes on
                click.echo(f"error: {e}", err=True)


def _line_editing() -> Any:
    """readline editing and Up-arrow history (saved in $FINEMED_HOME); None where readline is missing."""
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input()
        return None
    from finemed_cli.paths import finemed_home

    path = finemed_home() / "chat_history"
    with contextlib.suppress(OSError):  # no history yet, or an unreadable one: start afresh
        readline.read_history_file(path)
    readline.set_history_length(1000)

    def save() -> None:
        with contextlib.suppress(OSError):  # history is a convenience: never the end of a chat
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)

    return save


def _stream(session: Any, text: str) -> None:
    """Print the reply as it comes; Ctrl-C stops it (what was said so far stays in the conversation)."""
    pieces = session.reply(text)
    try:
        for piece in pieces:
            click.echo(piece, nl=False)
    except KeyboardInterrupt:
        click.echo("\n(reply stopped)", err=True)
    finally:
        pieces.close()
    click.echo()
