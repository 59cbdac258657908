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

import numpy as np

from .calibration import Calibration
from .decoding import DecodeState, decode_ar
from .healing import Healing, heal
from .runner import Runner, StepShape
from .sources import Draft, Source
from .sources.jacobi import JacobiWindow
from .sources.recycling import Recycling
from .tree import TokenTrie, TreeStep, accept, build_step, load, tree_shape

SOURCES = ("prompt", "history", "recycling", "jacobi")
DEVICE_SOURCES = ("prompt", "recycling")  # what a tree drafted on the device can draw on
WINDOW_PROBE = 8  # steps the Jacobi window gets to prove that its rows pay
TEXT_DRAFTS = 4  # a text source's drafts per step: its best few win rows, the rest only cost host time


@dataclass(frozen=True)
class TreeConfig:
    budget: int = 32  # rows per step, root and window included: one fixed shape (a CUDA graph per cache length)
    window: int = 0  # Jacobi window columns W (0: none)
    levels: int = 2  # Jacobi window levels (its n-grams are levels + 1 long)
    depth: int = 12  # longest draft, in tokens
    sources: tuple[str, ...] = SOURCES
    on_device: bool = False  # drafted and verified on the device (`engine/device_tree.py`): prompt and recycling only
    kind: ClassVar[str] = "tree"  # the request decoding (and request field) that runs it

    @classmethod
    def parse(cls, text: str) -> TreeConfig:
        """"B", "B,W,L" or "B,W,L,D", optionally ":source+source" (default: all of prompt, history,
        recycling, jacobi); "@device" at the end drafts on the device (sources: prompt and recycling)."""
        text, at, where = text.partition("@")
        if at and where != "device":
            raise ValueError(f"a tree config ends '@device' or nothing (got '@{where}')")
        sizes, _, names = text.partition(":")
        parts = [int(x) for x in sizes.split(",") if x.strip()]
        sources = tuple(n.strip() for n in names.split("+") if n.strip()) if names else SOURCES
        if not 1 <= len(parts) <= 4 or min(parts) < 0 or (set(sources) - set(SOURCES)) or not sources:
            raise ValueError(f"tree config must be B[,W,L[,D]][:{'+'.join(SOURCES)}] (got '{text}')")
        if at and not names:
            sources = DEVICE_SOURCES
        cfg = cls(*parts, sources=sources, on_device=bool(at))
        if cfg.budget < 1 or cfg.depth < 1 or (cfg.window and cfg.levels < 1):
            raise ValueError(f"tree config needs B >= 1, D >= 1 and L >= 1 with a window (got '{text}')")
        if cfg.on_device and (cfg.window or set(cfg.sources) - set(DEVICE_SOURCES) or cfg.budget < 2 + cfg.depth):
            raise ValueError(f"a tree drafted on the device takes no window, only {'+'.join(DEVICE_SOURCES)}, and a "
                             f"budget of at least depth + 2 rows (got '{text}@device')")
        if cfg.budget < 1 + cfg.window_rows:
            raise ValueError(f"a {cfg.budget}-row budget cannot hold a {cfg.window}x{cfg.levels} window (got '{text}')")
        return cfg

    @property
    def window_rows(self) -> int:
        return self.window * self.levels if "jacobi" in self.sources else 0

    @property
    def one_row(self) -> bool:
        """A budget of the root's row alone: nothing to verify, so it decodes as plain greedy steps do."""
        return self.budget < 2

    @property
    def step_tokens(self) -> int:
        return self.budget

    def shape(self) -> StepShape:
        return tree_shape(self.budget)

    def knobs(self) -> dict:
        """The config's settings by name, for benchmark results."""
        return {"budget": self.budget, "window": self.window, "levels": self.levels, "depth": self.depth,
                "sources": "+".join(self.sources), "on_device": self.on_device}

    def __str__(self) -> str:
        text = f"{self.budget},{self.window},{self.levels},{self.depth}"
        if self.on_device:
            return text + ("" if self.sources == DEVICE_SOURCES else f":{'+'.join(self.sources)}") + "@device"
        return text if self.sources == SOURCES else f"{text}:{'+'.join(self.sources)}"


@dataclass
class Drafters:
    """Everything that proposes drafts for one request, and the calibration that weighs them."""

    text: list[Source] = field(default_factory=list)  # sources that only read committed text
    recycling: Recycling | None = None  # reads each step's logits
    window: JacobiWindow | None = None  # takes rows of the step itself
    calibration: Calibration = field(default_factory=Calibration)


def compile_host_loop() -> None:
    """Run each compiled part of the tree loop once, on made-up tokens, with the argument types a request
    passes: numba compiles a function on its first call (or loads it from its cache), which would otherwise
    land on the first request (~8 s on this repository's CPU with nothing cached, ~0.5 s from the cache)."""
    calibration, recycling = Calibration(), Recycling(top_k=2, max_pairs=4, vocab=8)
    trie = TokenTrie(1)
    key = calibration.key("prompt", "m1")
    trie.insert((2, 3), key, calibration.column[key])
    step_rows = np.array([1, 2], np.int64)
    ids, probs = np.array([[2, 4], [3, 5]], np.int64), np.array([[0.6, 0.3], [0.5, 0.2]], np.float32)
    recycling.remember(step_rows, ids, probs, np.array([0, 1], np.int64))
    recycling.grow(trie, [0, 1], 2, 4, calibration)
    trie.score(calibration)
    step = build_step(8, trie, trie.select(7))
    path, bonus = accept(trie, step, np.zeros(8, np.int64))
    calibration.learn(trie, [*trie.token[path].tolist(), int(bonus)])


def insert_drafts(trie: TokenTrie, drafts: list[Draft], calibration: Calibration) -> None:
    """Merge a source's drafts into the trie, each under its calibration key."""
    for draft in drafts:
        key = calibration.key(draft.source, draft.key)
        trie.insert(draft.tokens, key, calibration.column[key])


def learn(state: DecodeState, calibration: Calibration, trie: TokenTrie, commit: list[int],
          drafted: np.ndarray) -> None:
    """What a step teaches, none of which the next step waits for: the calibration's counts, and which
    source had guessed each committed token (`drafted`: their trie nodes) for the request's figures."""
    calibration.learn(trie, commit)
    if not len(drafted):
        return
    state.pool_hits += 1
    proposed = trie.keys[drafted] >= 0  # [token, source column]
    for source, column in calibration.sources.items():
        right = int(proposed[:, column].sum())
        if right:
            state.by_source[source] = state.by_source.get(source, 0) + right


@dataclass
class Drafted:
    """One step's drafts, laid out and loaded into the step's inputs: all a launch still needs."""

    trie: TokenTrie
    chosen: np.ndarray  # the trie nodes given rows
    step: TreeStep
    healing: bool  # the step still re-types what token healing removed


def draft_step(runner: Runner, trie: TokenTrie, seq: list[int], cfg: TreeConfig, drafters: Drafters,
               window: JacobiWindow | None, healing: Healing | None) -> Drafted:
    """Merge every source's drafts after `seq` into `trie` (reset to seq's last token), choose the step's rows
    and load their layout for the shape's next launch."""
    sources, recycling, calibration = drafters.text, drafters.recycling, drafters.calibration
    room = cfg.budget - 1 - (window.rows if window else 0)
    trie.reset(seq[-1])
    healing_now = bool(healing)
    if healing_now:
        healing.draft(trie, seq, cfg.depth, room, calibration, recycling)
    for source in sources:
        insert_drafts(trie, source.propose(seq, cfg.depth, min(room, TEXT_DRAFTS)), calibration)
    if recycling is not None:
        recycling.grow(trie, seq, cfg.depth, room, calibration)
    if window is not None:
        insert_drafts(trie, window.propose(seq, cfg.depth, room), calibration)
    trie.score(calibration)
    if healing_now:
        healing.prune(trie)
    chosen = trie.select(room)
    step = build_step(cfg.budget, trie, chosen, window.layout() if window else None,
                      window.tokens() if window else ())
    if healing_now:
        healing.plan(step, chosen)
    load(runner, cfg.shape(), step)
    return Drafted(trie, chosen, step, healing_now)


def first_step(runner: Runner, seq: list[int], cfg: TreeConfig, drafters: Drafters,
               healing: Healing | None = None) -> Drafted | None:
    """The first step's drafts, which read the prompt alone: made while the GPU prefills it rather than after
    (~0.5 ms of host work on this repository's CPU: the sources' indexes, the trie and its layout). None where
    the config decodes without a tree."""
    if cfg.one_row:
        return None
    return draft_step(runner, TokenTrie(seq[-1]), seq, cfg, drafters, drafters.window, healing)


def decode_tree(runner: Runner, state: DecodeState, cfg: TreeConfig, drafters: Drafters,
                overlap: bool | None = None, healing: Healing | None = None, first: Drafted | None = None) -> None:
    """Greedy decoding, several tokens per step where the drafts are right; `healing`: the text token healing
    removed, re-typed within the first steps (`engine/healing.py`) rather than by one-row steps before them;
    `first`: the first step, drafted ahead (`first_step`) with the same drafters and healing.

    With `overlap` (the default on a GPU, where a replay returns before the GPU is done) the step runs
    while the host learns from the step before it (`learn`), so that drafting, reading the
    result and the recycling table (whose freshest rows the very next tree needs) are all that sit
    between two steps."""
    if cfg.one_row:
        if healing:
            heal(runner, healing.codec, state, healing.rest)
        return decode_ar(runner, state)
    seq = state.seq
    if first is not None and (state.steps or int(first.trie.token[0]) != seq[-1]):
        raise ValueError("the first step was drafted for another sequence")
    shape = cfg.shape()
    sources, recycling, window, calibration = drafters.text, drafters.recycling, drafters.window, drafters.calibration
    overlap = runner.device.type == "cuda" if overlap is None else overlap
    window_steps = window_gain = 0
    pending: Callable[[], None] | None = None
    greedy, top = runner.read_back("tree argmax"), runner.read_back("recycling top-k")
    # One trie is built while the last step's is learned from.
    tries = (first.trie if first is not None else TokenTrie(seq[-1]), TokenTrie(seq[-1]))
    planned = first
    while not state.done():
        p = len(seq) - 1
        if planned is None:
            planned = draft_step(runner, tries[state.steps % 2], seq, cfg, drafters, window, healing)
        trie, chosen, step, healing_now = planned.trie, planned.chosen, planned.step, planned.healing
        planned = None
        argmax, logits = runner.step(shape, step.tokens, p)
        # The argmax's copy is queued before the top-k, so reading it does not wait for the top-k kernels.
        greedy.queue(argmax)
        if recycling is not None:
            top.queue(*recycling.top(logits, step.used))
        if pending is not None:
            pending()  # while the GPU runs the step
        pred = greedy.values()[0].numpy()
        if healing_now:
            pred = healing.constrain(pred, logits)

        path, bonus = accept(trie, step, pred)
        commit = [*trie.token[path].tolist(), int(bonus)]
        if recycling is not None:
            ids, probs = top.values()
            recycling.remember(step.tokens[: step.used], ids.numpy(), probs.numpy(),
                               step.previous(seq[-2] if len(seq) > 1 else None))
        kept = state.commit(commit)
        if healing_now:
            healing.advance(commit[:kept])
        drafted = path[:kept]  # committed tokens that drafts got right (the bonus is the model's own)
        pending = partial(learn, state, calibration, trie, commit, drafted)
        if not overlap:
            pending()
            pending = None
        moved = min(len(path), kept - 1)
        if moved > 0:
            runner.move_slots((p + step.row_of[path[:moved]]).tolist(), list(range(p + 1, p + 1 + moved)))
        for source in sources:
            source.observe(seq, kept)
        if window is not None:
            jacobi = calibration.sources.get("jacobi")
            if jacobi is not None and len(drafted):  # committed tokens the window alone had guessed
                proposed = trie.keys[drafted] >= 0  # [token, source column]
                window_gain += int((proposed[:, jacobi] & (proposed.sum(1) == 1)).sum())
            window.update(pred.tolist())
            window_steps += 1
            # The window's rows must earn at least what the weakest tree rows are expected to.
            # (Rows the tree leaves empty are padding anyway: there the window costs nothing.)
            if window_steps >= WINDOW_PROBE:
                room = cfg.budget - 1 - window.rows
                weakest = float(trie.reach[chosen].min()) if len(chosen) >= room else 0.0
                if window_gain / (window_steps * window.rows) < max(weakest, 0.02):
                    window = None
    if pending is not None:
        pending()
