"""`finemed serve`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from finemed_cli.cli.options import (
    FiniteFloat,
    explicit_ttt_fields,
    model_option,
    one_model,
    option,
    split_names,
    threads_option,
    ttt_options,
)
from finemed_cli.config.answer import TTTConfig
from finemed_cli.config.serve import SEED_MAX, TTT_SUFFIX, ServeConfig

if TYPE_CHECKING:  # the server's modules import FastAPI: only inside the command, so --help stays instant
    from finemed_cli.serve.engine import ServeEngine
    from finemed_cli.serve.guard import Access


@click.command()
@click.argument("model", required=False)
@model_option()
@option(ServeConfig, "host", "--host")
@option(ServeConfig, "port", "--port", type=click.IntRange(0, 65535))
@option(ServeConfig, "allowed_hosts", "--allowed-host", "allowed_hosts", multiple=True, default=(),
        show_default=False, metavar="NAME")
@option(ServeConfig, "api_key_env", "--api-key-env", metavar="VAR")
@option(ServeConfig, "shutdown_grace", "--shutdown-grace", type=FiniteFloat(0, 3600), metavar="SECONDS")
@option(ServeConfig, "name", "--name")
@option(ServeConfig, "system_prompt", "--system-prompt", "--system")
@option(ServeConfig, "lora", "--lora", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@option(ServeConfig, "n_ctx", "-c", "--ctx-size", "n_ctx", old=("--ctx",))
@threads_option(help="CPU threads per request, of llama.cpp and TTT's torch [default: the physical cores torch "
                     "finds].")
@option(ServeConfig, "n_gpu_layers", "--n-gpu-layers", type=click.IntRange(min=-1))
@option(ServeConfig, "prompt_cache", "--prompt-cache/--no-prompt-cache")
@option(ServeConfig, "max_tokens", "--max-new-tokens", "max_tokens", old=("--max-tokens",))
@option(ServeConfig, "temperature", "--temperature")
@option(ServeConfig, "top_p", "--top-p")
@option(ServeConfig, "seed", "--seed", type=click.IntRange(0, SEED_MAX))
@option(ServeConfig, "index", "--index", type=click.Path(path_type=Path))
@option(ServeConfig, "ttt_model", "--ttt-model")
@option(ServeConfig, "embedder", "--embedder")
@ttt_options(pad_to=False)
@option(ServeConfig, "ttt_settings", "--ttt-settings")
@option(ServeConfig, "device", "--device")
@option(ServeConfig, "quantize", "--quantize", type=click.Choice(["auto", "none", "nf4"]))
def serve(model: str | None, model_option: str | None, host: str, port: int, allowed_hosts: tuple[str, ...],
          api_key_env: str, shutdown_grace: float, name: str | None, system_prompt: str | None, lora: Path | None,
          n_ctx: int, threads: int | None, n_gpu_layers: int | None, prompt_cache: bool, max_tokens: int,
          temperature: float, top_p: float, seed: int, index: Path | None, ttt_model: str | None,
          embedder: str | None, k: int, pick: str, ttt_steps: int | None, ttt_lr: float | None,
          ttt_layers: int | None, ttt_rank: int, ttt_alpha: float, ttt_targets: str, ttt_max_length: int,
          ttt_loss_on: str, ttt_min_sim: float | None, ttt_settings: str, device: str, quantize: str) -> None:
    """Serve a GGUF MODEL over OpenAI's chat-completions API, with optional per-request TTT.

    MODEL is a .gguf file, a hub GGUF (org/name:Q4_K_M) or embedded:gemma3-270m. Point any OpenAI client at
    http://HOST:PORT/v1: /v1/chat/completions, streamed or not, /v1/models, /v1/completions (with logprobs and
    echo: lm-eval's local-completions scores with it) and /v1/embeddings (--embedder); /tokenize, /detokenize
    and /metrics (Prometheus) beside them. A request field the server does not implement is a 400 naming it.
    With FINEMED_API_KEY set (or the variable --api-key-env names), every request but /health needs that key;
    else any key is accepted. On a loopback --host, requests must name localhost, 127.0.0.1 or [::1] (or an
    --allowed-host) in Host.

    A client that disconnects stops its generation at the next token. Ctrl-C or SIGTERM: requests in flight
    get --shutdown-grace seconds to finish, the rest are cancelled at their next token (a 503), and the
    server exits 0 once every one has ended (a TTT request still training finishes its training first).

    With --index, a request for the model NAME+ttt (or with "ttt": true in its body) is answered after TTT:
    its last user message retrieves its neighbours, a LoRA adapter is trained on them and used for that
    answer only. TTT requests run one at a time; the others do not wait behind them.

    \b
    finemed serve model.gguf --port 8080
    finemed serve embedded:smollm2-135m --index corpus.index
    """
    from finemed_cli.serve.app import listen, serve_forever
    from finemed_cli.serve.engine import ServeEngine
    from finemed_cli.serve.guard import server_access

    ttt = TTTConfig(k=k, pick=pick, steps=ttt_steps, lr=ttt_lr, layers=ttt_layers, rank=ttt_rank,
                    alpha=ttt_alpha, targets=split_names(ttt_targets), max_length=ttt_max_length, loss_on=ttt_loss_on,
                    min_sim=ttt_min_sim)
    config = ServeConfig(one_model(model, model_option), host=host, port=port, allowed_hosts=allowed_hosts, api_key_env=api_key_env,
                         shutdown_grace=shutdown_grace, name=name, system_prompt=system_prompt, lora=lora,
                         n_ctx=n_ctx, threads=threads, n_gpu_layers=n_gpu_layers, prompt_cache=prompt_cache, max_tokens=max_tokens,
                         temperature=temperature, top_p=top_p, seed=seed, index=index, ttt_model=ttt_model, embedder=embedder, ttt=ttt,
                         ttt_settings=ttt_settings, ttt_explicit=explicit_ttt_fields(), device=device,
                         quantize=quantize)
    config.validate()
    sock = listen(host, port)  # before loading: a busy port fails at once
    try:
        access = server_access(sock.getsockname()[0], allowed_hosts, api_key_env)
        engine = ServeEngine(config)
    except BaseException:
        sock.close()
        raise
    try:
        _announce(engine, sock.getsockname(), access, api_key_env)
        level = logging.getLogger().getEffectiveLevel()
        serve_forever(engine, sock, access, log_level=logging.getLevelName(level).lower())
    finally:  # serve_forever returns once no request uses the model: only then is it freed
        sock.close()
        engine.close()


def _announce(engine: ServeEngine, address: tuple[Any, ...], access: Access, api_key_env: str) -> None:
    from finemed_cli.serve.guard import is_loopback

    if engine.caution_line:
        click.echo(f"note: {engine.caution_line}", err=True)
    where = f"{_host(address[0])}:{address[1]}"
    if not is_loopback(address[0]):
        click.echo(f"warning: {where} is reachable from the network: "
                   + (f"requests need the API key in {api_key_env}" if access.api_key else
                      f"anyone who reaches it can use the model; set {api_key_env} to require a key"), err=True)
    ttt_note = f" (per-request TTT: {engine.name}{TTT_SUFFIX})" if engine.ttt is not None else ""
    key_note = f", API key from {api_key_env}" if access.api_key else ""
    click.echo(f"serving {engine.name} at http://{where}/v1{ttt_note}{key_note}; Ctrl-C stops", err=True)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
