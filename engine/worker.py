"""The one thread that owns the Engine: callers on any thread queue work, it runs one item at a time.

The engine has one KV cache, and `Runner.step` hands back buffers the next step overwrites,
so two threads inside it silently mix up each other's completions. Language servers and
daemons answer on many threads; they submit here instead. Each completion job carries its own
cancel event, which the engine polls before prefill, between prefill chunks and between
decoding steps; a job cancelled while still queued never touches the GPU.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from .engine import Completion, Engine, OnText
from .errors import Cancelled
from .request import ALL_ON, CompletionRequest, Switches

T = TypeVar("T")


class Job:
    """A queued or running completion: cancel it, wait for it, or follow its text as it grows."""

    def __init__(self, request: CompletionRequest, switches: Switches, on_text: OnText | None):
        self.request = request
        self.switches = switches
        self.on_text = on_text
        self.cancelled = threading.Event()
        self.future: Future[Completion] = Future()

    def cancel(self) -> None:
        self.cancelled.set()

    def result(self, timeout: float | None = None) -> Completion:
        """The completion; raises what the engine raised (Cancelled, DoesNotFit, BadRequest, ...)."""
        return self.future.result(timeout)

    def done(self) -> bool:
        return self.future.done()


class EngineWorker:
    """Runs an Engine on a thread of its own; build it there too by passing a factory."""

    def __init__(self, engine: Engine | Callable[[], Engine], name: str = "ahead-engine"):
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._ready: Future[Engine] = Future()
        self._thread = threading.Thread(target=self._run, args=(engine,), name=name, daemon=True)
        self._thread.start()

    @property
    def engine(self) -> Engine:
        """The engine once built (blocks until then; raises what building it raised)."""
        return self._ready.result()

    def pending(self) -> int:
        return self._queue.qsize()

    def submit(
        self, request: CompletionRequest, *, switches: Switches = ALL_ON, on_text: OnText | None = None
    ) -> Job:
        job = Job(request, switches, on_text)
        self._queue.put(lambda: self._complete(job))
        return job

    def call(self, fn: Callable[[Engine], T]) -> Future[T]:
        """Run `fn(engine)` on the engine thread, in queue order (status, close_document, warm-up)."""
        future: Future[T] = Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except BaseException as exc:  # handed to the caller, who decides
                    future.set_exception(exc)

        self._queue.put(run)
        return future

    def close(self, timeout: float | None = None) -> None:
        """Finish what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    # -- the engine thread ----------------------------------------------------------------------
    def _run(self, engine: Engine | Callable[[], Engine]) -> None:
        try:
            self._ready.set_result(engine if isinstance(engine, Engine) else engine())
        except BaseException as exc:
            self._ready.set_exception(exc)
        while (item := self._queue.get()) is not None:
            item()

    def _complete(self, job: Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            if job.cancelled.is_set():
                raise Cancelled()  # cancelled while queued: no prefill, no GPU time
            job.future.set_result(
                self.engine.complete(job.request, switches=job.switches, on_text=job.on_text, cancel=job.cancelled)
            )
        except Exception as exc:  # AheadError, or a bug or CUDA error: the caller gets it, the thread lives on
            job.future.set_exception(exc)
