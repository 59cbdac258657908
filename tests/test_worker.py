"""EngineWorker: many threads share one engine through one engine thread, and get exactly their own answers.

The engine has one KV cache and hands back step buffers the next step overwrites, so two threads
inside it at once would silently swap or garble completions (a review probe driving one Engine
from two threads got 31 of 40 wrong, with no error). The engine refuses a second thread
(EngineBusy); the worker serialises callers; cancellation never costs more than a step.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterator

import pytest

from engine.engine import Completion, Engine
from engine.errors import AheadError, Cancelled, EngineBusy
from engine.lookahead import LookaheadConfig
from engine.request import CompletionRequest
from engine.stops import StopRules
from engine.worker import EngineWorker

CODE = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
CFG = LookaheadConfig(4, 3, 4)
WAIT = 60  # seconds: a hang fails the test instead of stalling CI


def request(i: int, document: str, **kw) -> CompletionRequest:
    """Request `i`: its own prompt, so that answers swapped between callers show."""
    prefix = CODE[: 20 + 7 * i] + "    " * (i % 3)
    kw = {"max_tokens": 12, "decoding": "lookahead", "lookahead": CFG, "stop": StopRules.raw(), **kw}
    return CompletionRequest(prefix, "\n", document=document, **kw)


@pytest.fixture
def engine(tiny_engine, tiny_tokenizer) -> Engine:
    # Every id has text, so each committed token changes the text (streaming is observable).
    return tiny_engine("qwen2", config={"vocab_size": len(tiny_tokenizer)})


@pytest.fixture
def worker(engine: Engine) -> Iterator[EngineWorker]:
    worker = EngineWorker(engine)
    yield worker
    worker.close(timeout=WAIT)


def block(worker: EngineWorker) -> threading.Event:
    """Hold the engine thread inside a call until the returned event is set; queued work waits behind it."""
    inside, release = threading.Event(), threading.Event()

    def hold(_: Engine) -> None:
        inside.set()
        release.wait(WAIT)

    worker.call(hold)
    assert inside.wait(WAIT)
    return release


def count_steps(engine: Engine, monkeypatch, during: Callable[[int], None] | None = None) -> list[int]:
    """Count runner steps from now on (prefill chunks included); `during(n)` runs inside step n."""
    steps: list[int] = []
    real = engine.runner.step

    def step(*args, **kwargs):
        steps.append(len(steps) + 1)
        if during is not None:
            during(len(steps))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "step", step)
    return steps


def test_many_threads_get_the_sequential_answers(engine: Engine) -> None:
    """16 requests from 8 threads released at once: each gets what a sequential run gives it."""
    n = 16
    expected = [engine.complete(request(i, f"seq-{i}")) for i in range(n)]
    assert len({tuple(c.tokens) for c in expected}) > n // 2  # distinct answers: a swap would show
    worker = EngineWorker(engine)
    results: dict[int, Completion] = {}
    start = threading.Barrier(8)

    def client(first: int) -> None:
        start.wait()
        jobs = {i: worker.submit(request(i, f"par-{i}")) for i in (first, first + 8)}
        for i, job in jobs.items():
            results[i] = job.result(WAIT)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    worker.close(WAIT)
    assert sorted(results) == list(range(n))
    for i in range(n):
        assert (results[i].tokens, results[i].text) == (expected[i].tokens, expected[i].text), i


def test_second_thread_inside_the_engine_gets_busy(engine: Engine, monkeypatch) -> None:
    """Thread A is held inside a decoding step; B calling complete meanwhile is refused, and A's answer is right."""
    expected = engine.complete(request(3, "busy-ref"))
    inside, release = threading.Event(), threading.Event()

    def hold(n: int) -> None:
        if n == 2:
            inside.set()
            release.wait(WAIT)

    count_steps(engine, monkeypatch, hold)
    answer: list[Completion] = []
    a = threading.Thread(target=lambda: answer.append(engine.complete(request(3, "busy-a"))))
    a.start()
    assert inside.wait(WAIT)
    with pytest.raises(EngineBusy):
        engine.complete(request(5, "busy-b"))
    release.set()
    a.join(WAIT)
    assert answer and answer[0].tokens == expected.tokens
    assert engine.complete(request(5, "busy-b")).steps > 0  # A is done: the engine is free again


def test_job_cancelled_while_queued_never_runs(engine: Engine, worker: EngineWorker, monkeypatch) -> None:
    release = block(worker)
    steps = count_steps(engine, monkeypatch)
    doomed, after = worker.submit(request(1, "queued")), worker.submit(request(2, "after"))
    doomed.cancel()
    release.set()
    with pytest.raises(Cancelled):
        doomed.result(WAIT)
    assert after.result(WAIT).tokens  # the next job runs normally
    ran = len(steps)
    assert ran == after.result().steps + 1  # one prefill step and `after`'s own decoding steps: none of `doomed`'s
    assert "queued" not in engine.sessions.sessions  # it never even activated its document


@pytest.mark.parametrize("decoding", ["ar", "lookahead"])
def test_cancelling_a_running_job_stops_it_within_a_step(engine: Engine, worker: EngineWorker, monkeypatch,
                                                         decoding: str) -> None:
    """Cancelled while its 4th step runs (the 1st is the prefill): no further step, and the partial text is the
    start of the full answer."""
    req = request(4, "running", max_tokens=100, decoding=decoding, heal=False)
    full = engine.complete(CompletionRequest(req.prefix, req.suffix, document="running-ref", max_tokens=100,
                                             decoding=decoding, lookahead=CFG, stop=StopRules.raw(), heal=False))
    assert full.steps > 10
    job: list = []
    cancelled = threading.Event()

    def cancel_in(n: int) -> None:
        if n == 4:
            job[0].cancel()
            cancelled.set()

    steps = count_steps(engine, monkeypatch, cancel_in)
    job.append(worker.submit(req))
    with pytest.raises(Cancelled) as raised:
        job[0].result(WAIT)
    assert cancelled.is_set() and len(steps) == 4  # the engine saw the cancel before a 5th step
    assert 0 < raised.value.tokens <= 3 * (CFG.ngram if decoding == "lookahead" else 1) < len(full.tokens)
    assert full.text.startswith(raised.value.text)


def test_on_text_streams_growing_prefixes_of_the_answer(worker: EngineWorker) -> None:
    seen: list[str] = []
    result = worker.submit(request(2, "stream", max_tokens=24), on_text=seen.append).result(WAIT)
    assert len(seen) >= 3, seen
    for earlier, later in zip(seen, seen[1:], strict=False):
        assert later.startswith(earlier) and len(later) > len(earlier)
    assert seen[-1] == result.text


def test_calls_and_jobs_run_in_queue_order(worker: EngineWorker) -> None:
    release = block(worker)
    seen: list[tuple[str, bool, bool]] = []  # (call, earlier job done, later job started)
    earlier = worker.submit(request(1, "order"))

    def first(_: Engine) -> str:
        seen.append(("first", earlier.done(), later.done()))
        return "first"

    def last(engine: Engine) -> Engine:
        seen.append(("last", earlier.done(), later.done()))
        return engine

    first_call = worker.call(first)
    failing = worker.call(lambda _: 1 / 0)
    later = worker.submit(request(2, "order-2"))
    last_call = worker.call(last)
    release.set()
    assert first_call.result(WAIT) == "first" and last_call.result(WAIT) is worker.engine
    assert seen == [("first", True, False), ("last", True, True)]
    with pytest.raises(ZeroDivisionError):
        failing.result(WAIT)  # handed to its caller; the thread lives on and ran what came after


def test_factory_error_is_every_callers_error() -> None:
    error = AheadError("no model at /nowhere: pass --model")

    def factory() -> Engine:
        raise error

    worker = EngineWorker(factory)
    try:
        with pytest.raises(AheadError) as raised:
            worker.submit(request(0, "x")).result(WAIT)
        assert raised.value is error
        with pytest.raises(AheadError) as raised:
            worker.call(lambda e: e).result(WAIT)
        assert raised.value is error
    finally:
        worker.close(WAIT)


def test_close_finishes_queued_work(engine: Engine) -> None:
    expected = [engine.complete(request(i, f"close-ref-{i}")) for i in range(3)]
    worker = EngineWorker(engine)
    release = block(worker)
    jobs = [worker.submit(request(i, f"close-{i}")) for i in range(3)]
    worker.close(timeout=0.01)  # asked to close while all three are still queued behind the blocked call
    assert not any(job.done() for job in jobs)
    release.set()
    worker.close(WAIT)
    assert [job.result(0).tokens for job in jobs] == [c.tokens for c in expected]


def test_completion_holds_the_garbage_collector(engine: Engine, monkeypatch) -> None:
    """No cyclic collection runs during a completion's steps (a full pass inside a step cost tens of ms), and
    the collector is back on after it, an error too: catches a hold that is dropped, or one that outlives the
    request."""
    collecting: list[bool] = []

    def during(step: int) -> None:
        collecting.append(gc.isenabled())
        if step == 40:
            raise RuntimeError("a step failed")

    count_steps(engine, monkeypatch, during)
    assert gc.isenabled()
    engine.complete(request(1, "gc", decoding="tree"))
    assert len(collecting) < 40 and not any(collecting) and gc.isenabled()
    with pytest.raises(RuntimeError):
        for i in range(40):
            engine.complete(request(i, f"gc{i}", decoding="tree"))
    assert not any(collecting) and gc.isenabled()
