"""Tree decoding: every source's drafts verified in one fixed-size step, budget spent by confidence.

Each step asks the sources for drafts, merges them into a token trie, scores every node by how
likely it is to be accepted (each source's calibrated belief, `Calibration`), and fills the step's
rows with the most likely nodes: a long confident match grows deep, disagreeing sources grow wide.
The Jacobi window takes rows only while it pays for them. Output is exactly greedy decoding's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar

from .decoding import DecodeState, decode_ar
from .runner import Runner, StepShape
from .sources import Source, prob_bucket
from .sources.jacobi import JacobiWindow
from .sources.recycling import Recycling
from .tree import TokenTrie, accept, build_step, load, tree_shape

SOURCES = ("prompt", "history", "recycling", "jacobi")
# Prior acceptance chance of a source's token before any evidence (weight PRIOR_WEIGHT observations).
PRIORS = {"prompt": 0.4, "history": 0.5, "jacobi": 0.2, "recycling": 0.3}
PRIOR_WEIGHT = 4.0
WINDOW_PROBE = 8  # steps the Jacobi window gets to prove that its rows pay
TEXT_DRAFTS = 4  # a text source's drafts per step: its best few win rows, the rest only cost host time


@dataclass(frozen=True)
class TreeConfig:
    budget: int = 32  # rows per step, root and window included: one fixed shape (a CUDA graph per cache length)
    window: int = 0  # Jacobi window columns W (0: none)
    levels: int = 2  # Jacobi window levels (its n-grams are levels + 1 long)
    depth: int = 12  # longest draft, in tokens
    sources: tuple[str, ...] = SOURCES
    kind: ClassVar[str] = "tree"  # the request decoding (and request field) that runs it

    @classmethod
    def parse(cls, text: str) -> TreeConfig:
        """"B", "B,W,L" or "B,W,L,D", optionally ":source+source" (default: all of prompt, history,
        recycling, jacobi)."""
        sizes, _, names = text.partition(":")
        parts = [int(x) for x in sizes.split(",") if x.strip()]
        sources = tuple(n.strip() for n in names.split("+") if n.strip()) if names else SOURCES
        if not 1 <= len(parts) <= 4 or min(parts) < 0 or (set(sources) - set(SOURCES)) or not sources:
            raise ValueError(f"tree config must be B[,W,L[,D]][:{'+'.join(SOURCES)}] (got '{text}')")
        cfg = cls(*parts, sources=sources)
        if cfg.budget < 1 or cfg.depth < 1 or (cfg.window and cfg.levels < 1):
            raise ValueError(f"tree config needs B >= 1, D >= 1 and L >= 1 with a window (got '{text}')")
        if cfg.budget < 1 + cfg.window_rows:
            raise ValueError(f"a {cfg.budget}-row budget cannot hold a {cfg.window}x{cfg.levels} window (got '{text}')")
        return cfg

    @property
    def window_rows(self) -> int:
        return self.window * self.levels if "jacobi" in self.sources else 0

    @property
    def step_tokens(self) -> int:
        return self.budget

    def shape(self) -> StepShape:
        return tree_shape(self.budget)

    def knobs(self) -> dict:
        """The config's settings by name, for benchmark results."""
        return {"budget": self.budget, "window": self.window, "levels": self.levels, "depth": self.depth,
                "sources": "+".join(self.sources)}

    def __str__(self) -> str:
        text = f"{self.budget},{self.window},{self.levels},{self.depth}"
        return text if self.sources == SOURCES else f"{text}:{'+'.join(self.sources)}"


class Calibration:
    """How often each source's guesses are right, learned across requests: per (source, key, depth)
    the accepted and offered counts of tokens whose parent was right, smoothed towards a prior."""

    def __init__(self):
        self.counts: dict[tuple[str, str, int], list[float]] = {}
        self._probs: dict[tuple[str, str, int], float] = {}  # answers until `learn` changes their counts

    def prob(self, source: str, key: str, depth: int) -> float:
        bucket = (source, key, min(depth, 8))
        known = self._probs.get(bucket)
        if known is not None:
            return known
        accepted, offered = self.counts.get(bucket, (0.0, 0.0))
        prior = PRIORS.get(source, 0.3) if not key.startswith("p") else float(key[1:])
        p = self._probs[bucket] = (accepted + prior * PRIOR_WEIGHT) / (offered + PRIOR_WEIGHT)
        return p

    def learn(self, trie: TokenTrie, truth: list[int]) -> None:
        """Every node whose parent lies on the true path was a guess at truth[depth - 1]: count it."""
        on_path = {0}
        for i, node in enumerate(trie.nodes[1:], 1):  # parents come first
            if node.parent not in on_path or node.depth > len(truth):
                continue
            right = node.token == truth[node.depth - 1]
            if right:
                on_path.add(i)
            for source, key in node.keys.items():
                bucket = (source, key, min(node.depth, 8))
                entry = self.counts.setdefault(bucket, [0.0, 0.0])
                entry[0] += right
                entry[1] += 1
                self._probs.pop(bucket, None)


@dataclass
class Drafters:
    """Everything that proposes drafts for one request, and the calibration that weighs them."""

    text: list[Source] = field(default_factory=list)  # sources that only read committed text
    recycling: Recycling | None = None  # reads each step's logits
    window: JacobiWindow | None = None  # takes rows of the step itself
    calibration: Calibration = field(default_factory=Calibration)


def decode_tree(runner: Runner, state: DecodeState, cfg: TreeConfig, drafters: Drafters,
                overlap: bool | None = None) -> None:
    """Greedy decoding, several tokens per step where the drafts are right.

    With `overlap` (the default on a GPU, where a replay returns before the GPU is done) the step runs
    while the host updates the calibration from the step before it, so that drafting, reading the
    result and the recycling table (whose freshest rows the very next tree needs) are all that sit
    between two steps."""
    if cfg.budget < 2:
        return decode_ar(runner, state)
    shape = cfg.shape()
    sources, recycling, window, calibration = drafters.text, drafters.recycling, drafters.window, drafters.calibration
    overlap = runner.device.type == "cuda" if overlap is None else overlap
    seq = state.seq
    window_steps = window_gain = 0
    pending: Callable[[], None] | None = None
    greedy, top = runner.read_back("tree argmax"), runner.read_back("recycling top-k")
    while not state.done():
        p = len(seq) - 1
        rows = window.rows if window else 0
        room = cfg.budget - 1 - rows
        trie = TokenTrie(seq[-1])
        for source in sources:
            for draft in source.propose(seq, cfg.depth, min(room, TEXT_DRAFTS)):
                trie.insert(draft.tokens, draft.source, [draft.key] * len(draft.tokens))
        if recycling is not None:
            tokens, parents, probs = recycling.tree(seq, cfg.depth, room)
            trie.graft(tokens, parents, recycling.name, [prob_bucket(q) for q in probs])
        if window is not None:
            for draft in window.propose(seq, cfg.depth, room):
                trie.insert(draft.tokens, draft.source, [draft.key] * len(draft.tokens))
        trie.score(calibration.prob)
        chosen = trie.select(room)
        step = build_step(cfg.budget, trie, chosen, window.layout() if window else None,
                          window.tokens() if window else ())
        load(runner, shape, step)
        argmax, logits = runner.step(shape, step.tokens, p)
        # The argmax's copy is queued before the top-k, so reading it does not wait for the top-k kernels.
        greedy.queue(argmax)
        if recycling is not None:
            top.queue(*recycling.top(logits, step.used))
        if pending is not None:
            pending()  # while the GPU runs the step
        pred = greedy.values()[0].tolist()

        path, bonus = accept(trie, step, pred)
        commit = [trie.nodes[i].token for i in path] + [bonus]
        if recycling is not None:
            ids, probs = top.values()
            recycling.remember(step.tokens[: step.used], ids.tolist(), probs.tolist(),
                               step.previous(seq[-2] if len(seq) > 1 else None))
        pending = partial(calibration.learn, trie, commit)
        if not overlap:
            pending()
            pending = None
        kept = state.commit(commit)
        moved = min(len(path), kept - 1)
        if moved > 0:
            runner.move_slots([p + step.row_of[i] for i in path[:moved]], [p + 1 + k for k in range(moved)])
        drafted = path[:kept]  # committed tokens that drafts got right (the bonus is the model's own)
        for i in drafted:
            for source in trie.nodes[i].keys:
                state.by_source[source] = state.by_source.get(source, 0) + 1
            if set(trie.nodes[i].keys) == {"jacobi"}:
                window_gain += 1
        if drafted:
            state.pool_hits += 1
        for source in sources:
            source.observe(seq, kept)
        if window is not None:
            window.update(pred)
            window_steps += 1
            # The window's rows must earn at least what the weakest tree rows are expected to.
            # (Rows the tree leaves empty are padding anyway: there the window costs nothing.)
            if window_steps >= WINDOW_PROBE:
                weakest = min(trie.nodes[i].score for i in chosen) if len(chosen) >= room else 0.0
                if window_gain / (window_steps * window.rows) < max(weakest, 0.02):
                    window = None
    if pending is not None:
        pending()

