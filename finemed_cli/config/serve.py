"""Configuration of `finemed serve`: the model, the HTTP address, default decoding and per-request TTT."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from finemed_cli.config.answer import DEFAULT_CONTEXT, GPU_LAYERS_HELP, TTT_SETTINGS_HELP, TTTConfig
from finemed_cli.errors import ConfigError

TTT_SUFFIX = "+ttt"  # `/v1/models` lists NAME and NAME+ttt: front ends that send no extra fields can pick TTT
SEED_MAX = 2**63 - 1  # the seeds `answer` and `eval` take; numpy and torch take them all
API_KEY_ENV = "FINEMED_API_KEY"


@dataclass
class ServeConfig:
    """One `finemed serve` process."""

    model: str  # a .gguf file, hub GGUF (org/name:Q4_K_M) or embedded:<key>
    host: str = field(default="127.0.0.1", metadata={
        "help": "address to listen on; on a loopback address only requests naming localhost, 127.0.0.1 or [::1] "
                "in their Host header are answered; 0.0.0.0 opens the server to the network (set an API key)"})
    allowed_hosts: tuple[str, ...] = field(default=(), metadata={
        "help": "another name the Host header may give (repeatable), e.g. a reverse proxy's; on a network "
                "address, giving any makes Host checked there too"})
    api_key_env: str = field(default=API_KEY_ENV, metadata={
        "help": "environment variable holding the API key: when it is set, every /v1 request needs "
                "'Authorization: Bearer KEY' (401 otherwise)"})
    shutdown_grace: float = field(default=5.0, metadata={
        "help": "seconds requests in flight get to finish after Ctrl-C or SIGTERM; then each is cancelled at its "
                "next token (a TTT request still training finishes its training first) and answered with a 503"})
    port: int = field(default=8080, metadata={"help": "TCP port; 0 picks a free one (printed at start)"})
    name: str | None = field(default=None, metadata={
        "help": "model id clients ask for [default: the GGUF's file name without .gguf]"})
    system_prompt: str | None = field(default=None, metadata={
        "help": "system prompt of requests that send none: TEXT, @FILE, none, model or finemed [default: the one a "
                "finemed-trained model carries in its GGUF; finemed's o1-style prompt for the embedded models; "
                "else the model's own (model)]"})
    lora: Path | None = field(default=None, metadata={
        "help": "a llama.cpp LoRA GGUF applied to every request (finemed export-lora makes one)"})
    n_ctx: int | None = field(default=None, metadata={
        "help": "context length in tokens (prompt + response), at most the model's trained context [default: 4096, "
                "or the trained context when shorter]"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads per request [default: all cores]"})
    n_gpu_layers: int | None = field(default=None, metadata={"help": GPU_LAYERS_HELP})
    prompt_cache: bool = field(default=False, metadata={
        "help": "reuse the KV cache of the prompt prefix a request shares with the one before, as llama.cpp's "
                "servers do: a faster first token on long shared prompts, but an answer may then depend on the "
                "request before it (rounding; greedy text can change) [default: each prompt evaluated afresh]"})
    max_tokens: int = field(default=512, metadata={
        "help": "response token budget when a request gives none (cut to what the context leaves)"})
    temperature: float = field(default=0.0, metadata={"help": "temperature when a request gives none; 0: greedy"})
    top_p: float = field(default=0.95, metadata={"help": "top-p when a request gives none"})
    seed: int = field(default=0, metadata={"help": "seed of TTT and sampling when a request gives none"})
    index: Path | None = field(default=None, metadata={
        "help": "index directory from `finemed index build`: turns on per-request TTT (model NAME+ttt, or "
                "\"ttt\": true in the request)"})
    ttt_model: str | None = field(default=None, metadata={
        "help": "the model TTT trains, as an HF directory or hub id, matching the GGUF [default: the GGUF itself, "
                "dequantised once]"})
    embedder: str | None = field(default=None, metadata={
        "help": "embedder of /v1/embeddings (and of TTT's retrieval: must match the index) [default: the index's, "
                "else the embedded all-MiniLM-L6-v2]"})
    ttt: TTTConfig = field(default_factory=TTTConfig)
    ttt_settings: str | None = field(default="auto", metadata={"help": TTT_SETTINGS_HELP})
    ttt_explicit: tuple[str, ...] = ()  # TTT fields given on the command line (a settings file leaves them)
    device: str = field(default="auto", metadata={"help": "where TTT runs: auto, cpu, cuda, cuda:N"})
    quantize: str = field(default="auto", metadata={
        "help": "weights of the model TTT trains: none (full precision), nf4 (a 4-bit frozen base), auto (full "
                "precision where the memory plan fits beside the GGUF, else nf4)"})

    def validate(self) -> None:
        """Raise ConfigError listing every problem at once."""
        errors = self.ttt.validate() if self.index is not None else []
        if self.quantize not in ("auto", "none", "nf4"):
            errors.append(f"quantize {self.quantize!r} is not one of auto, none, nf4")
        if not 0 <= self.seed <= SEED_MAX:
            errors.append(f"seed must be from 0 to 2**63 - 1, got {self.seed}")
        if not 0 <= self.shutdown_grace <= 3600:
            errors.append(f"shutdown grace must be from 0 to 3600 seconds, got {self.shutdown_grace}")
        if not self.api_key_env.strip():
            errors.append("the API key's environment variable needs a name")
        if not 0 <= self.port <= 65535:
            errors.append(f"port must be from 0 to 65535, got {self.port}")
        if self.n_ctx is not None and self.n_ctx < 16:
            errors.append(f"context must be at least 16 tokens, got {self.n_ctx}")
        ctx = self.n_ctx or DEFAULT_CONTEXT  # a shorter trained context is checked when the GGUF opens
        if not 1 <= self.max_tokens < ctx:
            errors.append(f"max tokens must be from 1 to the context ({ctx}) minus the prompt, got "
                          f"{self.max_tokens}")
        if self.temperature < 0:
            errors.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            errors.append(f"top-p must be in (0, 1], got {self.top_p}")
        if self.index is not None and self.ttt.mode != "lora":
            errors.append("the server swaps a LoRA adapter into the loaded GGUF per request: use --ttt-mode lora "
                          "(the paper's mode changes every weight)")
        if self.index is not None and self.lora is not None:
            errors.append("--lora with --index: TTT trains an adapter on the base model, which would not match a "
                          "base with another LoRA; merge that LoRA into the model first (finemed export)")
        if self.index is None and self.ttt_model is not None:
            errors.append("--ttt-model is the model TTT trains: it needs --index DIR")
        if errors:
            raise ConfigError("; ".join(errors))
