"""A synth model role on an OpenAI-compatible server: `POST /v1/chat/completions`, with a bounded number of
requests in flight, retries with exponential backoff on 429, 5xx, timeouts and lost connections (the server's
Retry-After honoured), and a response cache on disk keyed by the whole request, so a rerun sends nothing.

Schema-constrained replies are asked for with OpenAI's `response_format: {"type": "json_schema", …}` (vLLM,
SGLang, llama-server, Ollama); a server that refuses it is asked once in the older `{"type": "json_object",
"schema": …}` form (llama-cpp-python's server), and one that refuses both stops the stage with a one-line
error. Replies are still parsed and checked by `ask_json`, retried or rejected as the local path's are.

The server's tokenizer is not at hand, so `count` and `clip` estimate 3 characters a token (English runs 4 and
more), to cut source texts to the context; a prompt the server still finds too long is that record's reject.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from finemed_cli.config.endpoint import EndpointConfig
from finemed_cli.errors import ModelError
from finemed_cli.synth.llm import ContextOverflow

logger = logging.getLogger(__name__)

CACHE_NAME = "endpoint-cache.jsonl"
CHARS_PER_TOKEN = 3
MAX_WAIT = 300.0  # a Retry-After longer than this is cut to it
# The local path's sampler (LlamaCppModel): top-p 0.95, top-k 40, min-p 0.05; greedy on a first try.
SAMPLING = {"top_p": 0.95, "top_k": 40, "min_p": 0.05}


class ResponseCache:
    """Replies by request digest, in a JSONL file appended one line per reply. Only each reply's offset is held
    in memory (a paper-scale run caches gigabytes of text); a line that no longer holds its key (a torn last line,
    another process appending at the same time) is a miss, and that request is sent again."""

    def __init__(self, path: Path) -> None:
        self.path, self.hits, self._lock = path, 0, threading.Lock()
        self._offsets: dict[str, int] = {}
        self._out: Any = None
        if path.is_file():
            offset = 0
            for raw in path.read_bytes().splitlines(keepends=True):
                if raw.startswith(b'{"id":"'):
                    self._offsets[raw[7:71].decode("ascii", "replace")] = offset
                offset += len(raw)

    @staticmethod
    def key(request: dict[str, Any]) -> str:
        return hashlib.sha256(orjson.dumps(request, option=orjson.OPT_SORT_KEYS)).hexdigest()

    def get(self, key: str) -> str | None:
        with self._lock:
            if (offset := self._offsets.get(key)) is None:
                return None
            with self.path.open("rb") as f:
                f.seek(offset)
                line = f.readline()
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                return None
            if not isinstance(entry, dict) or entry.get("id") != key or not isinstance(entry.get("reply"), str):
                return None
            self.hits += 1
            return entry["reply"]

    def put(self, key: str, reply: str) -> None:
        from finemed_cli.data.jsonl import JsonlAppender

        with self._lock:
            if self._out is None:
                self._out = JsonlAppender(self.path, fsync=False)
            self._out.append({"id": key, "reply": reply})  # its first write may cut a torn tail: offset after
            self._offsets[key] = self.path.stat().st_size - len(orjson.dumps({"id": key, "reply": reply})) - 1

    def close(self) -> None:
        if self._out is not None:
            self._out.close()


class EndpointClient:
    """The HTTP side of one EndpointConfig: requests, retries, the cache, and what the server was found to
    support. Thread-safe: the stage runs up to `concurrency` records at once."""

    def __init__(self, cfg: EndpointConfig, cache: ResponseCache) -> None:
        import httpx

        key = cfg.api_key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.cfg, self.cache, self.requests = cfg, cache, 0
        self._http = httpx.Client(base_url=cfg.url.rstrip("/"), headers=headers, timeout=cfg.timeout,
                                  limits=httpx.Limits(max_connections=cfg.concurrency))
        self._slots = threading.BoundedSemaphore(cfg.concurrency)
        self._lock, self._counted = threading.Lock(), threading.Lock()
        self._checked = False
        self._format = "json_schema"

    def chat(self, request: dict[str, Any]) -> str:
        """The reply to `request` (a chat completion body; `schema`: the JSON schema it must follow), from the
        cache when it was asked before."""
        key = ResponseCache.key({"model": self.cfg.model, **request})
        if (cached := self.cache.get(key)) is not None:
            return cached
        self._check()
        reply = self._complete(request)
        self.cache.put(key, reply)
        return reply

    def _check(self) -> None:
        """Once, before the first request: the server answers and lists the model."""
        with self._lock:
            if self._checked:
                return
            r = self._send("GET", "/models", None, retry=False)
            try:
                served = [m.get("id") for m in r.json()["data"] if isinstance(m, dict)]
            except (ValueError, KeyError, TypeError):
                raise ModelError(f"{self.cfg.url}/models: not an OpenAI-compatible model list: {r.text[:120]!r}; "
                                 "give the base URL that ends in /v1") from None
            if self.cfg.model not in served:
                raise ModelError(f"{self.cfg.url}: the server does not serve model {self.cfg.model!r}; it lists "
                                 f"{', '.join(map(str, served)) or 'none'} (set model: to one of them)")
            self._checked = True

    def _complete(self, request: dict[str, Any]) -> str:
        body = {"model": self.cfg.model, **{k: v for k, v in request.items() if k != "schema"}}
        if "schema" not in request:
            return self._content(self._send("POST", "/chat/completions", body))
        tried: list[str] = []
        for form in dict.fromkeys([self._format, "json_schema", "json_object"]):
            body["response_format"] = _response_format(form, request["schema"])
            r = self._send("POST", "/chat/completions", body, refusals=True)
            if r.status_code < 400:
                self._format = form
                return self._content(r)
            tried.append(f"{form}: HTTP {r.status_code} {_message(r)[:160]}")
        raise ModelError(f"{self.cfg.url}: the server does not accept a JSON schema for replies (response_format "
                         f"{'; '.join(tried)}); use one that does (vLLM, SGLang, llama-server, Ollama >= 0.5)")

    def _content(self, r: Any) -> str:
        try:
            return r.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise ModelError(f"{self.cfg.url}: not an OpenAI chat completion: {r.text[:200]!r}") from None

    def _send(self, method: str, path: str, body: dict[str, Any] | None, *, retry: bool = True,
              refusals: bool = False) -> Any:
        """The response; 429, 5xx, timeouts and (when `retry`) lost connections are retried, 401/403 and
        (unless `refusals`) other 4xx stop the stage, a prompt the server finds too long rejects the record."""
        import httpx

        url = f"{self.cfg.url.rstrip('/')}{path}"
        tries = self.cfg.max_retries + 1
        for attempt in range(tries):
            wait = self.cfg.backoff * 2 ** attempt
            try:
                with self._slots:
                    with self._counted:
                        self.requests += 1
                    r = self._http.request(method, path, json=body)
            except httpx.TimeoutException:
                problem = f"no reply within {self.cfg.timeout:g} s (timeout: in the config)"
            except httpx.TransportError as e:
                problem = f"cannot reach the server ({_reason(e)}); is it running at this URL?"
                if not retry:  # nothing there at the start: a wrong URL, not a server that went away
                    raise ModelError(f"{url}: {problem}") from None
            else:
                if refusals and r.status_code >= 400 and "response_format" in _message(r):
                    return r  # llama-cpp-python's server refuses an unknown format with a 500
                if r.status_code in (401, 403):
                    raise ModelError(f"{url}: HTTP {r.status_code} {_message(r)[:120]}: "
                                     + (f"the key in ${self.cfg.api_key_env} is refused" if self.cfg.api_key_env
                                        else "the server wants an API key: name its variable in api_key_env"))
                if r.status_code == 429 or r.status_code >= 500:
                    problem = f"HTTP {r.status_code} {_message(r)[:120]}"
                    wait = _retry_after(r.headers.get("retry-after"), wait)
                elif r.status_code >= 400:
                    if _too_long(r):
                        raise ContextOverflow(f"{self.cfg.model} at {self.cfg.url}: {_message(r)[:200]}")
                    if refusals:
                        return r
                    raise ModelError(f"{url}: HTTP {r.status_code} {_message(r)[:200]}")
                else:
                    return r
            if attempt + 1 < tries:
                logger.info("%s: %s; retry %d of %d in %.1f s", url, problem, attempt + 1, tries - 1, wait)
                time.sleep(wait)
        raise ModelError(f"{url}: {problem}" + (f" ({tries} tries)" if tries > 1 else ""))

    def close(self) -> None:
        logger.info("%s at %s: requests sent %d, replies from the cache %d (%s)", self.cfg.model, self.cfg.url,
                    self.requests, self.cache.hits, self.cache.path)
        self._http.close()
        self.cache.close()


def _response_format(form: str, schema: dict[str, Any]) -> dict[str, Any]:
    if form == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}
    return {"type": "json_object", "schema": schema}


def _retry_after(value: str | None, default: float) -> float:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), else `default`."""
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return default
    return min(max(seconds, 0.0), MAX_WAIT)


def _message(r: Any) -> str:
    """The error message of a response: OpenAI's {"error": {"message"}}, FastAPI's {"detail"}, or the text."""
    try:
        body = r.json()
    except ValueError:
        return " ".join(r.text.split())
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body))
        if isinstance(err, dict):
            err = err.get("message", err)
        return " ".join(str(err).split())
    return " ".join(str(body).split())


def _too_long(r: Any) -> bool:
    text = _message(r).lower()
    return r.status_code == 400 and any(w in text for w in ("context length", "context window", "too long",
                                                             "maximum context", "exceed"))


def _reason(e: Exception) -> str:
    text = " ".join((str(e) or type(e).__name__).split())
    return text.split("] ")[-1] if "Errno" in text else text


class EndpointModel:
    """A TextModel (synth/llm.py) on an endpoint, with the context a stage asks for (capped by the config's)."""

    def __init__(self, client: EndpointClient, context_length: int) -> None:
        self.client, self.name = client, client.cfg.model
        self.context_length = min(context_length, client.cfg.context_length or context_length)

    def count(self, messages: list[dict[str, str]]) -> int:
        return sum(len(m["content"]) + 8 for m in messages) // CHARS_PER_TOKEN + 1

    def clip(self, text: str, tokens: int) -> str:
        return text[: tokens * CHARS_PER_TOKEN]

    def complete(self, messages: list[dict[str, str]], schema: dict[str, Any], *, seed: int,
                 max_tokens: int) -> str:
        # Greedy on the first try; later tries sample a little, as LlamaCppModel does.
        return self.client.chat({"messages": messages, "schema": schema, "max_tokens": max_tokens, "seed": seed,
                                 "temperature": 0.0 if seed == 0 else 0.7, **SAMPLING})

    def generate(self, messages: list[dict[str, str]], *, seed: int, max_tokens: int,
                 temperature: float = 0.0, prefix: str = "", stop: list[str] | None = None) -> str:
        """Free text; `prefix` is sent as the start of the assistant's reply (vLLM and SGLang continue it with
        `continue_final_message`, llama-server continues a final assistant turn; a server that does neither
        starts a new reply, and the o1 headings are still written by finemed around it)."""
        request: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens, "seed": seed,
                                   "temperature": temperature, **SAMPLING}
        if prefix:
            request["messages"] = [*messages, {"role": "assistant", "content": prefix}]
            request |= {"continue_final_message": True, "add_generation_prompt": False}
        if stop:
            request["stop"] = stop
        return self.client.chat(request)

    def close(self) -> None:
        """The client is closed by its owner (Models), which shares it between roles."""
