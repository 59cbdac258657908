"""Lookahead decoding must produce exactly greedy AR's tokens, only in fewer steps.

Tiny random models cover many (W, N, G) shapes and edge cases in milliseconds; the real
SmolLM2 weights on bench code check that the n-gram pool actually accepts guesses there.
"""

from __future__ import annotations

import pytest
import torch
from conftest import complete

from engine.decoding import DecodeState, decode_ar
from engine.errors import DoesNotFit
from engine.lookahead import LookaheadConfig, NGramPool, decode_lookahead, step_shape

REPETITIVE = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)\n" * 3
TINY_CONFIGS = ["8,4,8", "1,2,1", "4,3,0", "1,1,0", "3,5,3", "2,6,2", "8,4,8,1"]
REAL_CONFIGS = ["4,3,4", "8,4,8", "1,2,1", "3,5,0"]


def check_stats(tokens: list[int], steps: int, accepted: list[int], ngram: int) -> None:
    """Per-step accounting must add up: every committed token belongs to exactly one step."""
    assert sum(accepted) == len(tokens)
    assert steps == len(accepted)
    assert max(accepted, default=0) <= ngram


# -- tiny models: many shapes ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("spec", TINY_CONFIGS)
def test_tiny_lookahead_equals_ar(tiny_engine, arch: str, spec: str) -> None:
    """Every shape, pool hits included, reproduces greedy decoding token for token."""
    engine = tiny_engine(arch)
    cfg = LookaheadConfig.parse(spec)
    kw = dict(document="doc", max_tokens=40, type_through=False)
    ar = complete(engine, REPETITIVE, decoding="ar", **kw)
    la = complete(engine, REPETITIVE, decoding="lookahead", lookahead=cfg, **kw)
    assert len(ar.tokens) == 40
    assert la.tokens == ar.tokens
    assert la.text == ar.text
    check_stats(la.tokens, la.steps, la.accepted_per_step, cfg.ngram)
    if cfg.verify and cfg.ngram > 1 and cfg.window > 1:
        # The repeated snippet makes the model loop: the pool must turn that into multi-token steps.
        assert la.pool_hits > 0 and la.steps < ar.steps
    if not cfg.verify:
        assert la.pool_hits == 0 and la.steps == len(la.tokens)  # nothing to verify, one token per step


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("spec,max_tokens", [("3,5,3", 2), ("2,6,2", 1), ("8,4,8", 3), ("8,4,8", 1)])
def test_tiny_lookahead_max_tokens_below_ngram(tiny_engine, monkeypatch, arch: str, spec: str, max_tokens: int) -> None:
    """A step may accept up to N tokens; when one accepts more than the limit leaves room for, the length limit
    must cut inside it at exactly max_tokens."""
    engine = tiny_engine(arch)
    cfg = LookaheadConfig.parse(spec)
    # Warm the document's pool with this very continuation, so that the first step accepts a long run.
    complete(engine, REPETITIVE, document="doc", decoding="lookahead", lookahead=cfg, max_tokens=40, heal=False)
    kw = dict(document="doc", max_tokens=max_tokens, type_through=False, heal=False)
    ar = complete(engine, REPETITIVE, decoding="ar", **kw)
    offered: list[int] = []  # tokens each step wanted to commit
    real_commit = DecodeState.commit

    def commit(self: DecodeState, tokens: list[int]) -> int:
        offered.append(len(tokens))
        return real_commit(self, tokens)

    monkeypatch.setattr(DecodeState, "commit", commit)
    la = complete(engine, REPETITIVE, decoding="lookahead", lookahead=cfg, **kw)
    assert sum(offered[:-1]) < max_tokens < sum(offered), f"no step ran past the limit: {offered}"
    assert len(la.tokens) == max_tokens
    assert la.tokens == ar.tokens
    assert la.stop_reason == "length"
    check_stats(la.tokens, la.steps, la.accepted_per_step, cfg.ngram)


@pytest.mark.parametrize("decoding", ["ar", "lookahead"])
def test_tiny_max_tokens_zero_runs_no_step(tiny_engine, decoding: str) -> None:
    out = complete(tiny_engine("qwen2"), REPETITIVE, decoding=decoding, max_tokens=0)
    assert (out.tokens, out.text, out.steps, out.stop_reason) == ([], "", 0, "length")


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("heal", [True, False])
def test_tiny_lookahead_prompt_shorter_than_window(tiny_engine, arch: str, heal: bool) -> None:
    """A 2-token prompt cannot fill a W=8 window: the seed repeats it and output is still AR's."""
    engine = tiny_engine(arch)
    prefix = "n)"
    assert len(engine.codec.encode(prefix)) == 2
    kw = dict(max_tokens=24, heal=heal, reuse_kv=False, type_through=False, persistent_pool=False)
    ar = complete(engine, prefix, decoding="ar", **kw)
    for spec in ("8,4,8", "8,3,2"):
        la = complete(engine, prefix, decoding="lookahead", lookahead=LookaheadConfig.parse(spec), **kw)
        assert la.tokens == ar.tokens, spec
        assert la.prompt_tokens == (1 if heal else 2)


@pytest.mark.parametrize("decoding", ["ar", "lookahead"])
def test_tiny_request_that_cannot_fit_the_cache_is_refused(tiny_engine, decoding: str) -> None:
    """Prompt + max_tokens + one (lookahead) step must fit the KV cache. The largest max_tokens the engine
    accepts decodes all the way to the cache's end without overrunning it; one more is refused with DoesNotFit
    before any K/V is written, as is a prompt that alone overflows the cache."""
    engine = tiny_engine("qwen2", max_seq_len=256)
    kw = dict(decoding=decoding, lookahead=LookaheadConfig(8, 4, 8), heal=False, type_through=False)
    prefix = REPETITIVE[:120]

    def refused(max_tokens: int, text: str = prefix) -> bool:
        before = engine.model.kv.clone()
        try:
            complete(engine, text, max_tokens=max_tokens, **kw)
        except DoesNotFit as exc:
            assert "--max-seq-len" in str(exc)
            assert torch.equal(before, engine.model.kv)  # refused before any work
            return True
        return False

    assert refused(engine.runner.capacity)
    largest = next(m for m in range(engine.runner.capacity, -1, -1) if not refused(m))
    assert largest > engine.runner.capacity // 2  # a short prompt: most of the cache is usable
    out = complete(engine, prefix, max_tokens=largest, document="full", **kw)  # steps near the end must fit
    assert len(out.tokens) == largest and out.stop_reason == "length"
    assert refused(0, REPETITIVE * 4)  # the prompt alone is larger than the cache


def run_decoder(engine, ids: list[int], stop: frozenset[int], cfg: LookaheadConfig | None) -> DecodeState:
    """Drive a decoder directly on the engine's runner, with our own stop set."""
    engine.sessions.invalidate_working_cache()
    engine.runner.prefill(ids[:-1], 0)
    state = DecodeState(list(ids), 40, stop)
    if cfg is None:
        decode_ar(engine.runner, state)
    else:
        pool = NGramPool(cfg.ngram)
        pool.add_text(ids)
        decode_lookahead(engine.runner, state, cfg, pool)
    return state


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_stop_token_inside_accepted_run(tiny_engine, arch: str) -> None:
    """A stop token in the middle of an accepted n-gram ends the output right there, as AR does."""
    engine = tiny_engine(arch)
    cfg = LookaheadConfig(8, 4, 8)
    ids = engine.codec.encode(REPETITIVE)
    free = run_decoder(engine, ids, frozenset(), cfg)
    assert free.new == run_decoder(engine, ids, frozenset(), None).new

    # A token that first occurs strictly inside a multi-token step.
    stop_at = None
    pos = 0
    for accepted in free.accepted:
        for k in range(1, accepted):
            if free.new[pos + k] not in free.new[: pos + k]:
                stop_at = pos + k
                break
        if stop_at is not None:
            break
        pos += accepted
    assert stop_at is not None, f"no multi-token step introduces a new token: {free.accepted}"

    stop = frozenset({free.new[stop_at]})
    ar = run_decoder(engine, ids, stop, None)
    la = run_decoder(engine, ids, stop, cfg)
    assert ar.new == free.new[:stop_at]
    assert la.new == ar.new
    assert ar.stop_reason == la.stop_reason == "stop"
    check_stats(la.new, la.steps, la.accepted, cfg.ngram)


# -- real weights ------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_lookahead_equals_ar_on_bench_code(smollm2_engine, bench_cases: list[dict]) -> None:
    """8 bench cases: every config gives AR's tokens, and with G > 0 the pool saves steps on code.

    Configs rotate over the cases (2 each, token healing on for one of them) to keep CPU time
    down; AR and lookahead share one document, so the prefill is reused and only decoding reruns.
    """
    cases = bench_cases[:8]
    assert len(cases) == 8
    steps = {spec: [0, 0] for spec in REAL_CONFIGS}  # spec -> [lookahead steps, AR steps] on its cases
    for i, case in enumerate(cases):
        spec, heal = REAL_CONFIGS[i % 4], i < 4
        cfg = LookaheadConfig.parse(spec)
        kw = dict(document=f"lookahead-{case['id']}", max_tokens=24, heal=heal, type_through=False)
        ar = complete(smollm2_engine, case["prefix"], case["suffix"], decoding="ar", **kw)
        la = complete(smollm2_engine, case["prefix"], case["suffix"], decoding="lookahead", lookahead=cfg, **kw)
        assert la.tokens == ar.tokens, f"{case['id']} {spec} heal={heal}"
        assert la.text == ar.text
        assert la.prefill_tokens == 0 and la.reused_tokens == ar.prompt_tokens - 1  # only decoding reran
        check_stats(ar.tokens, ar.steps, ar.accepted_per_step, 1)
        check_stats(la.tokens, la.steps, la.accepted_per_step, cfg.ngram)
        steps[spec][0] += la.steps
        steps[spec][1] += ar.steps
    for spec, (la_steps, ar_steps) in steps.items():
        if LookaheadConfig.parse(spec).verify:
            assert la_steps < ar_steps, f"{spec}: {la_steps} lookahead steps vs {ar_steps} AR steps"
        else:
            assert la_steps == ar_steps, f"{spec}: G=0 verifies nothing, so it cannot save steps"
    guessing = [v for spec, v in steps.items() if LookaheadConfig.parse(spec).verify]
    assert sum(v[0] for v in guessing) < 0.85 * sum(v[1] for v in guessing), steps


# -- the pool and the step layout ----------------------------------------------------------------


def test_pool_lru_bound_per_key() -> None:
    """Each key keeps its `per_key` most recently seen continuations; re-adding refreshes one."""
    pool = NGramPool(3, per_key=4)
    for c in range(6):
        pool.add_ngram((7, c, c + 100))
    assert pool.candidates(None, 7, 10) == [(5, 105), (4, 104), (3, 103), (2, 102)]
    pool.add_ngram((7, 2, 102))  # seen again: now the most recent, so the next add evicts (3, 103)
    pool.add_ngram((7, 9, 109))
    assert pool.candidates(None, 7, 10) == [(9, 109), (2, 102), (5, 105), (4, 104)]
    assert pool.candidates(None, 7, 2) == [(9, 109), (2, 102)]
    assert pool.candidates(None, 8, 10) == []


def test_pool_pair_key_first_and_deduplicated() -> None:
    """Candidates keyed by the last two tokens rank first; a continuation is offered once."""
    pool = NGramPool(3)
    pool.add_text([1, 5, 6, 7])  # pair (1, 5) -> (6, 7); token 5 -> (6, 7); token 1 -> (5, 6)
    pool.add_text([2, 5, 8, 9])  # pair (2, 5) -> (8, 9); token 5 -> (8, 9), now the most recent
    assert pool.candidates(1, 5, 8) == [(6, 7), (8, 9)]  # pair hit first, despite being older
    assert pool.candidates(2, 5, 8) == [(8, 9), (6, 7)]  # (8, 9) is in both tables, listed once
    assert pool.candidates(1, 5, 8, key=1) == [(8, 9), (6, 7)]  # key=1: recency only
    assert pool.candidates(None, 5, 8) == [(8, 9), (6, 7)]
    assert pool.candidates(3, 5, 1) == [(8, 9)]


@pytest.mark.parametrize("spec", ["8,4,8", "3,5,3", "1,2,1", "4,3,0"])
def test_step_shape_layout(spec: str) -> None:
    """Positions and the local mask follow the module docstring's layout, row by row."""
    cfg = LookaheadConfig.parse(spec)
    W, L, G = cfg.window, cfg.ngram - 1, cfg.verify
    shape = step_shape(cfg)
    T = 1 + (W + G) * L
    assert shape.size == cfg.step_tokens == T
    rel, local = shape.rel_pos.tolist(), shape.local
    assert local.dtype == torch.bool and tuple(local.shape) == (T, T)

    def seen(r: int) -> set[int]:
        return set(torch.nonzero(local[r]).flatten().tolist())

    assert rel[0] == 0 and seen(0) == {0}
    for j in range(L):
        for i in range(W):
            r = 1 + j * W + i
            assert rel[r] == 1 + i + j
            expected = {0} | {1 + i2 for i2 in range(i)} | {1 + j2 * W + i for j2 in range(j + 1)}
            assert seen(r) == expected, (j, i)
            # Its context is a contiguous guessed continuation: one visible row per position below it.
            assert sorted(rel[c] for c in seen(r)) == list(range(rel[r] + 1))
    for g in range(G):
        for k in range(L):
            r = 1 + W * L + g * L + k
            assert rel[r] == 1 + k
            assert seen(r) == {0} | {1 + W * L + g * L + k2 for k2 in range(k + 1)}
    # No row sees a later row: the mask is lower-triangular, which keeps the block causal.
    assert not torch.triu(local, diagonal=1).any()
