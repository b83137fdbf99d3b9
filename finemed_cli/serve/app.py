"""The HTTP side of `finemed serve`: a FastAPI app speaking OpenAI's chat-completions API (streamed as
server-sent events or whole), and the routes tools use beside it (tools.py), run by uvicorn. Generation runs in a worker thread per request (jobs.py), so a
slow request never blocks the loop; a client that goes away, streaming or not, stops its generation at the
next token; stopping the server gives requests in flight a grace period, cancels the rest at their next token
and frees nothing until every worker has stopped. guard.py checks Host and the API key first.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from finemed_cli.errors import ConfigError
from finemed_cli.serve.engine import Prepared, ServeEngine
from finemed_cli.serve.guard import Access, Guard
from finemed_cli.serve.jobs import DISCONNECTED, SHUTTING_DOWN, Job, Jobs, watch_disconnect
from finemed_cli.serve.metrics import CountRequests, Metrics
from finemed_cli.serve.protocol import (
    ChatRequest,
    Completion,
    RequestError,
    error_body,
    usage,
    validation_message,
)
from finemed_cli.serve.tools import add_tool_routes

logger = logging.getLogger(__name__)
CAUTION_HEADER = "X-Finemed-Caution"
UVICORN_BACKSTOP_S = 30.0  # past the grace, before uvicorn cancels request tasks itself (a TTT request training)


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def _stream(job: Job, completion: Completion, prompt_tokens: int, include_usage: bool,
                  metrics: Metrics) -> AsyncIterator[bytes]:
    extra: dict[str, Any] = {}
    try:
        yield _sse(completion.chunk({"role": "assistant", "content": ""}))
        async for kind, values in job.events():
            if kind == "meta":
                extra.update(values[0])
                metrics.ttt(values[0])
            elif kind == "text":
                yield _sse(completion.chunk({"content": values[0]}))
            elif kind == "done":
                metrics.count_tokens(prompt_tokens, values[1])
                yield _sse(completion.chunk({}, values[0], extra))
                if include_usage:
                    yield _sse(completion.usage_chunk(usage(prompt_tokens, values[1])))
            elif kind == "error":  # headers are gone: the error travels as an event, as OpenAI's does
                yield _sse(values[0].body())
            elif kind == "cancelled":  # the server is stopping (a gone client reads nothing)
                yield _sse(job.cancelled_error(values[0]).body())
        yield b"data: [DONE]\n\n"
    finally:  # Starlette cancels the stream when the client disconnects: the worker stops at its next token
        job.cancel(DISCONNECTED)


async def _whole(request: Request, job: Job, completion: Completion, prompt_tokens: int,
                 metrics: Metrics) -> dict[str, Any]:
    pieces, extra, finish, count = [], {}, "stop", 0
    watch = asyncio.create_task(watch_disconnect(request, lambda: job.cancel(DISCONNECTED)))
    try:
        async for kind, values in job.events():
            if kind == "meta":
                extra.update(values[0])
                metrics.ttt(values[0])
            elif kind == "text":
                pieces.append(values[0])
            elif kind == "done":
                finish, count = values
                metrics.count_tokens(prompt_tokens, count)
            elif kind == "error":
                raise values[0]
            elif kind == "cancelled":
                raise job.cancelled_error(values[0])
    finally:  # before the response goes out: once it has, receive() answers http.disconnect too
        watch.cancel()
        job.cancel(SHUTTING_DOWN)  # only uvicorn cancelling this task (its shutdown limit) leaves the job running
    return completion.full("".join(pieces), finish, usage(prompt_tokens, count), extra)


def create_app(engine: ServeEngine, access: Access | None = None) -> FastAPI:
    """The server's routes and error handlers over a loaded engine; with `access`, requests whose Host or API
    key it refuses get a 403 or 401 before any route (None: no check, for in-process clients). The running
    requests are `app.state.jobs`, its counters `app.state.metrics`."""
    app = FastAPI(title="finemed serve", version="1", docs_url=None, redoc_url=None)
    if access is not None:
        app.add_middleware(Guard, access=access)
    app.state.jobs = jobs = Jobs()
    app.state.metrics = metrics = Metrics(lambda: {"requests_in_flight": jobs.busy, "requests_waiting": engine.waiting})
    app.add_middleware(CountRequests, metrics=metrics)  # outermost: refusals by the guard are counted too
    headers = {CAUTION_HEADER: engine.caution_line} if engine.caution_line else {}
    add_tool_routes(app, engine, jobs, metrics, headers)

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
    async def chat_completions(req: ChatRequest, request: Request) -> Response:
        prepared = await run_in_threadpool(prepare, req)
        completion = Completion(req.model or engine.name)
        job = Job(asyncio.get_running_loop(), completion.id)
        jobs.start(job, engine.run, prepared)
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(job, completion, len(prepared.ids), include, metrics),
                                     media_type="text/event-stream", headers=headers)
        return JSONResponse(await _whole(request, job, completion, len(prepared.ids), metrics), headers=headers)

    def prepare(req: ChatRequest) -> Prepared:
        with jobs.hold():  # it tokenizes with the model: counted, so the model outlives it
            return engine.prepare(req)

    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (0: a free port), or a ConfigError saying what to change."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port (0 takes a "
                          "free one) or --host") from None


class GracefulServer(uvicorn.Server):
    """uvicorn's server with finemed's shutdown: on Ctrl-C or SIGTERM it refuses new requests (503), gives
    those in flight `grace` seconds to finish, then cancels them at their next token (each answered with a
    503), before uvicorn's own wait for the connections to close. A second signal cancels them at once
    (uvicorn's force-quit would drop their connections unanswered); a third is uvicorn's force-quit."""

    def __init__(self, config: uvicorn.Config, jobs: Jobs, grace: float) -> None:
        super().__init__(config)
        self.jobs, self.grace, self.hurried = jobs, grace, False

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.should_exit and not self.hurried:
            self.hurried = True
            self.cancel("at once")
            return
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.jobs.stop()
        if self.jobs.running:
            logger.info("stopping: %d request(s) in flight get %g s to finish (Ctrl-C again: cancel them now)",
                        len(self.jobs.running), self.grace)
        timer = asyncio.get_running_loop().call_later(self.grace, self.cancel, f"after {self.grace:g} s")
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    def cancel(self, when: str) -> None:
        if n := self.jobs.cancel_all(SHUTTING_DOWN):
            logger.info("stopping: %d request(s) still running cancelled %s, at their next token", n, when)


def serve_forever(engine: ServeEngine, sock: socket.socket, access: Access, log_level: str = "info") -> None:
    """Run the app on `sock` until Ctrl-C or SIGTERM, then return once no thread uses the model, so the caller
    may free it (freeing it under a decoding thread crashed the process): requests in flight get the config's
    `shutdown_grace` seconds, the rest are cancelled at their next token. uvicorn raises the signal again once
    its own handlers are gone; ours turns SIGTERM into the same KeyboardInterrupt as Ctrl-C."""
    import signal

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def still_stopping(signum: int, frame: Any) -> None:
        logger.warning("still stopping: requests end at their next token, a TTT request after its training")

    app = create_app(engine, access)
    jobs: Jobs = app.state.jobs
    grace = engine.config.shutdown_grace
    # uvicorn's own limit is a backstop: after the grace each request ends at its next token, unless TTT trains
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=grace + UVICORN_BACKSTOP_S)
    previous = {signal.SIGINT: signal.getsignal(signal.SIGINT), signal.SIGTERM: signal.signal(signal.SIGTERM, stop)}
    try:
        GracefulServer(config, jobs, grace).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        for signum in previous:  # from here a signal must not end the process before the workers stop
            signal.signal(signum, still_stopping)
        try:
            jobs.cancel_all(SHUTTING_DOWN)
            jobs.wait_idle()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
