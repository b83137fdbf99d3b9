"""The HTTP side of `finemed serve`: a FastAPI app speaking OpenAI's chat-completions API (streamed as
server-sent events or whole), run by uvicorn. Generation runs in a worker thread per request and hands its
pieces to the event loop through a queue, so a slow request never blocks the loop and a client that goes
away stops its generation at the next token.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from finemed_cli.errors import ConfigError
from finemed_cli.serve.engine import Prepared, ServeEngine
from finemed_cli.serve.protocol import (
    ChatRequest,
    Completion,
    RequestError,
    error_body,
    usage,
    validation_message,
)

logger = logging.getLogger(__name__)
CAUTION_HEADER = "X-Finemed-Caution"


class Job:
    """One request's generation in its worker thread, seen from the event loop as a stream of events."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[str, tuple[Any, ...]]] = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, kind: str, *values: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, values))
        except RuntimeError:  # the loop closed (server stopping): nobody is listening
            self.cancelled.set()

    def start(self, run: Callable[..., None], prepared: Prepared) -> None:
        def work() -> None:
            try:
                run(prepared, self.emit, self.cancelled)
            except RequestError as e:
                self.emit("error", e)
            except Exception as e:  # a bug, or llama.cpp failing: logged with its trace, answered in JSON
                logger.exception("generation failed")
                self.emit("error", RequestError(500, f"generation failed: {type(e).__name__}: {e}"))
            finally:
                self.emit("end")

        threading.Thread(target=work, name="finemed-request", daemon=True).start()

    async def events(self) -> AsyncIterator[tuple[str, tuple[Any, ...]]]:
        while True:
            kind, values = await self.queue.get()
            if kind == "end":
                return
            yield kind, values


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def _stream(job: Job, completion: Completion, prompt_tokens: int, include_usage: bool) -> AsyncIterator[bytes]:
    extra: dict[str, Any] = {}
    try:
        yield _sse(completion.chunk({"role": "assistant", "content": ""}))
        async for kind, values in job.events():
            if kind == "meta":
                extra.update(values[0])
            elif kind == "text":
                yield _sse(completion.chunk({"content": values[0]}))
            elif kind == "done":
                yield _sse(completion.chunk({}, values[0], extra))
                if include_usage:
                    yield _sse(completion.usage_chunk(usage(prompt_tokens, values[1])))
            elif kind == "error":  # headers are gone: the error travels as an event, as OpenAI's does
                yield _sse(values[0].body())
        yield b"data: [DONE]\n\n"
    finally:  # also when the client disconnects: the worker stops at its next token
        job.cancelled.set()


async def _whole(job: Job, completion: Completion, prompt_tokens: int) -> dict[str, Any]:
    pieces, extra, finish, count = [], {}, "stop", 0
    try:
        async for kind, values in job.events():
            if kind == "meta":
                extra.update(values[0])
            elif kind == "text":
                pieces.append(values[0])
            elif kind == "done":
                finish, count = values
            elif kind == "error":
                raise values[0]
    finally:
        job.cancelled.set()
    return completion.full("".join(pieces), finish, usage(prompt_tokens, count), extra)


def create_app(engine: ServeEngine) -> FastAPI:
    """The server's routes and error handlers over a loaded engine."""
    app = FastAPI(title="finemed serve", version="1", docs_url=None, redoc_url=None)
    headers = {CAUTION_HEADER: engine.caution_line} if engine.caution_line else {}

    @app.exception_handler(RequestError)
    async def request_error(_: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(e.errors()))
        return JSONResponse(error_body(message, 400, param), status_code=400, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(error_body(message, e.status_code), status_code=e.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def crash(_: Request, e: Exception) -> JSONResponse:
        logger.exception("request failed")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", 500), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        data = [{"id": m, "object": "model", "created": engine.created, "owned_by": "finemed"}
                for m in engine.model_ids()]
        return JSONResponse({"object": "list", "data": data}, headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest) -> Response:
        prepared = await run_in_threadpool(engine.prepare, req)
        completion = Completion(req.model or engine.name)
        job = Job(asyncio.get_running_loop())
        job.start(engine.run, prepared)
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(job, completion, len(prepared.ids), include),
                                     media_type="text/event-stream", headers=headers)
        return JSONResponse(await _whole(job, completion, len(prepared.ids)), headers=headers)

    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (0: a free port), or a ConfigError saying what to change."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port (0 takes a "
                          "free one) or --host") from None


def serve_forever(engine: ServeEngine, sock: socket.socket, log_level: str = "info") -> None:
    """Run the app on `sock` until Ctrl-C or SIGTERM, then return: uvicorn finishes the requests in flight
    (5 s at most), then raises the signal again once its own handlers are gone; ours turns SIGTERM into the
    same KeyboardInterrupt as Ctrl-C, so the caller's clean-up runs either way."""
    import signal

    import uvicorn

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    config = uvicorn.Config(create_app(engine), log_level=log_level, timeout_graceful_shutdown=5)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
