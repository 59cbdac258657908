"""The one thread that owns the Engine: callers on any thread queue work, it runs one item at a time.

The engine has one KV cache, and `Runner.step` hands back buffers the next step overwrites,
so two threads inside it silently mix up each other's completions. Language servers and
daemons answer on many threads; they submit here instead. Each completion job carries its own
cancel event, which the engine polls before prefill, between prefill chunks and between
decoding steps; a job cancelled while still queued never touches the GPU. The order in which
queued work runs is the scheduler's (scheduler.py): first in first out, or fair across clients.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

from .engine import Completion, Engine, OnText
from .errors import Cancelled
from .request import ALL_ON, CompletionRequest, Switches
from .scheduler import LOCAL, FairScheduler, FifoScheduler

T = TypeVar("T")


class Job:
    """A queued or running completion: cancel it, wait for it, or follow its text as it grows."""

    def __init__(self, request: CompletionRequest, switches: Switches, on_text: OnText | None, client: str = LOCAL):
        self.request = request
        self.switches = switches
        self.on_text = on_text
        self.client = client
        self.document = request.document
        self.cancelled = threading.Event()
        self.superseded = False
        self.future: Future[Completion] = Future()

    def cancel(self) -> None:
        self.cancelled.set()

    def supersede(self) -> None:
        """A newer request for the same document arrived: this one's answer is no longer wanted."""
        if not self.future.done():
            self.superseded = True
            self.cancelled.set()

    def result(self, timeout: float | None = None) -> Completion:
        """The completion; raises what the engine raised (Cancelled, DoesNotFit, BadRequest, ...)."""
        return self.future.result(timeout)

    def done(self) -> bool:
        return self.future.done()


class Call(Generic[T]):
    """Any other engine operation (status, close_document, warm-up), run in queue order."""

    def __init__(self, fn: Callable[[Engine], T], client: str = LOCAL):
        self.fn = fn
        self.client = client
        self.future: Future[T] = Future()


class EngineWorker:
    """Runs an Engine on a thread of its own; build it there too by passing a factory."""

    def __init__(
        self,
        engine: Engine | Callable[[], Engine],
        scheduler: FifoScheduler | FairScheduler | None = None,
        name: str = "ahead-engine",
    ):
        self.scheduler = scheduler or FifoScheduler()
        self._ready: Future[Engine] = Future()
        self._thread = threading.Thread(target=self._run, args=(engine,), name=name, daemon=True)
        self._thread.start()

    @property
    def engine(self) -> Engine:
        """The engine once built (blocks until then; raises what building it raised)."""
        return self._ready.result()

    def pending(self) -> int:
        return self.scheduler.pending()

    def submit(
        self,
        request: CompletionRequest,
        *,
        switches: Switches = ALL_ON,
        on_text: OnText | None = None,
        client: str = LOCAL,
    ) -> Job:
        """Queue a completion; raises Overloaded if the client already has too many queued."""
        job = Job(request, switches, on_text, client)
        self.scheduler.put(job)
        return job

    def call(self, fn: Callable[[Engine], T], client: str = LOCAL) -> Future[T]:
        """Run `fn(engine)` on the engine thread, in queue order."""
        call = Call(fn, client)
        self.scheduler.put(call)
        return call.future

    def close(self, timeout: float | None = None) -> None:
        """Finish what is queued, then stop the thread."""
        self.scheduler.close()
        self._thread.join(timeout)

    # -- the engine thread ----------------------------------------------------------------------
    def _run(self, engine: Engine | Callable[[], Engine]) -> None:
        try:
            self._ready.set_result(engine if isinstance(engine, Engine) else engine())
        except BaseException as exc:  # handed to every caller through `engine`
            self._ready.set_exception(exc)
        while (item := self.scheduler.get()) is not None:
            if isinstance(item, Job):
                self._complete(item)
            else:
                self._call(item)

    def _call(self, call: Call) -> None:
        if call.future.set_running_or_notify_cancel():
            try:
                call.future.set_result(call.fn(self.engine))
            except Exception as exc:
                call.future.set_exception(exc)

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
