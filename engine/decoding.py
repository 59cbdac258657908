"""Greedy autoregressive decoding, and what every decoder shares (token healing: `engine/healing.py`).

Invariant for all decoders: `seq` is the committed token sequence and the KV cache holds
valid K/V for every token but the last, at slot == position. A step feeds `seq[-1]` at slot
`len(seq) - 1` and commits one token (AR) or several (lookahead).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .runner import DECODE, Runner

# Called after each step with every token committed so far; returns a stop reason to end
# decoding there (a stop rule fired), or None to go on.
OnCommit = Callable[[list[int]], str | None]
Cancelled = Callable[[], bool]  # polled between steps


@dataclass
class DecodeState:
    seq: list[int]
    max_new: int
    stop_ids: frozenset[int]
    on_commit: OnCommit | None = None
    cancelled: Cancelled | None = None
    new: list[int] = field(default_factory=list)
    steps: int = 0
    accepted: list[int] = field(default_factory=list)  # tokens committed per step
    step_ms: list[float] = field(default_factory=list)
    pool_hits: int = 0  # lookahead steps that accepted at least one guessed token
    by_source: dict[str, int] = field(default_factory=dict)  # tree decoding: guessed tokens accepted, per source
    stop_reason: str | None = None  # "stop" (a stop token), "length", "cancelled", or a stop rule's name
    # When the last step was committed (at first: when decoding began). A step's time runs from there to its
    # own commit, so the steps add up to the whole decode, host work between two steps and set-up included.
    clock: float = field(default_factory=time.perf_counter)

    def done(self) -> bool:
        if self.stop_reason is None and self.cancelled is not None and self.cancelled():
            self.stop_reason = "cancelled"
        if self.stop_reason is None and len(self.new) >= self.max_new:
            self.stop_reason = "length"
        return self.stop_reason is not None

    def commit(self, tokens: list[int]) -> int:
        """Append a step's tokens, cut at a stop token or the length limit; returns how many kept."""
        kept: list[int] = []
        for t in tokens:
            if t in self.stop_ids:
                self.stop_reason = "stop"
                break
            if len(self.new) + len(kept) >= self.max_new:
                break
            kept.append(t)
        self.seq.extend(kept)
        self.new.extend(kept)
        self.steps += 1
        self.accepted.append(len(kept))
        now = time.perf_counter()
        self.step_ms.append((now - self.clock) * 1e3)
        self.clock = now
        if self.on_commit is not None and kept and self.stop_reason is None:
            self.stop_reason = self.on_commit(self.new)
        return len(kept)


def decode_ar(runner: Runner, state: DecodeState) -> None:
    """Plain greedy decoding: one forward of one token per committed token."""
    while not state.done():
        argmax, _ = runner.step(DECODE, [state.seq[-1]], len(state.seq) - 1)
        state.commit([int(argmax[0])])
