"""Lookahead decoding: Jacobi guesses and n-gram verification in one fixed-shape forward.

Step layout (T = 1 + (W + G)(N - 1) query tokens, base slot p = len(seq) - 1):
  row 0                 the last committed token, position p
  window (j, i)         level j < N-1, column i < W: position p + 1 + i + j; it sees level 0's
                        columns before i and its own column's levels up to j, so its context
                        is a contiguous guessed continuation of length i + j + 1
  candidate (g, k)      guess g < G, token k < N-1: position p + 1 + k; sees its own earlier tokens
Each column of the window yields an n-gram per step (its N-1 levels plus the new guess) for the
pool; candidates come from the pool keyed by the last committed token(s). The longest candidate
prefix that the step's own greedy predictions agree with is committed, plus one bonus token, so
the output is exactly greedy decoding's. Only committed rows' K/V are moved into place.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch

from .decoding import DecodeState, decode_ar
from .runner import Runner, StepShape


@dataclass(frozen=True)
class LookaheadConfig:
    window: int = 8  # W: Jacobi columns guessed in parallel
    ngram: int = 4  # N: n-gram size; up to N tokens committed per step
    verify: int = 8  # G: pool candidates verified per step
    key: int = 2  # candidates keyed by the last `key` committed tokens first (1 or 2)
    kind: ClassVar[str] = "lookahead"  # the request decoding (and request field) that runs it

    @classmethod
    def parse(cls, text: str) -> LookaheadConfig:
        parts = [int(x) for x in text.replace("x", ",").split(",") if x.strip()]
        if len(parts) not in (3, 4) or min(parts[:3]) < 0 or parts[0] < 1 or parts[1] < 1:
            raise ValueError(f"lookahead config must be W,N,G with W>=1, N>=1, G>=0 (got '{text}')")
        return cls(*parts)

    @property
    def step_tokens(self) -> int:
        return 1 + (self.window + self.verify) * (self.ngram - 1)

    def shape(self) -> StepShape:
        return step_shape(self)

    def knobs(self) -> dict:
        """The config's settings by name, for benchmark results."""
        return {"window": self.window, "ngram": self.ngram, "verify": self.verify, "key": self.key}

    def __str__(self) -> str:
        text = f"{self.window},{self.ngram},{self.verify}"
        return text if self.key == 2 else f"{text},{self.key}"


@lru_cache(maxsize=64)
def step_shape(cfg: LookaheadConfig) -> StepShape:
    W, L, G = cfg.window, cfg.ngram - 1, cfg.verify
    T = cfg.step_tokens
    rel = torch.zeros(T, dtype=torch.long)
    local = torch.zeros(T, T, dtype=torch.bool)
    local[:, 0] = True
    for j in range(L):
        for i in range(W):
            r = 1 + j * W + i
            rel[r] = 1 + i + j
            for i2 in range(i):
                local[r, 1 + i2] = True  # level 0, earlier columns
            for j2 in range(j + 1):
                local[r, 1 + j2 * W + i] = True  # this column, levels up to j
    for g in range(G):
        for k in range(L):
            r = 1 + W * L + g * L + k
            rel[r] = 1 + k
            local[r, 1 + W * L + g * L : r + 1] = True
    return StepShape(f"lookahead{cfg.window}x{cfg.ngram}x{cfg.verify}", rel, local, logits=True, moves=True)


class NGramPool:
    """Continuations of length N-1 keyed by their preceding token (and token pair), LRU-bounded."""

    def __init__(self, ngram: int, per_key: int = 16):
        self.n = ngram
        self.per_key = per_key
        self.by_token: dict[int, OrderedDict[tuple[int, ...], None]] = {}
        self.by_pair: dict[tuple[int, int], OrderedDict[tuple[int, ...], None]] = {}

    def _put(self, table: dict, key, cont: tuple[int, ...]) -> None:
        entries = table.get(key)
        if entries is None:
            entries = table[key] = OrderedDict()
        elif cont in entries:
            entries.move_to_end(cont)
            return
        entries[cont] = None
        if len(entries) > self.per_key:
            entries.popitem(last=False)

    def add_text(self, tokens: list[int]) -> None:
        """Seed from real text (the prompt, committed output): indexed by token and by pair."""
        n = self.n
        for i in range(len(tokens) - n + 1):
            cont = tuple(tokens[i + 1 : i + n])
            self._put(self.by_token, tokens[i], cont)
            if i > 0:
                self._put(self.by_pair, (tokens[i - 1], tokens[i]), cont)

    def add_ngram(self, ngram: tuple[int, ...]) -> None:
        self._put(self.by_token, ngram[0], ngram[1:])

    def candidates(self, prev: int | None, last: int, limit: int, key: int = 2) -> list[tuple[int, ...]]:
        found: list[tuple[int, ...]] = []
        tables = []
        if key >= 2 and prev is not None:
            tables.append(self.by_pair.get((prev, last)))
        tables.append(self.by_token.get(last))
        for entries in tables:
            if not entries:
                continue
            for cont in reversed(entries):  # most recent first
                if cont not in found:
                    found.append(cont)
                    if len(found) >= limit:
                        return found
        return found


class JacobiGrid:
    """The lookahead branch: W columns x L levels of guessed tokens, laid out level after level in step rows
    1..W*L. Each step the levels shift up, the last level's predictions become the newest level, and each
    column contributes the n-gram along its trajectory (L guesses + the prediction) to the pool."""

    def __init__(self, window: int, levels: int, seq: list[int]):
        self.window, self.levels = window, levels
        n = window * levels
        # Start from the prompt's own recent tokens: cheap, deterministic guesses.
        seed = seq[-n:] if len(seq) >= n else (seq * (n // max(1, len(seq)) + 1))[:n]
        self.grid = [list(seed[j * window : (j + 1) * window]) for j in range(levels)]

    def tokens(self) -> list[int]:
        return [t for level in self.grid for t in level]

    def update(self, pred: list[int], pool: NGramPool) -> None:
        """Jacobi iteration with this step's predictions (pred[r] for step row r)."""
        W, L = self.window, self.levels
        newest = [pred[1 + (L - 1) * W + i] for i in range(W)]
        for i in range(W):
            pool.add_ngram(tuple(self.grid[j][i] for j in range(L)) + (newest[i],))
        self.grid = self.grid[1:] + [newest]


def decode_lookahead(runner: Runner, state: DecodeState, cfg: LookaheadConfig, pool: NGramPool) -> None:
    if cfg.ngram < 2:
        return decode_ar(runner, state)
    shape = step_shape(cfg)
    W, L, G = cfg.window, cfg.ngram - 1, cfg.verify
    first_cand = 1 + W * L
    seq = state.seq
    window = JacobiGrid(W, L, seq)
    while not state.done():
        p = len(seq) - 1
        cands = pool.candidates(seq[-2] if len(seq) > 1 else None, seq[-1], G, cfg.key) if G else []
        tokens = [seq[-1], *window.tokens()]
        for cand in cands:
            tokens.extend(cand)
        tokens.extend([seq[-1]] * (shape.size - len(tokens)))  # padding candidates
        argmax, _ = runner.step(shape, tokens, p)
        pred = argmax.tolist()

        # Verification: the longest candidate prefix greedy decoding agrees with.
        best, best_len = 0, 0
        for g, cand in enumerate(cands):
            row = first_cand + g * L
            a = 0
            while a < L and cand[a] == (pred[0] if a == 0 else pred[row + a - 1]):
                a += 1
            if a > best_len:
                best, best_len = g, a
        if best_len:
            row = first_cand + best * L
            commit = list(cands[best][:best_len]) + [pred[row + best_len - 1]]
        else:
            commit = [pred[0]]

        window.update(pred, pool)

        kept = state.commit(commit)
        moved = min(best_len, kept - 1)
        if moved > 0:
            row = first_cand + best * L
            runner.move_slots([p + row + k for k in range(moved)], [p + 1 + k for k in range(moved)])
        if best_len:
            state.pool_hits += 1
        if kept:
            pool.add_text(seq[-(cfg.ngram + kept - 1) :])  # the n-grams that end in new tokens
