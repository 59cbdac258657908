"""The Jacobi window (lookahead decoding's guesses) as a draft source.

The window is W columns x L levels of guessed tokens run in the same step as the tree (v1's
layout, `lookahead.step_shape` with no candidates): each step shifts the levels, and each column's
trajectory becomes an n-gram in a pool keyed by its first token. Drafts are the pool's
continuations of the last committed token (pair-keyed n-grams first).
"""

from __future__ import annotations

from ..lookahead import LookaheadConfig, NGramPool, step_shape
from ..runner import StepShape
from . import Draft


class JacobiWindow:
    name = "jacobi"

    def __init__(self, window: int, levels: int, seq: list[int], pool: NGramPool | None = None):
        self.window, self.levels = window, levels
        self.pool = pool if pool is not None and pool.n == levels + 1 else NGramPool(levels + 1)
        n = window * levels
        # Start from the prompt's own recent tokens: cheap, deterministic guesses.
        seed = seq[-n:] if len(seq) >= n else (seq * (n // max(1, len(seq)) + 1))[:n]
        self.grid = [list(seed[j * window : (j + 1) * window]) for j in range(levels)]

    @property
    def rows(self) -> int:
        return self.window * self.levels

    def layout(self) -> StepShape:
        """Row 0 (the last committed token) and the window's rows 1..rows, as lookahead v1 lays them out."""
        return step_shape(LookaheadConfig(self.window, self.levels + 1, 0))

    def tokens(self) -> list[int]:
        return [t for level in self.grid for t in level]

    def update(self, pred: list[int]) -> None:
        """Shift the levels with this step's predictions (pred[r] for step row r) and pool the trajectories."""
        W, L = self.window, self.levels
        newest = [pred[1 + (L - 1) * W + i] for i in range(W)]
        for i in range(W):
            self.pool.add_ngram(tuple(self.grid[j][i] for j in range(L)) + (newest[i],))
        self.grid = self.grid[1:] + [newest]

    def propose(self, seq: list[int], depth: int, limit: int) -> list[Draft]:
        prev = seq[-2] if len(seq) > 1 else None
        return [Draft(self.name, cont[:depth]) for cont in self.pool.candidates(prev, seq[-1], limit)]

    def observe(self, seq: list[int], new: int) -> None:
        """Committed text is prompt lookup's business; the pool only keeps what the window found."""
