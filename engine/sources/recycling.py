"""Token Recycling (arXiv 2408.08696): the model's own top-k guesses, taken for free from each verify pass.

Every row of a step predicts a distribution over the token after its input token. Those
predictions are usually thrown away; here they update an adjacency table "token -> its top-k
successors, with their probabilities", and the next steps grow a draft tree from the last
committed token through the table, best-first by the product of the stored probabilities.
A second table keyed by (previous token, token) is consulted first: with the small trees a CPU
can afford, the sharper guess pays. The tables belong to the model, not to a document: they are
shared by every request.
"""

from __future__ import annotations

import heapq

import torch
from torch import Tensor

from . import Draft

TOP_K = 8
MAX_PAIRS = 1 << 18  # (previous, token) entries kept (~100 MB at most); the oldest quarter goes when full


class Recycling:
    name = "recycling"

    def __init__(self, top_k: int = TOP_K, max_pairs: int = MAX_PAIRS):
        self.top_k = top_k
        self.max_pairs = max_pairs
        self.table: dict[int, tuple[tuple[int, ...], tuple[float, ...]]] = {}  # token -> (successors, probs)
        self.pairs: dict[tuple[int, int], tuple[tuple[int, ...], tuple[float, ...]]] = {}  # (previous, token) -> same

    @staticmethod
    @torch.no_grad()
    def top(logits: Tensor, rows: int, k: int) -> tuple[list[list[int]], list[list[float]]]:
        """Top-k successor ids and probabilities of the first `rows` rows, computed on the logits' device."""
        x = logits[:rows].float()
        values, ids = x.topk(k, dim=-1)
        probs = (values - x.logsumexp(-1, keepdim=True)).exp()
        return ids.tolist(), probs.tolist()

    def learn(self, tokens: list[int], logits: Tensor, previous: list[int | None] | None = None) -> None:
        """Row i's input token was tokens[i], after previous[i] (None: unknown); its logits say what follows."""
        ids, probs = self.top(logits, len(tokens), self.top_k)
        for i, (token, succ, p) in enumerate(zip(tokens, ids, probs, strict=True)):
            entry = (tuple(succ), tuple(p))
            self.table[token] = entry
            if previous is not None and previous[i] is not None:
                self.pairs[previous[i], token] = entry
        if len(self.pairs) > self.max_pairs:  # a daemon runs for days: keep the newest entries
            for key in list(self.pairs)[: len(self.pairs) // 4]:
                del self.pairs[key]

    def successors(self, prev: int | None, token: int) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
        return self.pairs.get((prev, token)) or self.table.get(token)

    def propose(self, seq: list[int], depth: int, limit: int) -> list[Draft]:
        """Root-to-leaf paths of the `limit`-node tree that is most probable under the table."""
        context = (seq[-2] if len(seq) > 1 else None, seq[-1])
        # Best-first expansion: (-probability of the path, tie order, path, per-token probabilities).
        heap: list[tuple[float, int, tuple[int, ...], tuple[float, ...]]] = []
        order = 0

        def push(path: tuple[int, ...], probs: tuple[float, ...], p_path: float) -> None:
            nonlocal order
            full = context + path
            known = self.successors(full[-2], full[-1]) if len(path) < depth else None
            if known is None:
                return
            for t, q in zip(*known, strict=True):
                order += 1
                heapq.heappush(heap, (-p_path * q, order, path + (t,), probs + (q,)))

        push((), (), 1.0)
        chosen: list[tuple[tuple[int, ...], tuple[float, ...]]] = []
        while heap and len(chosen) < limit:
            neg, _, path, probs = heapq.heappop(heap)
            chosen.append((path, probs))
            push(path, probs, -neg)
        prefixes = {path[:-1] for path, _ in chosen}
        return [Draft(self.name, path, probs=probs) for path, probs in chosen if path not in prefixes]
