"""Per-document KV sessions: reusing a document's cached prefix must never change a completion.

Every warm request is compared token for token with a cold one (no reuse, fresh document, no
persistent pool); the warm one must also have computed far fewer prompt tokens where the
edit allows it. Most tests run on a tiny random model; one runs the real SmolLM2 weights.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

import pytest
import torch
from conftest import complete

from engine.engine import Completion, Engine
from engine.errors import Cancelled
from engine.lookahead import LookaheadConfig
from engine.prompt import build_prompt
from engine.request import CompletionRequest
from engine.sessions import common_prefix
from engine.stops import StopRules

CODE = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\n"
    "def total(values):\n    s = 0\n    for v in values:\n        s += v\n    return s\n\n\n"
    "def main():\n    print(fibonacci(10))\n    print(total([1, 2, 3]))\n    "
)
SUFFIX = "\n\nif __name__ == '__main__':\n    main()\n"
CFG = LookaheadConfig(4, 3, 4)
_cold_ids = itertools.count()


def cold(engine: Engine, prefix: str, suffix: str, **kw) -> Completion:
    """The reference: nothing reused, nothing remembered from earlier requests."""
    doc = f"cold-{next(_cold_ids)}"
    out = complete(engine, prefix, suffix, document=doc, reuse_kv=False, persistent_pool=False, **kw)
    engine.close_document(doc)
    return out


def edits(prefix: str, suffix: str) -> list[tuple[str, str, str]]:
    """(name, prefix, suffix) after a typical sequence of edits, in order."""
    middle = prefix.rfind("\n", 0, len(prefix) // 2) + 1  # a line start mid-file: a line inserted there
    return [
        ("open", prefix, suffix),
        ("type", prefix + "p", suffix),
        ("type", prefix + "pr", suffix),
        ("type", prefix + "pri", suffix),
        ("delete", prefix + "p", suffix),
        ("insert-line", prefix[:middle] + "# helpers\n" + prefix[middle:] + "p", suffix),
        ("change-suffix", prefix[:middle] + "# helpers\n" + prefix[middle:] + "p", suffix.replace("main()", "run()")),
    ]


def check_edits(engine: Engine, prefix: str, suffix: str, document: str, **kw) -> list[Completion]:
    warm_results = []
    for name, p, s in edits(prefix, suffix):
        warm = complete(engine, p, s, document=document, type_through=False, **kw)
        ref = cold(engine, p, s, type_through=False, **kw)
        assert warm.tokens == ref.tokens, name
        assert warm.text == ref.text, name
        assert warm.prompt_tokens == ref.prompt_tokens, name
        assert warm.prefill_tokens + warm.reused_tokens == ref.prefill_tokens == ref.prompt_tokens - 1, name
        if name == "type":
            # One more character re-encodes the last token or two: the rest of the prompt is reused.
            assert warm.prefill_tokens <= 4 < warm.prompt_tokens // 4, (name, warm.prefill_tokens)
        warm_results.append(warm)
    return warm_results


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("decoding", ["ar", "lookahead"])
def test_tiny_edits_reuse_kv_and_match_cold(tiny_engine: Callable[..., Engine], arch: str, decoding: str) -> None:
    engine = tiny_engine(arch)
    results = check_edits(engine, CODE, SUFFIX, "doc", max_tokens=16, decoding=decoding, lookahead=CFG)
    assert sum(r.reused_tokens for r in results[1:]) > 0


@pytest.mark.slow
def test_smollm2_edits_reuse_kv_and_match_cold(smollm2_engine: Engine, bench_cases: list[dict]) -> None:
    case = bench_cases[0]
    results = check_edits(smollm2_engine, case["prefix"], case["suffix"], "sessions-edits", max_tokens=8, decoding="ar")
    assert results[0].reused_tokens == 0 and results[1].reused_tokens > 100


def test_tiny_interleaved_documents_match_cold(tiny_engine: Callable[..., Engine]) -> None:
    """A, B, A, B with edits: each document gets its own K/V back when it becomes active again."""
    engine = tiny_engine("qwen2")
    other = CODE.replace("fibonacci", "factorial").replace("total", "product")
    kw = dict(max_tokens=12, decoding="lookahead", lookahead=CFG, type_through=False)
    for round_, (doc, text) in enumerate([("A", CODE), ("B", other), ("A", CODE + "x"), ("B", other + "y")] * 2):
        text = text + "z" * (round_ // 4)
        warm = complete(engine, text, SUFFIX, document=doc, **kw)
        assert warm.tokens == cold(engine, text, SUFFIX, **kw).tokens, (round_, doc)
        if round_ >= 2:
            assert warm.reused_tokens > warm.prompt_tokens // 2, (round_, doc)  # parked and restored


def test_tiny_eviction_under_a_small_budget(tiny_engine: Callable[..., Engine]) -> None:
    """Room for one parked document: parking another evicts it, and it later starts cold but equal."""
    engine, reference = tiny_engine("llama"), tiny_engine("llama")
    kw = dict(max_tokens=12, decoding="ar", type_through=False)
    docs = {d: CODE.replace("fibonacci", name) for d, name in (("A", "fib"), ("B", "fact"), ("C", "gcd"))}
    budget = engine.options.budget
    lengths = [len(build_prompt(engine.codec, t, SUFFIX, budget).ids) + kw["max_tokens"] for t in docs.values()]
    assert 2 * min(lengths) > max(lengths)
    engine.sessions.budget_bytes = engine.runner.bytes_per_token * max(lengths)  # one parked document fits
    for d in ("A", "B", "C"):
        out = complete(engine, docs[d], SUFFIX, document=d, **kw)  # parks A, then parks B evicting A
        assert out.tokens == cold(reference, docs[d], SUFFIX, **kw).tokens
    assert engine.sessions.evictions == 1
    assert engine.sessions.sessions["A"].parked is None and engine.sessions.sessions["B"].parked is not None
    again = complete(engine, docs["A"], SUFFIX, document="A", **kw)  # parks C evicting B
    assert again.reused_tokens == 0 and again.prefill_tokens == again.prompt_tokens - 1
    assert again.tokens == cold(reference, docs["A"], SUFFIX, **kw).tokens
    assert engine.sessions.evictions == 2
    assert engine.sessions.parked_bytes() <= engine.sessions.budget_bytes


def test_tiny_least_recently_used_document_is_dropped(tiny_engine: Callable[..., Engine]) -> None:
    """Past max_sessions, the document used longest ago is forgotten (not the oldest opened): its next request
    starts cold but gives the same completion; the others keep their K/V."""
    engine, reference = tiny_engine("qwen2"), tiny_engine("qwen2")
    engine.sessions.max_sessions = 2
    kw = dict(max_tokens=8, decoding="ar", type_through=False)
    docs = {d: CODE.replace("fibonacci", name) for d, name in (("A", "fib"), ("B", "fact"), ("C", "gcd"))}
    for d in ("A", "B", "A"):  # A opened first, but used last
        complete(engine, docs[d], SUFFIX, document=d, **kw)
    complete(engine, docs["C"], SUFFIX, document="C", **kw)
    assert list(engine.sessions.sessions) == ["A", "C"]
    b = complete(engine, docs["B"], SUFFIX, document="B", **kw)  # back: cold, and now A is the one dropped
    assert b.reused_tokens == 0 and b.tokens == cold(reference, docs["B"], SUFFIX, **kw).tokens
    assert set(engine.sessions.sessions) == {"B", "C"}
    c = complete(engine, docs["C"], SUFFIX, document="C", **kw)
    assert c.reused_tokens == c.prompt_tokens - 1  # kept: its K/V came back from its parked copy


def test_tiny_out_of_memory_while_parking(tiny_engine: Callable[..., Engine], monkeypatch) -> None:
    """No memory for a parked copy: parked documents are dropped, the engine keeps serving, and each of them
    is cold next time but still right."""
    engine, reference = tiny_engine("llama"), tiny_engine("llama")
    kw = dict(max_tokens=8, decoding="lookahead", lookahead=CFG, type_through=False)
    docs = {d: CODE.replace("fibonacci", name) for d, name in (("A", "fib"), ("B", "fact"), ("C", "gcd"))}
    complete(engine, docs["A"], SUFFIX, document="A", **kw)
    complete(engine, docs["B"], SUFFIX, document="B", **kw)  # A parked
    assert engine.sessions.sessions["A"].parked is not None

    def no_memory(n: int) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine.runner, "save", no_memory)
    out = complete(engine, docs["C"], SUFFIX, document="C", **kw)  # parking B fails
    assert out.tokens == cold(reference, docs["C"], SUFFIX, **kw).tokens
    assert engine.sessions.parked_bytes() == 0
    monkeypatch.undo()
    for d in ("A", "B"):
        again = complete(engine, docs[d], SUFFIX, document=d, **kw)
        assert again.reused_tokens == 0, d
        assert again.tokens == cold(reference, docs[d], SUFFIX, **kw).tokens, d


def test_tiny_zero_budget_never_reuses_but_matches(tiny_engine: Callable[..., Engine]) -> None:
    engine = tiny_engine("qwen2", kv_budget_mb=0)
    kw = dict(max_tokens=12, decoding="lookahead", lookahead=CFG, type_through=False)
    for doc, text in [("A", CODE), ("B", CODE + "q"), ("A", CODE + "r")]:
        warm = complete(engine, text, SUFFIX, document=doc, **kw)
        assert warm.tokens == cold(engine, text, SUFFIX, **kw).tokens
    assert warm.reused_tokens == 0 and warm.prefill_tokens == warm.prompt_tokens - 1
    assert engine.sessions.parked_bytes() == 0


def test_tiny_big_budget_switching_back_reuses(tiny_engine: Callable[..., Engine]) -> None:
    engine = tiny_engine("llama")
    kw = dict(max_tokens=12, decoding="ar", type_through=False)
    complete(engine, CODE, SUFFIX, document="A", **kw)
    complete(engine, CODE.replace("n", "m"), SUFFIX, document="B", **kw)
    back = complete(engine, CODE, SUFFIX, document="A", **kw)
    assert back.reused_tokens == back.prompt_tokens - 1 and back.prefill_tokens == 0
    assert engine.sessions.evictions == 0


def test_tiny_close_document_drops_the_session(tiny_engine: Callable[..., Engine]) -> None:
    engine = tiny_engine("qwen2")
    kw = dict(max_tokens=8, decoding="ar")
    first = complete(engine, CODE, SUFFIX, document="A", **kw)
    assert "A" in engine.sessions.sessions
    engine.close_document("A")
    assert "A" not in engine.sessions.sessions
    again = complete(engine, CODE, SUFFIX, document="A", **kw)
    assert again.reused_tokens == 0 and not again.type_through
    assert again.tokens == first.tokens


@pytest.mark.parametrize("decoding", ["ar", "lookahead"])
def test_tiny_type_through(tiny_engine: Callable[..., Engine], tiny_tokenizer, decoding: str) -> None:
    """Typing the start of the suggestion serves the rest without running the model."""
    engine = tiny_engine("qwen2", config={"vocab_size": len(tiny_tokenizer)})  # every id has text
    prefix = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n"
    kw = dict(max_tokens=16, decoding=decoding, lookahead=CFG, heal=False)
    first = complete(engine, prefix, SUFFIX, document="A", **kw)
    assert len(first.text) > 4 and not first.type_through
    hit = complete(engine, prefix + first.text[:3], SUFFIX, document="A", **kw)
    assert hit.type_through and hit.steps == 0 and hit.tokens == []
    assert hit.text == first.text[3:]
    hit2 = complete(engine, prefix + first.text[:4], SUFFIX, document="A", **kw)  # still relative to `first`
    assert hit2.type_through and hit2.text == first.text[4:]
    # A different suffix, a mismatching character, or type_through=False: computed normally.
    for p, s, tt in [
        (prefix + first.text[:3], SUFFIX + "#", True),
        (prefix + first.text[:2] + "\x07", SUFFIX, True),
        (prefix + first.text[:3], SUFFIX, False),
    ]:
        out = complete(engine, p, s, document="A", type_through=tt, **kw)
        assert not out.type_through and out.steps > 0
        assert out.tokens == cold(engine, p, s, **kw).tokens


@pytest.mark.parametrize("decoding", ["ar", "lookahead"])
def test_tiny_cancellation(tiny_engine: Callable[..., Engine], decoding: str) -> None:
    """Cancelled after the first step: Cancelled is raised with what was committed, and the
    document's session stays right for the next request."""
    engine = tiny_engine("llama")
    kw = dict(max_tokens=24, decoding=decoding, lookahead=CFG, type_through=True)
    cancel = threading.Event()
    request = CompletionRequest(CODE, SUFFIX, document="A", max_tokens=24, decoding=decoding, lookahead=CFG,
                                stop=StopRules.raw())
    with pytest.raises(Cancelled) as raised:
        engine.complete(request, cancel=cancel, on_text=lambda _: cancel.set())
    partial = raised.value
    full = complete(engine, CODE, SUFFIX, document="A", **kw)
    assert not full.type_through and full.stop_reason == "length"  # nothing of the cancelled one is reused as text
    ref = cold(engine, CODE, SUFFIX, **kw)
    assert full.tokens == ref.tokens and 0 < partial.tokens < len(full.tokens)
    assert ref.text.startswith(partial.text) and partial.text  # what was committed before the cancel is right


def test_tiny_cancel_before_prefill_computes_nothing(tiny_engine: Callable[..., Engine]) -> None:
    """A request cancelled before it starts raises at once: no K/V is written for it."""
    engine = tiny_engine("qwen2")
    cancel = threading.Event()
    cancel.set()
    before = engine.model.kv.clone()
    with pytest.raises(Cancelled):
        engine.complete(CompletionRequest(CODE, SUFFIX, document="A"), cancel=cancel)
    assert torch.equal(before, engine.model.kv)


def test_tiny_cancel_between_prefill_chunks(tiny_engine: Callable[..., Engine]) -> None:
    """Cancelled after the first prefill chunk: the rest is not prefilled and the session knows
    exactly which K/V are valid, so the next request reuses them and still matches a cold one."""
    engine = tiny_engine("qwen2")
    engine.runner.prefill_chunk = 16
    polls: list[int] = []
    cancel = threading.Event()
    real_step = engine.runner.step

    def step(*args, **kwargs):
        polls.append(1)
        cancel.set()  # cancelled while the first chunk runs
        return real_step(*args, **kwargs)

    engine.runner.step = step
    with pytest.raises(Cancelled):
        engine.complete(CompletionRequest(CODE * 3, SUFFIX, document="A", max_tokens=8), cancel=cancel)
    assert len(polls) == 1
    engine.runner.step = real_step
    assert len(engine.sessions.sessions["A"].tokens) == 16
    again = complete(engine, CODE * 3, SUFFIX, document="A", max_tokens=8, decoding="ar")
    assert again.reused_tokens == 16
    assert again.tokens == cold(engine, CODE * 3, SUFFIX, max_tokens=8, decoding="ar").tokens


def test_common_prefix_matches_a_plain_scan() -> None:
    def scan(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))

    base = list(range(1000))
    for a, b in [([], []), (base, []), (base, base), (base, base[:500]), (base, base[:10] + [-1] + base[11:]),
                 (base, base[:999] + [5]), ([1, 2], [2, 1]), (base[:1], base)]:
        assert common_prefix(a, b) == scan(a, b) == common_prefix(b, a)


def test_tiny_out_of_memory_mid_request_is_an_error_and_the_engine_keeps_serving(
    tiny_engine: Callable[..., Engine],
) -> None:
    """A request that runs out of device memory in a decode step raises OutOfMemory (code
    out_of_memory), parked sessions are dropped, and the next request is served and right."""
    from engine.errors import OutOfMemory

    engine = tiny_engine("qwen2")
    complete(engine, CODE, SUFFIX, document="parked", max_tokens=4, decoding="ar")
    engine.sessions.activate("other")  # parks "parked"
    assert engine.sessions.parked_bytes() > 0
    real_step = engine.runner.step
    calls: list[int] = []

    def step(shape, *args, **kwargs):
        calls.append(1)
        if shape.size == 1 and len(calls) > 3:  # a few decode steps in
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step(shape, *args, **kwargs)

    engine.runner.step = step
    with pytest.raises(OutOfMemory) as raised:
        complete(engine, CODE, SUFFIX, document="A", max_tokens=12, decoding="ar")
    assert raised.value.code == "out_of_memory" and engine.sessions.parked_bytes() == 0
    engine.runner.step = real_step
    again = complete(engine, CODE, SUFFIX, document="A", max_tokens=12, decoding="ar")
    assert again.tokens == cold(engine, CODE, SUFFIX, max_tokens=12, decoding="ar").tokens


def test_eviction_drops_the_oldest_parked_copies_until_the_rest_fit(tiny_engine: Callable[..., Engine]) -> None:
    """Four parked copies, room for two: the two oldest go, the newest two stay. Catches a running total that
    is not lowered as copies go (all four dropped) and eviction from the newest end."""
    from engine.sessions import Session

    store = tiny_engine("qwen2").sessions
    store.sessions.clear()
    for name in "abcd":
        session = store.sessions[name] = Session(name)
        session.tokens, session.parked = [1, 2], torch.empty(100)  # 400 bytes each
    store._evict_until(800)
    assert [s.parked is not None for s in store.sessions.values()] == [False, False, True, True]
    assert store.evictions == 2 and store.sessions["a"].tokens == [] and store.sessions["d"].tokens == [1, 2]


def test_a_completion_is_learned_during_the_next_requests_prefill(tiny_engine: Callable[..., Engine]) -> None:
    """The histories learn a finished completion when the next request prefills, not before its own answer;
    forgetting what was learned (benchmarks) still leaves a document's history what it was taught. Catches the
    learning left on the answer's path, never made, or lost to `forget_learned`."""
    engine = tiny_engine("qwen2")
    store = engine.sessions
    first = complete(engine, "def fibonacci(n):\n    if n", max_tokens=12, decoding="tree", document="d")
    doc = store.sessions["d"].history
    assert first.tokens and doc.records == [] and store.workspace.records == []
    complete(engine, "x = 1\n", max_tokens=1, decoding="ar", document="e")
    assert doc.records[-1][-len(first.tokens):] == first.tokens and store.workspace.records == doc.records
    second = complete(engine, "def fibonacci(n):\n    return", max_tokens=12, decoding="tree", document="d")
    store.forget_learned()
    assert len(doc.records) == 2 and doc.records[-1][-len(second.tokens):] == second.tokens
    assert store.workspace.records == []
