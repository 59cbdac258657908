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

The runner bakes a shape's mask into its CUDA graphs by reference, so one `StepShape` per budget
is captured once and every step sets its positions and mask (`load`, `Runner.set_layout`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from .runner import Runner, StepShape


@dataclass(slots=True)
class Node:
    token: int
    parent: int  # index of the parent node; -1 for the root
    depth: int  # tokens after the root
    prob: float = 0.0  # chance this node is accepted given that its parent is
    score: float = 1.0  # chance it is accepted: the product of `prob` along its path
    keys: dict[str, str] = field(default_factory=dict)  # source -> calibration key, for every source proposing it
    children: dict[int, int] = field(default_factory=dict)  # token -> node index


class TokenTrie:
    """Drafts merged by shared prefix: a prefix proposed by several sources costs one row."""

    def __init__(self, root: int):
        self.nodes = [Node(root, -1, 0)]

    def insert(self, tokens: tuple[int, ...] | list[int], source: str, keys: list[str]) -> None:
        """Add one draft; `keys[i]` is the calibration key of its i-th token."""
        self.graft(tokens, range(-1, len(tokens) - 1), source, keys)

    def graft(self, tokens: Sequence[int], parents: Sequence[int], source: str, keys: Sequence[str]) -> None:
        """Add a whole draft tree at once: its node j is tokens[j] under its node parents[j] (-1: the
        root), parents first. Cheaper than inserting each root-to-leaf path of a bushy tree."""
        nodes = self.nodes
        where: list[int] = []  # trie index of each grafted node
        for token, parent, key in zip(tokens, parents, keys, strict=True):
            at = where[parent] if parent >= 0 else 0
            above = nodes[at]
            child = above.children.get(token)
            if child is None:
                child = above.children[token] = len(nodes)
                nodes.append(Node(token, at, above.depth + 1, keys={source: key}, children={}))
            else:
                nodes[child].keys.setdefault(source, key)
            where.append(child)

    def score(self, prob) -> None:
        """Set every node's acceptance chance; `prob(source, key, depth)` is one source's belief, and
        sources agreeing on a token are treated as independent witnesses: 1 - prod(1 - p). `prob` is
        called per node and source, so it should be cheap (`Calibration.prob` keeps its answers)."""
        nodes = self.nodes
        for node in nodes[1:]:  # parents are created before their children
            miss = 1.0
            depth = node.depth
            for source, key in node.keys.items():
                miss *= 1.0 - prob(source, key, depth)
            node.prob = 1.0 - miss
            node.score = nodes[node.parent].score * node.prob

    def select(self, budget: int) -> list[int]:
        """The `budget` nodes most likely to be accepted, in creation order (parents before children).
        Scores never grow along a path and the sort is stable, so a parent always ranks above its child
        (on a tie too, being older): the chosen set holds each chosen node's parent."""
        unlikely = [-node.score for node in self.nodes]
        chosen = sorted(range(1, len(unlikely)), key=unlikely.__getitem__)[:budget]
        chosen.sort()
        return chosen

    def path(self, node: int) -> list[int]:
        """Node indices from the root's child down to `node`."""
        out = []
        while node > 0:
            out.append(node)
            node = self.nodes[node].parent
        return out[::-1]


@lru_cache(maxsize=16)
def tree_shape(size: int) -> StepShape:
    """The one shape of a `size`-row budget; `load` fills its positions and mask for each step."""
    local = torch.eye(size, dtype=torch.bool)
    local[:, 0] = True
    return StepShape(f"tree{size}", torch.zeros(size, dtype=torch.long), local, logits=True, moves=True)


@dataclass
class TreeStep:
    """One step's rows: tokens, positions and mask, and where each chosen trie node sits."""

    tokens: list[int]
    rel_pos: np.ndarray  # [T] int64
    local: np.ndarray  # [T, T] bool
    row_of: dict[int, int]  # trie node -> row
    used: int  # rows holding real tokens (the rest is padding)
    parent_row: dict[int, int] = field(default_factory=dict)  # tree row -> the row of its parent (0: the root)

    def previous(self, before_root: int | None) -> list[int | None]:
        """The token before each used row's token on its path (None where unknown: the Jacobi window)."""
        out: list[int | None] = [before_root] + [None] * (self.used - 1)
        for row, parent in self.parent_row.items():
            out[row] = self.tokens[parent]
        return out


def rows_from_bits(masks: list[int], size: int) -> np.ndarray:
    """[len(masks), size] bool: row r is True where bit j of masks[r] is set."""
    width = -(-size // 8)
    packed = np.frombuffer(b"".join(m.to_bytes(width, "little") for m in masks), np.uint8).reshape(len(masks), width)
    return np.unpackbits(packed, axis=1, count=size, bitorder="little").view(bool)


def build_step(size: int, trie: TokenTrie, chosen: list[int], window: StepShape | None = None,
               window_tokens: list[int] = ()) -> TreeStep:
    """Lay out the root, the Jacobi window (its rows and mask as `window` has them) and the chosen nodes."""
    nodes = trie.nodes
    root = nodes[0].token
    first = 1 + len(window_tokens)
    if first + len(chosen) > size:
        raise ValueError(f"{len(chosen)} tree nodes and {first} other rows exceed the {size}-row budget")
    rel = [0] + [1] * (size - 1)
    seen = [1 << row for row in range(size)]  # row r sees the slots of the rows whose bits are set
    row_of: dict[int, int] = {0: 0}
    parent_row: dict[int, int] = {}
    tokens = [root, *window_tokens]
    for row, i in enumerate(chosen, first):
        node = nodes[i]
        row_of[i] = row
        above = parent_row[row] = row_of[node.parent]
        tokens.append(node.token)
        rel[row] = node.depth
        seen[row] |= seen[above]  # what the parent sees (the root and its ancestors), and itself
    del row_of[0]
    rel_pos = np.array(rel, dtype=np.int64)
    local = rows_from_bits(seen, size)
    if window is not None and window_tokens:
        rel_pos[:first] = window.rel_pos.numpy()
        local[:first, :first] = window.local.numpy()
    used = len(tokens)
    tokens.extend([root] * (size - used))
    return TreeStep(tokens, rel_pos, local, row_of, used, parent_row)


def load(runner: Runner, shape: StepShape, step: TreeStep) -> None:
    """This step's positions and mask, for the shape's next replay."""
    runner.set_layout(shape, step.rel_pos, step.local)


def accept(trie: TokenTrie, step: TreeStep, pred: list[int]) -> tuple[list[int], int]:
    """(accepted node indices from the root down, the greedy token after the last of them)."""
    path: list[int] = []
    node, row = 0, 0
    while True:
        child = trie.nodes[node].children.get(pred[row])
        if child is None or child not in step.row_of:
            return path, pred[row]
        path.append(child)
        node, row = child, step.row_of[child]
