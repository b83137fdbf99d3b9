"""What `finemed serve` does with a request, away from HTTP: render the conversation with the model's own
template, decode on llama.cpp, and for TTT requests retrieve, train a LoRA and swap it in for that request.

Up to three llama.cpp contexts on the one GGUF (llama.cpp maps the file, so the weights are in memory once),
each behind its own lock: one answers plain requests, one TTT requests, and one, opened at the first request
that asks for `logprobs`, keeps the logits of every position for scoring (`/v1/completions` with `echo`). TTT
requests are serialised (one torch model trains the adapters) and plain requests never wait behind one, even
while it trains. Plain requests are decoded one at a time: llama-cpp-python's `Llama` holds one sequence, and
a second request waits for the lock (README, "Serve": measured).
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finemed_cli.config.serve import TTT_SUFFIX, ServeConfig
from finemed_cli.errors import ModelError
from finemed_cli.generate.llamacpp import LlamaCpp, Sampling, context_size
from finemed_cli.modeling.template import Message
from finemed_cli.serve.protocol import ChatRequest, RequestError, StopScanner

logger = logging.getLogger(__name__)

# emit(kind, *values): "meta" (dict), "text" (str), "done" (finish reason, tokens), "cancelled" (tokens)
Emit = Callable[..., None]


@dataclass
class Prepared:
    """A validated request, ready to decode."""

    ids: list[int]
    budget: int
    sampling: Sampling
    stops: list[str] | None
    ttt: bool
    question: str  # the last user turn: what TTT retrieves for
    seed: int
    reuse_prefix: bool = False  # keep the KV cache of a prefix shared with the request before


class ServeEngine:
    """The loaded model(s) of one server, and the work of each request."""

    def __init__(self, config: ServeConfig) -> None:
        from finemed_cli.checkpoints.embedded import caution_line, gguf_caution
        from finemed_cli.checkpoints.loading import resolve_gguf
        from finemed_cli.modeling.prompts import gguf_system_prompt

        config.validate()
        self.config = config
        if config.index is not None:  # a bad index fails before any model loads
            from finemed_cli.retrieval.index import verify_index

            verify_index(config.index)
        self.path = resolve_gguf(config.model)
        self._stack = contextlib.ExitStack()
        self.ttt: PerRequestTTT | None = None
        self.llama = self._stack.enter_context(LlamaCpp(self.path, n_ctx=context_size(self.path, config.n_ctx), threads=config.threads,
                                                        n_gpu_layers=config.n_gpu_layers))
        self.lock = threading.Lock()
        self.waiting = 0  # requests waiting for a context another request holds: /metrics' queue length
        self._count = threading.Lock()
        self._scorer: LlamaCpp | None = None
        self._scorer_lock = threading.Lock()
        self._embedder: Any = None
        self.embedding_lock = threading.Lock()  # one text batch through the embedder at a time
        self.name = config.name or self.path.stem
        self.caution = gguf_caution(self.path, self.llama.general_name)
        self.caution_line = caution_line(self.caution) if self.caution else None
        self.created = int(time.time())
        self.system = gguf_system_prompt(config.system_prompt, self.llama.trained_system_prompt, self.caution)
        try:
            if config.lora is not None:
                self._stack.enter_context(self.llama.adapter_applied(config.lora))
            self.ttt = PerRequestTTT(config, self.path, self.system) if config.index is not None else None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.ttt is not None:
            self.ttt.close()
        self._stack.close()

    @contextlib.contextmanager
    def turn(self, lock: threading.Lock) -> Iterator[None]:
        """Hold a context's `lock`, counted in `waiting` until it is ours."""
        with self._count:
            self.waiting += 1
        try:
            lock.acquire()
        finally:
            with self._count:
                self.waiting -= 1
        try:
            yield
        finally:
            lock.release()

    @contextlib.contextmanager
    def scoring(self) -> Iterator[LlamaCpp]:
        """The scoring context, held: logits kept at every position (`logits_all`) and an F32 KV cache (closer
        to torch's log-probabilities, DESIGN.md), opened at the first call. A context of its own, so the chat
        context keeps llama.cpp's last-position logits; it costs n_ctx x vocabulary float32 of memory."""
        with self.turn(self._scorer_lock):
            if self._scorer is None:
                llama = self._stack.enter_context(LlamaCpp(
                    self.path, n_ctx=self.llama.context_length, threads=self.config.threads, exact=True,
                    logits_all=True, n_gpu_layers=self.config.n_gpu_layers))
                if self.config.lora is not None:
                    self._stack.enter_context(llama.adapter_applied(self.config.lora))
                self._scorer = llama
            yield self._scorer

    def embedder(self) -> Any:
        """The index's embedder (with --index), else --embedder's (None: the embedded all-MiniLM-L6-v2),
        loaded at the first call."""
        if self.ttt is not None:
            return self.ttt.embedder
        with self.embedding_lock:
            if self._embedder is None:
                from finemed_cli.retrieval.embed import load_embedder

                self._embedder = load_embedder(self.config.embedder)
            return self._embedder

    def model_ids(self) -> list[str]:
        return [self.name] + ([self.name + TTT_SUFFIX] if self.ttt is not None else [])

    # --- a request ----------------------------------------------------------------------------------------
    def prepare(self, req: ChatRequest) -> Prepared:
        """Check a request and build its prompt; RequestError (4xx) for anything the server cannot do."""
        req.refuse_unsupported()
        ttt = self._wants_ttt(req)
        messages = self._messages(req)
        try:
            ids = self.llama.tokenize(self.llama.render(messages))
        except ModelError as e:
            raise RequestError(400, str(e), param="messages") from None
        ctx = self.llama.context_length
        asked = req.budget()
        if len(ids) >= ctx or (asked is not None and len(ids) + asked > ctx):
            raise RequestError(400, f"the prompt ({len(ids)} tokens) and max_tokens ({asked or 1}) exceed the "
                               f"context of {ctx} tokens; shorten the conversation or lower max_tokens",
                               param="messages", code="context_length_exceeded")
        budget = asked if asked is not None else min(self.config.max_tokens, ctx - len(ids))
        seed = req.seed if req.seed is not None else self.config.seed
        temperature = req.temperature if req.temperature is not None else self.config.temperature
        sampling = Sampling(temperature, req.top_p if req.top_p is not None else self.config.top_p, seed=seed)
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        if ttt and not question.strip():
            raise RequestError(400, "TTT retrieves for the last user message, and there is none", "messages")
        return Prepared(ids, budget, sampling, req.stop, ttt, question, seed, self.config.prompt_cache)

    def _wants_ttt(self, req: ChatRequest) -> bool:
        model = req.model or self.name
        if model not in (self.name, self.name + TTT_SUFFIX):
            raise RequestError(404, f"the model {model!r} does not exist; this server has "
                               f"{', '.join(self.model_ids())}", param="model", code="model_not_found")
        ttt = req.ttt if req.ttt is not None else model.endswith(TTT_SUFFIX)
        if ttt and self.ttt is None:
            raise RequestError(400, "this server has no TTT: start it with --index DIR", param="ttt")
        return ttt

    def _messages(self, req: ChatRequest) -> list[Message]:
        """The conversation as the template takes it: `developer` is OpenAI's newer name for `system`; the
        server's system prompt is put first when the request has none, as Ollama does with a Modelfile's."""
        messages: list[Message] = []
        for i, m in enumerate(req.messages):
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": m.text(f"messages.{i}.content")})
        if self.system is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system})
        return messages

    def run(self, p: Prepared, emit: Emit, cancelled: threading.Event) -> int | None:
        """Decode a prepared request (in a worker thread), emitting its pieces; the tokens decoded when
        `cancelled` stopped it, None when it ran to its end."""
        if not p.ttt:
            with self.turn(self.lock):
                return decode(self.llama, p, emit, cancelled)
        assert self.ttt is not None
        with self.ttt.adapted(p.question, p.seed, cancelled) as trained:
            if trained is None:  # cancelled while it waited for the TTT lock: not trained for a gone client
                emit("cancelled", 0)
                return 0
            adapter, info = trained
            emit("meta", info)
            with self.ttt.llama.adapter_applied(adapter):
                return decode(self.ttt.llama, p, emit, cancelled)


def decode(llama: LlamaCpp, p: Prepared, emit: Emit, cancelled: threading.Event) -> int | None:
    """Stream text pieces until an end-of-generation token, a stop string or the budget, then emit "done";
    `cancelled` is checked before the prompt and after every token (a request cancelled while it waited for
    the model never decodes), and stops it with "cancelled" instead. The tokens decoded if cancelled."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    scanner = StopScanner(p.stops)
    count, finish = 0, "length"
    if cancelled.is_set():
        emit("cancelled", count)
        return count
    # by default every request from a fresh prompt evaluation: its answer never depends on the one before
    for token in llama.stream(p.ids, p.budget, p.sampling, reuse_prefix=p.reuse_prefix):
        count += 1
        if cancelled.is_set():
            emit("cancelled", count)
            return count
        text = scanner.feed(decoder.decode(llama.llm.detokenize([token])))
        if text:
            emit("text", text)
        if scanner.stopped:
            finish = "stop"
            break
    else:
        finish = "length" if count >= p.budget else "stop"
    if not scanner.stopped:
        tail = scanner.feed(decoder.decode(b"", final=True)) + scanner.flush()
        if tail:
            emit("text", tail)
    emit("done", finish, count)
    return None


class PerRequestTTT:
    """TTT for one request at a time: the index and embedder, the torch model the adapter trains on, and a
    second llama.cpp context on the GGUF that takes the adapter."""

    def __init__(self, config: ServeConfig, gguf: Path, system: str | None) -> None:
        from finemed_cli.checkpoints.loading import load_model, resolve_model_source
        from finemed_cli.config.ttt_settings import with_ttt_settings
        from finemed_cli.export.gguf import read_config
        from finemed_cli.pipeline.plan import RunLoad, plan_run
        from finemed_cli.retrieval.index import CorpusIndex

        model = config.ttt_model or config.model
        self.ttt = with_ttt_settings(config, resolve_model_source(model)[1]).ttt
        # the GGUF serves as it is: the plan sizes the torch copy TTT trains beside it
        need = plan_run(RunLoad(model, config.device, "auto", config.quantize, "llama.cpp", "auto", gguf_file=gguf),
                        self.ttt)
        self.index = CorpusIndex(config.index)
        self.index.check_embedder(config.embedder)
        self.embedder = self.index.load_embedder()
        self.loaded = load_model(model, device=config.device, quantize=need.plan.quantize)
        self.system = system
        self.lock = threading.Lock()
        self.llama = LlamaCpp(gguf, n_ctx=context_size(gguf, config.n_ctx), threads=config.threads, n_gpu_layers=config.n_gpu_layers,
                              model_config=read_config(Path(self.loaded.source)))
        logger.info("per-request TTT: %s on %s, %s", self.loaded.name, config.index, self.ttt)

    def close(self) -> None:
        self.llama.close()

    @contextlib.contextmanager
    def adapted(self, question: str, seed: int, cancelled: threading.Event
                ) -> Iterator[tuple[Any, dict[str, Any]] | None]:
        """The request's adapter (trained on the neighbours of `question`) and its record, held with the TTT
        lock; None if the request was cancelled before its turn came."""
        from finemed_cli.retrieval.index import neighbours
        from finemed_cli.ttt.update import ttt_session

        with self.lock:
            if cancelled.is_set():
                yield None
                return
            found = neighbours(self.index, self.embedder, [question], self.ttt.k, pick=self.ttt.pick, seed=seed)[0]
            gated = self.ttt.gated([n.score for n in found])  # too far to learn from: answered without TTT
            with ttt_session(self.loaded.model, self.loaded.tokenizer, [] if gated else [n.record for n in found],
                             self.ttt, seed=seed, system=self.system) as result:
                info = {"ttt": {**result.to_json(), **({"gated": self.ttt.min_sim} if gated else {})},
                        "neighbours": [{"id": n.record.id, "score": round(n.score, 6)} for n in found]}
                yield result.adapter, info
