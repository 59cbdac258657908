"""The candidate tree: drafts from every source merged into one token trie, laid out as one
fixed-size step, verified against the step's own greedy predictions.

Step layout (T rows, a fixed budget per shape; base slot p = len(seq) - 1):
  row 0                    the last committed token (the trie's root), position p
  rows 1 .. J              the Jacobi window, if any (`sources.jacobi`): v1's layout
  rows J+1 .. J+n          chosen trie nodes, parents before children: a node at depth d sits at
                           position p + d and sees row 0, its ancestors and itself
  the rest                 padding: the root's token seeing only itself; nobody sees it
A node is accepted when its parent is and its token is the parent row's greedy prediction; the
longest accepted path plus the last accepted row's prediction is committed, so the output is
exactly greedy decoding's.

All of this runs between two GPU steps, where every microsecond of host work adds to the step: the
trie is a set of flat arrays, and inserting, scoring, choosing, laying out and accepting are compiled
(numba), as are the recycling tree (`sources.recycling`) and calibration (`engine/calibration.py`). A
compiled function calls only those of its own file: numba's cache notices changes to that file alone.

The runner bakes a shape's mask into its CUDA graphs by reference, so one `StepShape` per budget
is captured once and every step sets its positions and mask (`load`, `Runner.set_layout`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from numba import njit

from .calibration import MAX_SOURCES, PRIOR_WEIGHT, Calibration
from .runner import Runner, StepShape


class TokenTrie:
    """Drafts merged by shared prefix: a prefix proposed by several sources costs one row.

    Node i (0: the root, the last committed token; parents before children) holds `token[i]`, `parent[i]`,
    `depth[i]` (tokens after the root), `keys[i]` (per source column, the calibration key of the source's
    guess, -1: not proposed by it), `prob[i]` (its chance to be accepted if its parent is) and `reach[i]`
    (its chance to be accepted: the product of `prob` along its path)."""

    def __init__(self, root: int, capacity: int = 256):
        self.size = 1
        self._allocate(capacity)
        self.reset(root)

    def reset(self, root: int) -> None:
        """Empty the trie down to a new root, keeping its arrays: the decode loop reuses two tries (one being
        learned from while the other is built) instead of allocating eight arrays a step."""
        self.size = 1
        self.token[0], self.parent[0], self.depth[0], self.first_child[0], self.next_sibling[0] = root, -1, 0, -1, -1
        self.reach[0] = 1.0
        self.keys[0] = -1

    def _allocate(self, capacity: int) -> None:
        old = self.size
        arrays = {"token": np.int64, "parent": np.int64, "depth": np.int64, "first_child": np.int64,
                  "next_sibling": np.int64, "prob": np.float64, "reach": np.float64}
        for name, dtype in arrays.items():
            grown = np.empty(capacity, dtype)
            if hasattr(self, name):
                grown[:old] = getattr(self, name)[:old]
            setattr(self, name, grown)
        keys = np.empty((capacity, MAX_SOURCES), np.int64)  # a node's row is set when it is made (`add_node`)
        if hasattr(self, "keys"):
            keys[:old] = self.keys[:old]
        self.keys = keys

    def reserve(self, more: int) -> None:
        """Room for `more` nodes."""
        if self.size + more > len(self.token):
            self._allocate(2 * (self.size + more))

    def insert(self, tokens: Sequence[int], key: int, column: int) -> None:
        """Add one draft; `key` is the calibration key of its tokens, `column` its source's (`Calibration`)."""
        self.reserve(len(tokens))
        self.size = add_path(self.token, self.parent, self.depth, self.first_child, self.next_sibling, self.keys,
                             self.size, np.asarray(tokens, np.int64), key, column)

    def graft(self, tokens: np.ndarray, parents: np.ndarray, keys: np.ndarray, column: int, under: int = 0) -> None:
        """Add a whole draft tree at once: its node j is tokens[j] under its node parents[j] (-1: trie node
        `under`, by default the root), parents first, with calibration key keys[j]. Cheaper than inserting each
        root-to-leaf path."""
        self.reserve(len(tokens))
        self.size = graft_nodes(self.token, self.parent, self.depth, self.first_child, self.next_sibling, self.keys,
                                self.size, tokens, parents, keys, column, under)

    def child(self, node: int, token: int) -> int:
        """The child of `node` holding `token` (-1: none)."""
        return find_child(self.token, self.first_child, self.next_sibling, node, token)

    def score(self, calibration: Calibration) -> None:
        """Set every node's acceptance chance. Sources agreeing on a token are treated as independent
        witnesses, each as right as it has been (`Calibration`): 1 - prod(1 - p)."""
        score_nodes(self.parent, self.depth, self.keys, self.size, calibration.prior, calibration.accepted,
                    calibration.offered, PRIOR_WEIGHT, self.prob, self.reach)

    def select(self, budget: int) -> np.ndarray:
        """The `budget` nodes most likely to be accepted, in creation order (parents before children).
        Chances never grow along a path and the sort is stable, so a parent always ranks above its child
        (on a tie too, being older): the chosen set holds each chosen node's parent."""
        return most_likely(self.reach, self.size, budget)

    def path(self, node: int) -> list[int]:
        """Node indices from the root's child down to `node`."""
        out = []
        while node > 0:
            out.append(node)
            node = int(self.parent[node])
        return out[::-1]

    def sources_of(self, node: int, calibration: Calibration) -> dict[str, str]:
        """source -> calibration key, for every source that proposed `node`."""
        return dict(calibration.names[k] for k in self.keys[node] if k >= 0)


@njit(cache=True)
def find_child(token, first_child, next_sibling, node, t):
    c = first_child[node]
    while c >= 0 and token[c] != t:
        c = next_sibling[c]
    return c


@njit(cache=True)
def add_node(token, parent, depth, first_child, next_sibling, keys, size, at, t, key, column):
    """(the child of `at` holding t, created if new, with `key` as its source's key; the trie's new size)."""
    c = find_child(token, first_child, next_sibling, at, t)
    if c < 0:
        c = size
        size += 1
        token[c], parent[c], depth[c] = t, at, depth[at] + 1
        first_child[c] = -1
        keys[c, :] = -1
        next_sibling[c] = first_child[at]
        first_child[at] = c
    if keys[c, column] < 0:
        keys[c, column] = key
    return c, size


@njit(cache=True)
def add_path(token, parent, depth, first_child, next_sibling, keys, size, tokens, key, column):
    at = 0
    for t in tokens:
        at, size = add_node(token, parent, depth, first_child, next_sibling, keys, size, at, t, key, column)
    return size


@njit(cache=True)
def graft_nodes(token, parent, depth, first_child, next_sibling, keys, size, tokens, parents, node_keys, column, under):
    where = np.empty(len(tokens), np.int64)  # the trie node of each grafted node
    for j in range(len(tokens)):
        at = where[parents[j]] if parents[j] >= 0 else under
        where[j], size = add_node(token, parent, depth, first_child, next_sibling, keys, size, at, tokens[j],
                                  node_keys[j], column)
    return size


@njit(cache=True)
def score_nodes(parent, depth, keys, size, prior, accepted, offered, weight, prob, reach):
    reach[0] = 1.0
    for i in range(1, size):  # parents are created before their children
        miss = 1.0
        d = min(depth[i], accepted.shape[1] - 1)
        for k in keys[i]:
            if k >= 0:
                miss *= 1.0 - (accepted[k, d] + prior[k] * weight) / (offered[k, d] + weight)
        prob[i] = 1.0 - miss
        reach[i] = reach[parent[i]] * prob[i]


@njit(cache=True)
def most_likely(reach, size, budget):
    order = np.argsort(-reach[1:size], kind="mergesort")[:budget] + 1
    return np.sort(order)


@lru_cache(maxsize=16)
def tree_shape(size: int) -> StepShape:
    """The one shape of a `size`-row budget; `load` fills its positions and mask for each step."""
    local = torch.eye(size, dtype=torch.bool)
    local[:, 0] = True
    return StepShape(f"tree{size}", torch.zeros(size, dtype=torch.long), local, logits=True, moves=True)


@dataclass
class TreeStep:
    """One step's rows: tokens, positions and mask, and where each chosen trie node sits."""

    tokens: np.ndarray  # [T] int64
    rel_pos: np.ndarray  # [T] int64
    local: np.ndarray  # [T, T] bool
    row_of: np.ndarray  # trie node -> its row (-1: not chosen; the root's is 0)
    used: int  # rows holding real tokens (the rest is padding)
    parent_row: np.ndarray  # [T] a tree row -> its parent's row (0: the root); -1 for the root, window and padding
    before: np.ndarray  # [T] the token before each row's token on its path (-1: unknown), laid out with it

    def previous(self, before_root: int | None) -> np.ndarray:
        """The token before each used row's token on its path (-1 where unknown: the Jacobi window)."""
        self.before[0] = -1 if before_root is None else before_root
        return self.before[: self.used]


def build_step(size: int, trie: TokenTrie, chosen: np.ndarray, window: StepShape | None = None,
               window_tokens: Sequence[int] = ()) -> TreeStep:
    """Lay out the root, the Jacobi window (its rows and mask as `window` has them) and the chosen nodes."""
    first = 1 + len(window_tokens)
    if first + len(chosen) > size:
        raise ValueError(f"{len(chosen)} tree nodes and {first} other rows exceed the {size}-row budget")
    tokens, rel_pos, local, row_of, parent_row, before = lay_out(trie.token, trie.parent, trie.depth, trie.size,
                                                                 chosen, first, size)
    if window_tokens:
        tokens[1:first] = window_tokens
        if window is not None:
            rel_pos[:first] = window.rel_pos.numpy()
            local[:first, :first] = window.local.numpy()
    return TreeStep(tokens, rel_pos, local, row_of, first + len(chosen), parent_row, before)


@njit(cache=True)
def lay_out(token, parent, depth, nodes, chosen, first, size):
    """Rows `first`.. hold the chosen nodes; the other rows the root's token at position 1, seeing themselves."""
    tokens = np.full(size, token[0])
    rel_pos = np.ones(size, np.int64)
    rel_pos[0] = 0
    local = np.zeros((size, size), np.bool_)
    row_of = np.full(nodes, -1, np.int64)
    parent_row = np.full(size, -1, np.int64)
    before = np.full(size, -1, np.int64)
    for r in range(size):
        local[r, r] = True
    row_of[0] = 0
    for n in range(len(chosen)):
        i, row = chosen[n], first + n
        row_of[i] = row
        above = parent_row[row] = row_of[parent[i]]
        tokens[row] = token[i]
        before[row] = tokens[above]
        rel_pos[row] = depth[i]
        for r in range(row):  # what the parent sees: the root and its ancestors
            local[row, r] = local[above, r]
    return tokens, rel_pos, local, row_of, parent_row, before


def load(runner: Runner, shape: StepShape, step: TreeStep) -> None:
    """This step's positions and mask, for the shape's next replay."""
    runner.set_layout(shape, step.rel_pos, step.local)


def accept(trie: TokenTrie, step: TreeStep, pred: np.ndarray) -> tuple[np.ndarray, int]:
    """(accepted node indices from the root down, the greedy token after the last of them)."""
    return walk_accepted(trie.token, trie.first_child, trie.next_sibling, step.row_of, pred)


@njit(cache=True)
def walk_accepted(token, first_child, next_sibling, row_of, pred):
    path = np.empty(len(pred), np.int64)
    n, node, row = 0, 0, 0
    while True:
        child = find_child(token, first_child, next_sibling, node, pred[row])
        if child < 0 or row_of[child] < 0:
            return path[:n], pred[row]
        path[n] = child
        n += 1
        node, row = child, row_of[child]
