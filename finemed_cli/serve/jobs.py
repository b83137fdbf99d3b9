"""The worker threads of `finemed serve` and their cancellation. Each request decodes in a thread of its own
that hands its pieces to the event loop through a queue; a request is cancelled (its client went away, or the
server is stopping) by an event its decode loop checks after every token, so it stops within one decode step,
as llama-server and Ollama drop a slot whose client is gone. `Jobs` counts every thread that uses the model, so
the server frees the model only once none does (freeing it under a decoding thread crashed the process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from finemed_cli.serve.protocol import RequestError

logger = logging.getLogger(__name__)
SHUTTING_DOWN = "the server is shutting down"
DISCONNECTED = "the client disconnected"

# run(prepared, emit, cancelled) -> the tokens decoded before a cancel stopped it, or None if it ran to its end
Run = Callable[[Any, Callable[..., None], threading.Event], int | None]


class Job:
    """One request's generation in its worker thread, seen from the event loop as a stream of events."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self.loop, self.name = loop, name
        self.queue: asyncio.Queue[tuple[str, tuple[Any, ...]]] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.reason = ""

    def cancel(self, reason: str) -> None:
        """Stop at the next token; the first reason given is the one reported."""
        if not self.cancelled.is_set():
            self.reason = reason
            self.cancelled.set()

    def emit(self, kind: str, *values: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, values))
        except RuntimeError:  # the loop closed (server stopped): nobody is listening
            self.cancel(SHUTTING_DOWN)

    def work(self, run: Run, prepared: Any) -> None:
        try:
            stopped_at = run(prepared, self.emit, self.cancelled)
            if stopped_at is not None:
                logger.info("%s cancelled after %d tokens: %s", self.name, stopped_at, self.reason)
        except RequestError as e:
            self.emit("error", e)
        except Exception as e:  # a bug, or llama.cpp failing: logged with its trace, answered in JSON
            logger.exception("generation failed")
            self.emit("error", RequestError(500, f"generation failed: {type(e).__name__}: {e}"))
        finally:
            self.emit("end")

    async def events(self) -> AsyncIterator[tuple[str, tuple[Any, ...]]]:
        while True:
            kind, values = await self.queue.get()
            if kind == "end":
                return
            yield kind, values

    def cancelled_error(self, tokens: int) -> RequestError:
        """What the client of a cancelled request is told (if it is still there to hear it)."""
        if self.reason == SHUTTING_DOWN:
            return RequestError(503, f"{SHUTTING_DOWN}: this request was cancelled after {tokens} tokens; send it "
                                "again once the server is back", code="server_shutting_down")
        return RequestError(499, f"cancelled after {tokens} tokens: {self.reason}", code="cancelled")


class Jobs:
    """Every thread of this server that uses the model: the request workers and the prompt preparations."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.busy = 0
        self.running: set[Job] = set()
        self.stopping = False

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Count the calling thread as using the model; a 503 once the server is stopping."""
        self._admit(None)
        try:
            yield
        finally:
            with self.cond:
                self.busy -= 1
                self.cond.notify_all()

    def start(self, job: Job, run: Run, prepared: Any) -> None:
        """Run `job` in a worker thread of its own, counted until it ends."""
        def work() -> None:
            try:
                job.work(run, prepared)
            finally:
                with self.cond:
                    self.running.discard(job)
                    self.busy -= 1
                    self.cond.notify_all()

        self._admit(job)
        threading.Thread(target=work, name=f"finemed-{job.name}", daemon=True).start()

    def _admit(self, job: Job | None) -> None:
        with self.cond:
            if self.stopping:
                raise RequestError(503, f"{SHUTTING_DOWN}; send the request again once it is back",
                                   code="server_shutting_down")
            self.busy += 1
            if job is not None:
                self.running.add(job)

    def stop(self) -> None:
        """Refuse new requests (503); those running go on until `cancel_all`."""
        with self.cond:
            self.stopping = True

    def cancel_all(self, reason: str = SHUTTING_DOWN) -> int:
        """Cancel every running request at its next token; how many there were."""
        with self.cond:
            self.stopping = True
            jobs = list(self.running)
        for job in jobs:
            job.cancel(reason)
        return len(jobs)

    def wait_idle(self) -> None:
        """Block until no thread uses the model (each cancelled one stops at its next token)."""
        with self.cond:
            while self.busy:
                self.cond.wait(timeout=1.0)  # wakes now and then, so a signal's handler runs


async def watch_disconnect(request: Any, gone: Callable[[], None]) -> None:
    """Call `gone` when the client of `request` (a Starlette Request) goes away. Starlette cancels only a
    streamed response then; a whole one would decode on, holding the model from the requests behind it. Once
    the body is read, uvicorn's receive() waits for the connection to close and answers http.disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    gone()
