"""The routes of `finemed serve` that tools use beside chat: `/v1/completions` (scoring, completions.py),
`/v1/embeddings` (the index's embedder), `/tokenize`, `/detokenize` and `/tokenizer_info` (llama-server's
shapes, and vLLM's, which lm-eval's remote tokenizer reads), and `/metrics` (Prometheus text, metrics.py).
Every request body refuses a field it does not implement with a 400 naming it.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from finemed_cli.serve.completions import CompletionRequest, complete
from finemed_cli.serve.engine import ServeEngine
from finemed_cli.serve.jobs import Jobs, watch_disconnect
from finemed_cli.serve.metrics import Metrics
from finemed_cli.serve.protocol import RequestError

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class TokenizeRequest(BaseModel):
    """llama-server's `{"content": TEXT}` or vLLM's `{"prompt": TEXT}`; special tokens in the text are parsed
    (`parse_special`); the BOS the GGUF asks for is added only with `add_special` (`add_special_tokens`)."""

    model_config = ConfigDict(extra="forbid")
    content: str | None = None
    prompt: str | None = None
    model: str | None = None
    add_special: bool = False
    add_special_tokens: bool | None = None
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: list[int]
    model: str | None = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


def add_tool_routes(app: FastAPI, engine: ServeEngine, jobs: Jobs, metrics: Metrics,
                    headers: dict[str, str]) -> None:
    """Add the completions, embeddings, tokenizer and metrics routes to the server's app."""

    def held(fn: Any, *args: Any) -> Any:
        with jobs.hold():  # counted, so the model outlives it (and the server stops only once it is done)
            return fn(*args)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> JSONResponse:
        gone = threading.Event()  # set when the client goes away: the decoding stops at its next token
        watch = asyncio.create_task(watch_disconnect(request, gone.set))
        try:
            body = await run_in_threadpool(held, complete, engine, req, gone)
        finally:
            watch.cancel()
        metrics.count_tokens(body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])
        return JSONResponse(body, headers=headers)

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest) -> JSONResponse:
        return JSONResponse(await run_in_threadpool(held, embed, engine, req), headers=headers)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> JSONResponse:
        return JSONResponse(await run_in_threadpool(held, tokens_of, engine, req), headers=headers)

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> JSONResponse:
        return JSONResponse(await run_in_threadpool(held, text_of, engine, req), headers=headers)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> JSONResponse:
        llama = engine.llama
        info = {"bos_token": llama.special_tokens["bos_token"] or None,
                "eos_token": llama.special_tokens["eos_token"] or None, "pad_token": None,
                "model_max_length": llama.context_length, "chat_template": llama.template}
        return JSONResponse(info, headers=headers)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type=PROMETHEUS_TEXT)


def tokens_of(engine: ServeEngine, req: TokenizeRequest) -> dict[str, Any]:
    text = req.content if req.content is not None else req.prompt
    if text is None:
        raise RequestError(400, "content: give the text to tokenize", param="content")
    bos = req.add_special if req.add_special_tokens is None else req.add_special_tokens
    ids = engine.llama.llm.tokenize(text.encode("utf-8"), add_bos=bos, special=req.parse_special)
    if not req.with_pieces:
        return {"tokens": ids}
    pieces = [engine.llama.llm.detokenize([t], special=True).decode("utf-8", errors="replace") for t in ids]
    return {"tokens": [{"id": t, "piece": p} for t, p in zip(ids, pieces, strict=True)]}


def text_of(engine: ServeEngine, req: DetokenizeRequest) -> dict[str, str]:
    """The tokens' text, special tokens written out: under llama-server's key and vLLM's."""
    vocab = engine.llama.llm.n_vocab()
    bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise RequestError(400, f"tokens: token id {bad} is outside the vocabulary (0..{vocab - 1})", "tokens")
    text = engine.llama.llm.detokenize(req.tokens, special=True).decode("utf-8", errors="replace")
    return {"content": text, "prompt": text}


def embed(engine: ServeEngine, req: EmbeddingRequest) -> dict[str, Any]:
    """OpenAI's embeddings response from the server's embedder (float32 vectors; base64: their bytes,
    little-endian, as the openai client asks for by default)."""
    embedder = engine.embedder()
    if req.dimensions is not None and req.dimensions != embedder.dimension:
        raise RequestError(400, f"dimensions: {embedder.name} gives vectors of {embedder.dimension}; finemed serve "
                           f"does not shorten them (dimensions={req.dimensions})", param="dimensions")
    if req.model not in (None, embedder.name, embedder.name.rsplit("/", 1)[-1]):
        raise RequestError(404, f"the embedding model {req.model!r} does not exist; this server has "
                           f"{embedder.name}", param="model", code="model_not_found")
    texts = [req.input] if isinstance(req.input, str) else req.input
    if not texts:
        raise RequestError(400, "input: give at least one text", param="input")
    with engine.turn(engine.embedding_lock):
        vectors = embedder.encode(texts)
        tokens = embedder.count_tokens(texts) if hasattr(embedder, "count_tokens") else 0
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
             else [float(x) for x in v]} for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": embedder.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
