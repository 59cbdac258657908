"""The Jacobi window (lookahead decoding's guesses) as a draft source.

The window is W columns x L levels of guessed tokens run in the same step as the tree (v1's
layout, `lookahead.step_shape` with no candidates): each step shifts the levels, and each column's
trajectory becomes an n-gram in a pool keyed by its first token. Drafts are the pool's
continuations of the last committed token (pair-keyed n-grams first).
"""

from __future__ import annotations

from ..lookahead import JacobiGrid, LookaheadConfig, NGramPool, step_shape
from ..runner import StepShape
from . import Draft


class JacobiWindow:
    name = "jacobi"

    def __init__(self, window: int, levels: int, seq: list[int], pool: NGramPool | None = None):
        self.grid = JacobiGrid(window, levels, seq)
        self.pool = pool if pool is not None and pool.n == levels + 1 else NGramPool(levels + 1)

    @property
    def rows(self) -> int:
        return self.grid.window * self.grid.levels

    def layout(self) -> StepShape:
        """Row 0 (the last committed token) and the window's rows 1..rows, as lookahead v1 lays them out."""
        return step_shape(LookaheadConfig(self.grid.window, self.grid.levels + 1, 0))

    def tokens(self) -> list[int]:
        return self.grid.tokens()

    def update(self, pred: list[int]) -> None:
        """Shift the levels with this step's predictions (pred[r] for step row r) and pool the trajectories."""
        self.grid.update(pred, self.pool)

    def propose(self, seq: list[int], depth: int, limit: int) -> list[Draft]:
        prev = seq[-2] if len(seq) > 1 else None
        return [Draft(self.name, cont[:depth]) for cont in self.pool.candidates(prev, seq[-1], limit)]

    def observe(self, seq: list[int], new: int) -> None:
        """Committed text is prompt lookup's business; the pool only keeps what the window found."""
