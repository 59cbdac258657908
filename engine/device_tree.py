"""Tree decoding drafted on the device: a whole step (draft, verify, commit, slot moves, learning) in one graph.

The host-drafted tree (`engine/tree_decoding.py`) spends ~0.3 ms of host work between two steps on the GPU
machines' hosts, while the GPU idles: a fifth of a 1.5B step. Here the host only reads each step's commit,
one step behind, while the GPU runs the next: nothing of it sits between two steps.

The drafts are the two sources that pay most and that the device can make by itself:
- a prompt-lookup chain: the latest longest earlier match of the committed text's suffix (up to `MATCH`
  tokens), and the `depth` tokens that followed it;
- a recycling tree of a fixed shape, grown from the last token through a token -> top-k successors table
  that every step's rows update (Token Recycling, arXiv 2408.08696): rank paths in the order of how likely a
  rank-r successor is to be right (`RANK_ODDS`).

The rows' layout is fixed (the shape, not the tokens), so a step's positions and mask never change. The verifier
finds the deepest row whose every ancestor is the greedy token after its parent, commits that path plus the
greedy token after it, moves the path's K/V to its final slots and appends the commit to the device's copy of
the text. Output is exactly greedy decoding's.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import kernels
from .decoding import DecodeState
from .runner import Runner, move_kv

TOP_K = 8  # successors a table row keeps
MATCH = 6  # longest suffix match the chain's search tells apart
# How often the rank-r successor in the table is the greedy token: shapes the recycling tree (most likely
# rank paths first). Rough odds from the host tree's calibration on the bench cases; only the order matters.
RANK_ODDS = (0.5, 0.13, 0.06, 0.04, 0.03, 0.02, 0.015, 0.01)
RECYCLING_DEPTH = 8  # the recycling tree's deepest row


@dataclass(frozen=True)
class Layout:
    """The fixed rows of a step: row 0 the root (the last committed token), rows 1..chain the chain, then the
    recycling tree; every row's parent comes before it."""

    parent: np.ndarray  # [T] (-1: the root)
    depth: np.ndarray  # [T]
    rank: np.ndarray  # [T] which successor of its parent's token a recycling row is (-1: root, chain, padding)
    chain: int

    @property
    def rows(self) -> int:
        return len(self.parent)

    def ancestors(self) -> np.ndarray:
        """[T, D + 1]: each row's ancestor at every depth up to its own (the row itself last), 0 beyond."""
        anc = np.zeros((self.rows, int(self.depth.max()) + 1), np.int64)
        for r in range(self.rows):
            a = r
            while a >= 0:
                anc[r, self.depth[a]] = a
                a = self.parent[a]
        return anc

    def sees(self) -> np.ndarray:
        """[T, T]: which rows each row sees, its ancestors and itself."""
        anc = self.ancestors()
        local = np.zeros((self.rows, self.rows), bool)
        for r in range(self.rows):
            local[r, anc[r, : self.depth[r] + 1]] = True
        return local


def layout(rows: int, chain: int, recycling: bool = True, max_depth: int = RECYCLING_DEPTH) -> Layout:
    """`rows` rows: the root, a `chain`-long chain, the `rows - 1 - chain` likeliest recycling rank paths (or,
    without recycling, rows that only repeat the root's child slot: padding)."""
    if rows < 1 + chain:
        raise ValueError(f"a {rows}-row step cannot hold a {chain}-token chain")
    parent, depth, rank = [-1, *range(chain)], list(range(chain + 1)), [-1] * (chain + 1)
    heap = [(-RANK_ODDS[r], 0, r, 1) for r in range(TOP_K)] if recycling else []
    heapq.heapify(heap)
    while len(parent) < rows:
        if not heap:
            parent.append(0), depth.append(1), rank.append(-1)
            continue
        odds, at, r, d = heapq.heappop(heap)
        parent.append(at), depth.append(d), rank.append(r)
        if d < max_depth:
            for r2 in range(TOP_K):
                heapq.heappush(heap, (odds * RANK_ODDS[r2], len(parent) - 1, r2, d + 1))
    return Layout(np.array(parent), np.array(depth), np.array(rank), chain)


class DeviceTree:
    """The device's state for one layout: the text so far, the recycling table (the model's, shared by every
    request), the step's rows and its commit; and the step's graphs, one per visible-length bucket."""

    def __init__(self, runner: Runner, rows: int, chain: int, recycling: bool = True,
                 recycling_depth: int = RECYCLING_DEPTH, seed: np.ndarray | None = None):
        """`seed`: the recycling table to start from (`engine/recycling_prior.py`'s [vocab, 2, k] rows)."""
        self.runner = runner
        dev = runner.device
        self.layout = lay = layout(rows, chain, recycling, recycling_depth)
        self.rows, self.depth_max = lay.rows, int(lay.depth.max())
        D = self.depth_max
        t = lambda x: torch.as_tensor(x, device=dev)  # noqa: E731
        self.parent = t(np.maximum(lay.parent, 0))
        self.is_root = t(lay.parent < 0)
        self.depth = t(lay.depth)
        self.rank = t(lay.rank)
        self.anc = t(lay.ancestors())
        self.local = t(lay.sees())
        self.row_score = t(lay.depth * rows + (rows - 1 - np.arange(rows)))  # deepest, then first row
        self.levels = [(t(rs), t(lay.parent[rs]), t(lay.rank[rs]))
                       for d in range(1, D + 1) if len(rs := np.where((lay.rank >= 0) & (lay.depth == d))[0])]
        self.capacity = runner.capacity
        self.seq = torch.zeros(self.capacity + D + 2, dtype=torch.long, device=dev)  # room for a last commit
        self.n = torch.zeros(1, dtype=torch.long, device=dev)  # tokens committed
        self.tokens = torch.zeros(rows, dtype=torch.long, device=dev)
        self.commit = torch.zeros(D + 1, dtype=torch.long, device=dev)
        self.count = torch.zeros(2, dtype=torch.long, device=dev)  # tokens committed, and the deepest right row
        self.moves = torch.zeros(2, D, dtype=torch.long, device=dev)  # the path's slots, and where they go
        self._positions = torch.arange(self.capacity, device=dev)
        self._js = torch.arange(D + 1, device=dev)
        vocab = runner.model.args.vocab_size
        start = np.zeros((vocab, TOP_K), np.int64) if seed is None else np.maximum(seed[:, 0, :TOP_K], 0)
        self.seed = t(start.astype(np.int64))
        self.table = self.seed.clone()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.fused = kernels.usable(self.tokens)

    def forget(self) -> None:
        """The table back to its seed (benchmarks: no case may profit from its own earlier output)."""
        self.table.copy_(self.seed)

    def start(self, seq: list[int]) -> None:
        if len(seq) + self.depth_max + 2 > len(self.seq):
            raise ValueError(f"{len(seq)} tokens do not fit the {self.capacity}-slot cache")
        self.seq[: len(seq)] = torch.as_tensor(seq, device=self.seq.device)
        self.n.fill_(len(seq))

    # -- one step, from device state alone -------------------------------------------------------------
    @torch.no_grad()
    def _step(self, visible: int) -> None:
        model, D = self.runner.model, self.depth_max
        if self.fused:
            kernels.draft_device_tree(self.seq, self.n, self.table, self.tokens, self.parent, self.rank, self.depth,
                                      self.layout.chain, D, MATCH)
        else:
            self._draft()
        last = self.n - 1  # the root's slot: the last committed token has no K/V yet
        positions, slots, bias = self.runner.step_layout(last, self.depth, self.local, visible)
        logits = model(self.tokens, positions, slots, bias, logits=True)
        if self.fused:
            greedy = kernels.argmax(logits)
            kernels.verify_device_tree(self.tokens, greedy, self.parent, self.anc, self.depth, self.seq, self.n,
                                       self.commit, self.count, self.moves)
            ids, _ = kernels.top_k_probs(logits, TOP_K)
        else:
            self._verify(logits.argmax(-1), last)
            ids = logits.topk(TOP_K, dim=-1).indices
        move_kv(model.kv, self.moves[0], self.moves[1])
        self.table.index_copy_(0, self.tokens, ids)  # what each row's token was followed by, this time

    def _draft(self) -> None:
        """The rows' tokens (what `kernels.draft_device_tree` does in one launch)."""
        seq, tokens, chain = self.seq, self.tokens, self.layout.chain
        last = self.n - 1
        at = self._positions
        run = at < last
        length = torch.zeros_like(at)
        for k in range(MATCH):
            run = run & (at >= k) & (seq[(at - k).clamp(min=0)] == seq[(last - k).clamp(min=0)])
            length = length + run
        best = torch.argmax(torch.where(length > 0, length * self.capacity + at, -1))
        start = torch.where(length.max() > 0, best, self.capacity - 2)  # no indexing by a tensor: capturable
        tokens[0:1] = seq[last]
        tokens[1 : 1 + chain] = seq[(start + 1 + self._js[:chain]).clamp(max=self.capacity - 1)]
        for rows, parents, ranks in self.levels:
            tokens[rows] = self.table[tokens[parents], ranks]

    def _verify(self, greedy: Tensor, last: Tensor) -> None:
        """Commit the deepest accepted path plus the greedy token after it (`kernels.verify_device_tree`)."""
        tokens = self.tokens
        match = (tokens == greedy[self.parent]) | self.is_root
        ok = match[self.anc].all(-1)
        best = torch.argmax(torch.where(ok, self.row_score, -1)).view(1)
        d = self.depth[best]
        path = self.anc[best][0]  # [D + 1]: the root, then the path's row at each depth
        commit = torch.where(self._js < d, tokens[path.roll(-1)], greedy[best])
        self.commit.copy_(commit)
        self.seq.index_copy_(0, self.n + self._js, commit)
        self.count.copy_(torch.cat([d + 1, best]))
        self.n.add_(d + 1)
        moved = self._js[1:] <= d
        self.moves[0].copy_(torch.where(moved, last + path[1:], 0))
        self.moves[1].copy_(torch.where(moved, last + self._js[1:], 0))

    def launch(self, visible: int) -> None:
        """Queue one step that sees `visible` slots (a graph per bucket on CUDA, captured on its first use)."""
        if not self.runner.use_graphs:
            self._step(visible)
            return
        graph = self.graphs.get(visible)
        if graph is None:
            graph = self.graphs[visible] = self._capture(visible)
        graph.replay()

    def _capture(self, visible: int) -> torch.cuda.CUDAGraph:
        # One eager run first (kernel compiles, library handles) on a side stream, with the state put back after.
        saved = self.seq.clone(), self.n.clone(), self.table.clone()
        # A capture before any request (n = 0) runs its eager step at slot 0: its junk K/V lie in a cache that
        # the caller marks invalid. One during a request runs it where the real step is about to.
        self.n.clamp_(1, visible - self.rows + 1)
        graph, _ = self.runner.capture_graph(lambda: self._step(visible), eager=1)
        for mine, old in zip((self.seq, self.n, self.table), saved, strict=True):
            mine.copy_(old)
        return graph

    def capture(self, ends: set[int]) -> int:
        """Capture the graphs of steps that see `ends` slots (`Runner.visible_ends`); returns how many. Writes junk
        K/V from slot 0 on: the caller marks the working cache invalid."""
        for end in sorted(ends - set(self.graphs)):
            self.graphs[end] = self._capture(end)
        return len(ends)


def decode_device_tree(runner: Runner, state: DecodeState, tree: DeviceTree) -> None:
    """Greedy decoding with every step drafted and verified on the device. On CUDA the next step is queued
    before this one's commit is read (the host's reading, stop rules and bookkeeping overlap it); a step queued
    past the end is wasted GPU time, not output: the cache below the committed text is never touched by it."""
    if state.done():
        return
    runner.flush_moves()
    tree.start(state.seq)
    ahead = 1 if runner.use_graphs else 0
    backs = (runner.read_back("device tree a"), runner.read_back("device tree b"))
    launched = read = 0
    per_step = tree.depth_max + 1  # most tokens a step commits
    while not state.done():
        while launched - read <= ahead:
            end = len(state.seq) - 1 + (launched - read) * per_step + tree.rows  # past the step's last row, at most
            if end > runner.capacity:
                if launched == read:
                    raise ValueError(f"a {tree.rows}-row step at slot {len(state.seq) - 1} exceeds the cache")
                break
            tree.launch(runner.visible_len(end))
            backs[launched % 2].queue(tree.count, tree.commit)
            launched += 1
        count, commit = backs[read % 2].values()
        read += 1
        committed, row = int(count[0]), int(count[1])
        guessed = min(committed - 1, state.commit(commit[:committed].tolist()))  # drafted tokens kept
        if guessed > 0:
            state.pool_hits += 1
            source = "prompt" if row <= tree.layout.chain else "recycling"  # the path's source: its deepest row's
            state.by_source[source] = state.by_source.get(source, 0) + guessed
