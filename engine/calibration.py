"""How often each source's guesses are right, learned across requests, for the tree's budget.

Per (source, key, depth) bucket it counts the guesses whose parent was right (offered) and those that
were right too (accepted), smoothed towards a prior: a source's belief in a token is that rate. Keys are
registered once as small integers, so that the trie stores them in an array and scoring and learning run
compiled (`engine/tree.py`), with no Python between two GPU steps. (`TokenTrie.score` computes the same
smoothed rate as `prob`: each compiled function calls only those of its own file, because numba's cache
notices changes to that file alone.)
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .sources import PROB_BOUNDS, PROB_KEYS

# Prior acceptance chance of a source's token before any evidence (weight PRIOR_WEIGHT observations).
PRIORS = {"prompt": 0.4, "history": 0.5, "jacobi": 0.2, "recycling": 0.3, "heal": 0.5}
PRIOR_WEIGHT = 4.0
DEPTHS = 9  # depths 1..8 are counted apart; deeper guesses share the last bucket
MAX_SOURCES = 8  # sources a trie node can record (the trie's key columns)


class Calibration:
    """Counts per (source, key) id and depth, shared by every request of an engine."""

    def __init__(self):
        self.ids: dict[tuple[str, str], int] = {}  # (source, key) -> key id
        self.names: list[tuple[str, str]] = []
        self.sources: dict[str, int] = {}  # source -> its column in a trie's keys
        self.column = np.zeros(16, np.int64)  # key id -> its source's column
        self.prior = np.zeros(16)
        self.accepted = np.zeros((16, DEPTHS))
        self.offered = np.zeros((16, DEPTHS))
        self.recycling_keys = np.array([self.key("recycling", k) for k in PROB_KEYS], np.int64)
        self.prob_bounds = np.array(PROB_BOUNDS)

    def key(self, source: str, key: str) -> int:
        """The id of a source's calibration bucket, registered on first use."""
        found = self.ids.get((source, key))
        if found is not None:
            return found
        column = self.sources.get(source)
        if column is None:
            if len(self.sources) == MAX_SOURCES:
                raise ValueError(f"more than {MAX_SOURCES} draft sources")
            column = self.sources[source] = len(self.sources)
        k = self.ids[source, key] = len(self.names)
        self.names.append((source, key))
        if k == len(self.prior):
            grow = len(self.prior)
            self.column = np.concatenate([self.column, np.zeros(grow, np.int64)])
            self.prior = np.concatenate([self.prior, np.zeros(grow)])
            self.accepted = np.concatenate([self.accepted, np.zeros((grow, DEPTHS))])
            self.offered = np.concatenate([self.offered, np.zeros((grow, DEPTHS))])
        self.column[k] = column
        self.prior[k] = float(key[1:]) if key.startswith("p") else PRIORS.get(source, 0.3)
        return k

    def prob(self, source: str, key: str, depth: int) -> float:
        """A source's belief that its guess at `depth` is right, given that the guess before it is."""
        k, d = self.key(source, key), min(depth, DEPTHS - 1)
        return float((self.accepted[k, d] + self.prior[k] * PRIOR_WEIGHT) / (self.offered[k, d] + PRIOR_WEIGHT))

    @property
    def counts(self) -> dict[tuple[str, str, int], list[float]]:
        """(source, key, depth) -> [accepted, offered], for every bucket with a guess in it."""
        rows, depths = np.nonzero(self.offered[: len(self.names)])
        return {(*self.names[k], int(d)): [float(self.accepted[k, d]), float(self.offered[k, d])]
                for k, d in zip(rows, depths, strict=True)}

    def learn(self, trie, truth: list[int]) -> None:
        """Every node whose parent lies on the true path was a guess at truth[depth - 1]: count it."""
        count_guesses(trie.token, trie.parent, trie.depth, trie.keys, trie.size, np.asarray(truth, np.int64),
                      self.accepted, self.offered)


@njit(cache=True)
def count_guesses(token, parent, depth, keys, size, truth, accepted, offered):
    on_path = np.zeros(size, np.bool_)
    on_path[0] = True
    for i in range(1, size):  # parents come first
        d = depth[i]
        if not on_path[parent[i]] or d > len(truth):
            continue
        right = token[i] == truth[d - 1]
        on_path[i] = right
        bucket = min(d, DEPTHS - 1)
        for k in keys[i]:
            if k >= 0:
                accepted[k, bucket] += right
                offered[k, bucket] += 1.0
