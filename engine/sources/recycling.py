"""Token Recycling (arXiv 2408.08696): the model's own top-k guesses, taken for free from each verify pass.

Every row of a step predicts a distribution over the token after its input token. Those
predictions are usually thrown away; here they update an adjacency table "token -> its top-k
successors, with their probabilities", and the next steps grow a draft tree from the last
committed token through the table, best-first by the product of the stored probabilities.
A second table keyed by (previous token, token) is consulted first: with the small trees a CPU
can afford, the sharper guess pays. The tables belong to the model, not to a document: they are
shared by every request.

Both run between two GPU steps, so they are arrays walked by compiled code: the token table is dense
(a row per vocabulary id), the pair table a ring of rows found through an open-addressing hash table.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit
from torch import Tensor

from .. import kernels
from ..calibration import Calibration
from ..tree import TokenTrie

TOP_K = 8
MAX_PAIRS = 1 << 18  # (previous, token) rows kept (~17 MB); the oldest goes when a new one comes

Successors = tuple[tuple[int, ...], tuple[float, ...]]  # successor ids, most probable first, and their probabilities


class Recycling:
    name = "recycling"

    def __init__(self, top_k: int = TOP_K, max_pairs: int = MAX_PAIRS, vocab: int = 1 << 12,
                 seed: np.ndarray | None = None):
        """`vocab`: the model's vocabulary size (the token table's rows); `seed`: the token table to start from
        (`engine/recycling_prior.py`: each token's successors with nothing before it), copied, else empty."""
        if vocab > 1 << 24:
            raise ValueError(f"a {vocab}-token vocabulary has ids float32 cannot hold exactly")
        self.top_k = top_k
        # A row is one token's successors: ids (float32, exact below 2**24; -1: none known), then their
        # probabilities, 64 bytes at top-8, so that reading a row costs one cache line, not two.
        if seed is not None and seed.shape != (vocab, 2, top_k):
            raise ValueError(f"a seed table of shape {seed.shape} does not fit {vocab} tokens' top-{top_k}")
        self.table = empty_rows(vocab, top_k) if seed is None else seed.copy()  # token -> its successors
        self.ring = empty_rows(max_pairs, top_k)  # (previous, token) -> its successors, the oldest pair replaced
        self.ring_keys = np.full(max_pairs, -1, np.int64)  # the pair each ring row holds
        self.written = np.zeros(1, np.int64)  # rows the ring has been given (the next one goes to written % size)
        self.pairs = PairIndex(max_pairs)  # pair_key(previous, token) -> its ring row

    def top(self, logits: Tensor, rows: int) -> tuple[Tensor, Tensor]:
        """Top-k successor ids and probabilities of the first `rows` rows, on the logits' device. On a GPU
        this only queues the work behind the step: reading the result is what waits for it."""
        return top_successors(logits, rows, self.top_k)

    def learn(self, tokens: list[int], logits: Tensor, previous: list[int | None] | None = None) -> None:
        """Row i's input token was tokens[i], after previous[i] (None: unknown); its logits say what follows."""
        ids, probs = self.top(logits, len(tokens))
        before = np.array([-1 if p is None else p for p in previous or [None] * len(tokens)], np.int64)
        self.remember(np.asarray(tokens, np.int64), ids.cpu().numpy(), probs.cpu().numpy(), before)

    def remember(self, tokens: np.ndarray, ids: np.ndarray, probs: np.ndarray, previous: np.ndarray) -> None:
        """`learn` with the top-k already read back: ids[i] and probs[i] follow tokens[i], which followed
        previous[i] (-1: unknown)."""
        past = store_rows(tokens, ids, probs, previous, self.table, self.ring, self.ring_keys, self.written,
                          self.pairs.slots)
        if past >= 0:
            raise ValueError(f"token {past} is past the recycling table's {len(self.table)} rows")

    def successors(self, prev: int | None, token: int) -> Successors | None:
        """What the tables say follows `token` after `prev` (the pair's row, else the token's)."""
        kind, row = successor_row(-1 if prev is None else prev, token, self.table, self.pairs.slots)
        if kind < 0:
            return None
        successors = (self.ring if kind == 1 else self.table)[row]
        return tuple(int(t) for t in successors[0]), tuple(successors[1].tolist())

    def grow(self, trie: TokenTrie, seq: list[int], depth: int, limit: int, calibration: Calibration,
             under: int = 0) -> int:
        """Add to `trie` the `limit`-node tree most probable under the tables, grown from the last token of `seq`
        (trie node `under`: by default the root, the last committed token), each node keyed by the probability
        bucket of its own token; returns the nodes grown.

        Best-first over "the j-th successor of node n": successors are stored most probable first,
        so taking one only needs its next sibling and its own first successor on the heap."""
        prev = seq[-2] if len(seq) > 1 else -1
        tokens, parents, keys = best_first(seq[-1], prev, depth, limit, calibration.recycling_keys,
                                           calibration.prob_bounds, self.table, self.ring, self.pairs.slots)
        trie.graft(tokens, parents, keys, calibration.sources[self.name], under)
        return len(tokens)


@torch.no_grad()
def top_successors(logits: Tensor, rows: int, k: int) -> tuple[Tensor, Tensor]:
    """The k most probable next tokens of each of the first `rows` rows of `logits`, and their probabilities."""
    if kernels.usable(logits):
        return kernels.top_k_probs(logits[:rows], k)
    x = logits[:rows].float()
    values, ids = x.topk(k, dim=-1)
    return ids, (values - x.logsumexp(-1, keepdim=True)).exp()


def empty_rows(n: int, top_k: int) -> np.ndarray:
    rows = np.zeros((n, 2, top_k), np.float32)
    rows[:, 0] = -1
    return rows


class PairIndex:
    """pair_key -> ring row, an open-addressing hash table (linear probing, deletions by backward shift) whose
    slot holds key and row side by side: one cache line a lookup, where a numba typed dict cost ~25 ns a lookup
    and ~1 µs to pass to each compiled call."""

    def __init__(self, capacity: int):
        size = 1 << (2 * capacity - 1).bit_length()  # at most half full
        self.slots = np.full((size, 2), -1, np.int64)  # (key, its ring row); key -1: empty

    def __len__(self) -> int:
        return int((self.slots[:, 0] >= 0).sum())

    def __contains__(self, key: int) -> bool:
        return find_pair(self.slots, key) >= 0


@njit(cache=True)
def pair_key(prev, token):
    return (prev << 32) | token


@njit(cache=True)
def home_slot(slots, key):
    return np.int64((np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)) & (len(slots) - 1)


@njit(cache=True)
def slot_of(slots, key):
    """The slot holding `key`, else the empty slot where it would go."""
    mask = len(slots) - 1
    i = home_slot(slots, key)
    while slots[i, 0] >= 0 and slots[i, 0] != key:
        i = (i + 1) & mask
    return i


@njit(cache=True)
def find_pair(slots, key):
    i = slot_of(slots, key)
    return slots[i, 1] if slots[i, 0] == key else -1


@njit(cache=True)
def drop_pair(slots, key):
    """Remove `key`, moving back each later entry of its run that may take the freed slot."""
    mask = len(slots) - 1
    i = slot_of(slots, key)
    if slots[i, 0] != key:
        return
    j = i
    while True:
        j = (j + 1) & mask
        if slots[j, 0] < 0:
            break
        if ((j - home_slot(slots, slots[j, 0])) & mask) >= ((j - i) & mask):  # the freed slot is on its probe path
            slots[i, 0], slots[i, 1] = slots[j, 0], slots[j, 1]
            i = j
    slots[i, 0] = -1


@njit(cache=True)
def store_rows(tokens, ids, probs, previous, table, ring, ring_keys, written, slots):
    """Returns -1, or a token past the table's rows (then nothing was stored: compiled code checks no index)."""
    for t in tokens:
        if t >= len(table):
            return t
    size = len(ring_keys)
    for r in range(len(tokens)):
        t = tokens[r]
        for j in range(ids.shape[1]):
            table[t, 0, j], table[t, 1, j] = ids[r, j], probs[r, j]
        if previous[r] < 0:
            continue
        key = pair_key(previous[r], t)
        i = slot_of(slots, key)
        if slots[i, 0] == key:
            row = slots[i, 1]
        else:  # a new pair takes the oldest row
            row = written[0] % size
            written[0] += 1
            if ring_keys[row] >= 0:
                drop_pair(slots, ring_keys[row])
                i = slot_of(slots, key)  # the drop may have moved entries
            slots[i, 0], slots[i, 1] = key, row
            ring_keys[row] = key
        for j in range(ids.shape[1]):
            ring[row, 0, j], ring[row, 1, j] = ids[r, j], probs[r, j]
    return -1


@njit(cache=True)
def successor_row(prev, token, table, slots):
    """(1, the pair's ring row) or (0, the token's table row); (-1, -1) where neither is known."""
    if prev >= 0:
        row = find_pair(slots, pair_key(prev, token))
        if row >= 0:
            return 1, row
    if token < len(table) and table[token, 0, 0] >= 0:
        return 0, token
    return -1, -1


@njit(cache=True)
def best_first(root, prev, max_depth, limit, bucket_keys, bounds, table, ring, slots):
    """(token, parent node (-1: the root), calibration key) of each node, parents first."""
    tokens, parents, keys = np.empty(limit, np.int64), np.empty(limit, np.int64), np.empty(limit, np.int64)
    depth = np.empty(limit, np.int64)
    kind, row = successor_row(prev, root, table, slots)
    if kind < 0 or limit < 1:
        return tokens[:0], parents[:0], keys[:0]
    # Heap entries (ordered by -path probability, then age): the j-th successor, in row `row` of table `kind`,
    # of node `at` (-1: the root) whose path has probability `p_at`.
    cap = 2 * limit + 2
    neg, age = np.empty(cap), np.empty(cap, np.int64)
    e_at, e_p, e_kind, e_row, e_j = (np.empty(cap, np.int64), np.empty(cap), np.empty(cap, np.int64),
                                     np.empty(cap, np.int64), np.empty(cap, np.int64))
    heap = np.empty(cap, np.int64)
    first_p = np.float64(ring[row, 1, 0] if kind == 1 else table[row, 1, 0])
    neg[0], age[0], e_at[0], e_p[0], e_kind[0], e_row[0], e_j[0] = -first_p, 0, -1, 1.0, kind, row, 0
    heap[0], entries, n, grown = 0, 1, 1, 0
    while n > 0 and grown < limit:
        top = heap[0]
        n -= 1
        heap[0] = heap[n]
        sift_down(heap, n, neg, age)
        at, p_at, kind, row, j = e_at[top], e_p[top], e_kind[top], e_row[top], e_j[top]
        successors = ring[row] if kind == 1 else table[row]
        ids, ps = successors[0], successors[1]
        p = np.float64(ps[j])
        node = grown
        grown += 1
        tokens[node], parents[node] = np.int64(ids[j]), at
        keys[node] = bucket_keys[max(np.searchsorted(bounds, p, side="right") - 1, 0)]
        depth[node] = 1 if at < 0 else depth[at] + 1
        if j + 1 < len(ids):
            neg[entries], age[entries], e_at[entries], e_p[entries] = -p_at * np.float64(ps[j + 1]), entries, at, p_at
            e_kind[entries], e_row[entries], e_j[entries] = kind, row, j + 1
            heap[n] = entries
            entries += 1
            n += 1
            sift_up(heap, n - 1, neg, age)
        if depth[node] < max_depth:
            below_kind, below = successor_row(root if at < 0 else tokens[at], tokens[node], table, slots)
            if below_kind >= 0:
                first = np.float64(ring[below, 1, 0] if below_kind == 1 else table[below, 1, 0])
                neg[entries], age[entries], e_at[entries], e_p[entries] = neg[top] * first, entries, node, -neg[top]
                e_kind[entries], e_row[entries], e_j[entries] = below_kind, below, 0
                heap[n] = entries
                entries += 1
                n += 1
                sift_up(heap, n - 1, neg, age)
    return tokens[:grown], parents[:grown], keys[:grown]


@njit(cache=True)
def before(a, b, neg, age):
    return neg[a] < neg[b] or (neg[a] == neg[b] and age[a] < age[b])


@njit(cache=True)
def sift_up(heap, i, neg, age):
    while i > 0:
        up = (i - 1) // 2
        if not before(heap[i], heap[up], neg, age):
            return
        heap[i], heap[up] = heap[up], heap[i]
        i = up


@njit(cache=True)
def sift_down(heap, n, neg, age):
    i = 0
    while True:
        left, best = 2 * i + 1, i
        if left < n and before(heap[left], heap[best], neg, age):
            best = left
        if left + 1 < n and before(heap[left + 1], heap[best], neg, age):
            best = left + 1
        if best == i:
            return
        heap[i], heap[best] = heap[best], heap[i]
        i = best
