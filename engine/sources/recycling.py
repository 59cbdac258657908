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

from .. import kernels

TOP_K = 8
MAX_PAIRS = 1 << 18  # (previous, token) entries kept (~100 MB at most); the oldest quarter goes when full

Successors = tuple[tuple[int, ...], tuple[float, ...]]  # successor ids, most probable first, and their probabilities


class Recycling:
    name = "recycling"

    def __init__(self, top_k: int = TOP_K, max_pairs: int = MAX_PAIRS):
        self.top_k = top_k
        self.max_pairs = max_pairs
        self.table: dict[int, Successors] = {}  # token -> its successors
        self.pairs: dict[tuple[int, int], Successors] = {}  # (previous, token) -> its successors

    @torch.no_grad()
    def top(self, logits: Tensor, rows: int) -> tuple[Tensor, Tensor]:
        """Top-k successor ids and probabilities of the first `rows` rows, on the logits' device. On a GPU
        this only queues the work behind the step: reading the result is what waits for it."""
        if kernels.usable(logits):
            return kernels.top_k_probs(logits[:rows], self.top_k)
        x = logits[:rows].float()
        values, ids = x.topk(self.top_k, dim=-1)
        return ids, (values - x.logsumexp(-1, keepdim=True)).exp()

    def learn(self, tokens: list[int], logits: Tensor, previous: list[int | None] | None = None) -> None:
        """Row i's input token was tokens[i], after previous[i] (None: unknown); its logits say what follows."""
        ids, probs = self.top(logits, len(tokens))
        self.remember(tokens, ids.tolist(), probs.tolist(), previous)

    def remember(self, tokens: list[int], ids: list[list[int]], probs: list[list[float]],
                 previous: list[int | None] | None = None) -> None:
        """`learn` with the top-k already read back: ids[i] and probs[i] follow tokens[i]."""
        pairs, table = self.pairs, self.table
        for token, row_ids, row_probs, before in zip(tokens, ids, probs, previous or [None] * len(tokens), strict=True):
            # Tuples, not the rows' lists: the garbage collector stops tracking a tuple of numbers, and it
            # would otherwise walk every entry of these large tables.
            entry = table[token] = (tuple(row_ids), tuple(row_probs))
            if before is not None:
                pairs[before, token] = entry
        if len(pairs) > self.max_pairs:  # a daemon runs for days: keep the newest entries
            for key in list(pairs)[: len(pairs) // 4]:
                del pairs[key]

    def successors(self, prev: int | None, token: int) -> Successors | None:
        return self.pairs.get((prev, token)) or self.table.get(token)

    def tree(self, seq: list[int], depth: int, limit: int) -> tuple[list[int], list[int], list[float]]:
        """The `limit`-node tree most probable under the table, grown from the last committed token:
        (token, parent node (-1: the root), the token's own probability) per node, parents first.

        Best-first over "the j-th successor of node n": successors are stored most probable first,
        so popping one only needs its next sibling and its own first successor on the heap."""
        tokens: list[int] = []
        parents: list[int] = []
        probs: list[float] = []
        root = seq[-1]
        first = self.successors(seq[-2] if len(seq) > 1 else None, root)
        if first is None or limit < 1:
            return tokens, parents, probs
        pairs, table = self.pairs, self.table
        push, pop = heapq.heappush, heapq.heappop
        # (-probability of the path, tie order, parent node, the parent path's probability, successors, j, depth)
        heap = [(-first[1][0], 0, -1, 1.0, first, 0, 1)]
        order = 0
        while heap and len(tokens) < limit:
            neg, _, parent, p_parent, succ, j, node_depth = pop(heap)
            node = len(tokens)
            ids, ps = succ
            token = ids[j]
            tokens.append(token)
            parents.append(parent)
            probs.append(ps[j])
            if j + 1 < len(ids):
                order += 1
                push(heap, (-p_parent * ps[j + 1], order, parent, p_parent, succ, j + 1, node_depth))
            if node_depth < depth:
                below = pairs.get((tokens[parent] if parent >= 0 else root, token)) or table.get(token)
                if below is not None:
                    order += 1
                    push(heap, (neg * below[1][0], order, node, -neg, below, 0, node_depth + 1))
        return tokens, parents, probs
