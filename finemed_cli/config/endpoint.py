"""A synth model role served by an OpenAI-compatible server (vLLM, SGLang, llama-server, Ollama, `finemed
serve`) instead of a local GGUF: `judge: {url: http://host:8000/v1, model: NAME}` in a synth config. The API
key is read from the environment variable the config names, never from the config or a flag."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EndpointConfig:
    """One server and model; roles with equal settings share one client, its request limit and its cache."""

    url: str = field(default="", metadata={
        "help": "the server's OpenAI-compatible base URL, e.g. http://gpu-node:8000/v1 (vLLM, SGLang), "
                "http://localhost:8080/v1 (llama-server), http://localhost:11434/v1 (Ollama)"})
    model: str = field(default="", metadata={"help": "the model name as the server lists it at GET /v1/models"})
    api_key_env: str | None = field(default=None, metadata={
        "help": "the environment variable holding the API key (sent as a Bearer token), e.g. OPENAI_API_KEY; "
                "the key itself is never written in a config [default: no key]"})
    concurrency: int = field(default=4, metadata={
        "help": "records in flight at once, so at most this many requests to this server; outputs stay in "
                "input order"})
    timeout: float = field(default=600.0, metadata={"help": "seconds one request may take before it is retried"})
    max_retries: int = field(default=5, metadata={
        "help": "retries of a request after a 429, a 5xx, a timeout or a lost connection, waiting `backoff` "
                "seconds doubled each time (or the server's Retry-After); then the stage stops, resumable"})
    backoff: float = field(default=1.0, metadata={"help": "seconds before the first retry"})
    context_length: int | None = field(default=None, metadata={
        "help": "the server's context in tokens, when smaller than what a stage asks of a local GGUF (4,096 for "
                "judging; the answer budget + 4,096 for respond and pairs): source texts are cut to fit it"})

    def problems(self, role: str) -> list[str]:
        """Every problem with these settings, each named `role.key`."""
        checks = [
            (self.url.startswith(("http://", "https://")),
             f"{role}.url: an http:// or https:// base URL such as http://localhost:8000/v1, got {self.url!r}"),
            (bool(self.model.strip()), f"{role}.model: required, the model name the server lists at /v1/models"),
            (1 <= self.concurrency <= 256, f"{role}.concurrency: 1 to 256, got {self.concurrency}"),
            (self.timeout > 0, f"{role}.timeout: seconds above 0, got {self.timeout}"),
            (0 <= self.max_retries <= 20, f"{role}.max_retries: 0 to 20, got {self.max_retries}"),
            (self.backoff >= 0, f"{role}.backoff: seconds, at least 0, got {self.backoff}"),
            (self.context_length is None or self.context_length >= 64,
             f"{role}.context_length: at least 64 tokens, got {self.context_length}"),
            (self.api_key_env is None or bool(os.environ.get(self.api_key_env)),
             f"{role}.api_key_env: the environment variable {self.api_key_env} is not set; export it with the "
             "server's API key (or remove api_key_env for a server without one)"),
        ]
        return [message for ok, message in checks if not ok]

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


ROLES = ("judge", "reasoner", "reward_model", "base")


def endpoint_problems(cfg: object) -> list[str]:
    """The problems of every role of a SynthConfig that is an endpoint (or a bare URL, which names no model)."""
    out = []
    for role in ROLES:
        value = getattr(cfg, role)
        if isinstance(value, EndpointConfig):
            out += value.problems(role)
        elif isinstance(value, str) and value.startswith(("http://", "https://")):
            out.append(f"{role}: a server is given as a mapping, {{url: {value}, model: NAME}}, not a bare URL")
    return out


def role_concurrency(*roles: object) -> int:
    """Records a stage may have in flight: the smallest `concurrency` of its roles, 1 with any local GGUF
    (llama.cpp decodes one sequence at a time here) or with no model at all."""
    return min((r.concurrency if isinstance(r, EndpointConfig) else 1 for r in roles), default=1)
