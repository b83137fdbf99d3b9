"""`/metrics` of `finemed serve`: Prometheus' text exposition format (version 0.0.4), written by hand (a few
counters need no client library). Requests by route and status are counted by an ASGI middleware that only
watches the response's first message, so streaming and the disconnect watch pass through untouched (Starlette's
`BaseHTTPMiddleware` wraps `receive`, which the disconnect watch reads).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

ROUTES = ("/health", "/metrics", "/tokenize", "/detokenize", "/tokenizer_info", "/v1/models",
          "/v1/chat/completions", "/v1/completions", "/v1/embeddings")


class Metrics:
    """The server's counters, safe to bump from worker threads; `gauges` reads the live values (in flight,
    waiting for the model) when the page is rendered."""

    def __init__(self, gauges: Callable[[], dict[str, int]] | None = None) -> None:
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.tokens: Counter[str] = Counter()  # "prompt", "completion"
        self.ttt_seconds = 0.0
        self.ttt_requests = 0
        self.gauges = gauges or dict

    def request(self, route: str, status: int) -> None:
        with self.lock:
            self.requests[(route if route in ROUTES else "other", status)] += 1

    def count_tokens(self, prompt: int, completion: int) -> None:
        with self.lock:
            self.tokens["prompt"] += prompt
            self.tokens["completion"] += completion

    def ttt(self, info: dict[str, Any]) -> None:
        """A TTT request's record (the "finemed" object of its response)."""
        seconds = info.get("ttt", {}).get("seconds")
        if seconds is not None:
            with self.lock:
                self.ttt_seconds += float(seconds)
                self.ttt_requests += 1

    def render(self) -> str:
        with self.lock:
            lines = ["# HELP finemed_requests_total HTTP requests answered, by route and status.",
                     "# TYPE finemed_requests_total counter"]
            lines += [f'finemed_requests_total{{route="{r}",status="{s}"}} {n}'
                      for (r, s), n in sorted(self.requests.items())]
            lines += ["# HELP finemed_tokens_total Tokens of prompts evaluated and of completions decoded.",
                      "# TYPE finemed_tokens_total counter"]
            lines += [f'finemed_tokens_total{{kind="{k}"}} {self.tokens[k]}' for k in ("prompt", "completion")]
            lines += ["# HELP finemed_ttt_seconds_total Seconds spent training per-request TTT adapters.",
                      "# TYPE finemed_ttt_seconds_total counter", f"finemed_ttt_seconds_total {self.ttt_seconds:.6f}",
                      "# HELP finemed_ttt_requests_total Requests answered after TTT.",
                      "# TYPE finemed_ttt_requests_total counter", f"finemed_ttt_requests_total {self.ttt_requests}"]
        for name, value in self.gauges().items():
            lines += [f"# HELP finemed_{name} {GAUGE_HELP.get(name, name)}", f"# TYPE finemed_{name} gauge",
                      f"finemed_{name} {value}"]
        return "\n".join(lines) + "\n"


GAUGE_HELP = {"requests_in_flight": "Requests using the model now (decoding, scoring, tokenizing or waiting for it).",
              "requests_waiting": "Requests waiting for a llama.cpp context another request holds (the queue)."}


class CountRequests:
    """ASGI middleware: counts each HTTP request by its route and the status it was answered with (a client
    that left before any answer counts as 499)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 499

        async def watch(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.metrics.request(scope.get("path", ""), status)
