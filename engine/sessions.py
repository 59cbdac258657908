"""Per-document KV sessions: what each open document already has in the KV cache.

The model has one working KV cache (its addresses are baked into the CUDA graphs). The
active document's tokens live there; switching documents parks the active one's K/V in a
copy and restores the other's. Parked copies share a byte budget and are evicted least
recently used first; an eviction only costs a cold prefill later, never correctness.

Tree decoding's memory lives here too: each document's history of completions and Jacobi
n-grams, and, shared by all documents, the workspace history, the Token Recycling table and the
sources' calibration (`SessionStore.drafters`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .calibration import Calibration
from .device_tree import RECYCLING_DEPTH, DeviceTree
from .lookahead import LookaheadConfig, NGramPool
from .runner import Runner
from .sources import Source
from .sources.history import CONTEXT_TAIL, HistoryLookup, SuffixAutomaton, remember
from .sources.jacobi import JacobiWindow
from .sources.prompt_lookup import PromptLookup
from .sources.recycling import Recycling
from .tree_decoding import Drafters, TreeConfig

DOCUMENT_HISTORY = 1 << 13  # tokens of completions kept per document
WORKSPACE_HISTORY = 1 << 16  # and for all documents together


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix, by bisection over slice compares (C loops, not a Python one):
    it runs on every keystroke over the whole prompt."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class Session:
    document: str
    tokens: list[int] = field(default_factory=list)  # tokens whose K/V are valid, slot == index
    parked: Tensor | None = None  # their K/V while another document is active
    pool: NGramPool | None = None  # lookahead n-grams, kept across requests
    seeded: list[int] = field(default_factory=list)  # prompt the pool was last seeded from
    history: SuffixAutomaton = field(default_factory=lambda: SuffixAutomaton(DOCUMENT_HISTORY))  # its completions
    window_pool: NGramPool | None = None  # what tree decoding's Jacobi window found, kept across requests
    last: tuple[str, str, str] | None = None  # (prefix, suffix, completion) for type-through
    used: float = field(default_factory=time.monotonic)

    def reuse(self, ids: list[int], enabled: bool = True) -> int:
        """How many of `ids` already have K/V in the cache; the rest is about to be overwritten."""
        reused = common_prefix(self.tokens, ids) if enabled else 0
        self.tokens = self.tokens[:reused]
        return reused

    def written(self, ids: list[int]) -> None:
        """The cache now holds valid K/V for exactly `ids`, at slot == index."""
        self.tokens = list(ids)

    def pool_for(self, ids: list[int], cfg: LookaheadConfig, persistent: bool = True) -> NGramPool:
        """The document's n-gram pool, seeded with the n-grams of the prompt it has not seen yet."""
        if not persistent or self.pool is None or self.pool.n != cfg.ngram:
            pool = NGramPool(cfg.ngram)
            pool.add_text(ids)
            if persistent:
                self.pool, self.seeded = pool, list(ids)
            return pool
        same = common_prefix(self.seeded, ids)
        self.pool.add_text(ids[max(0, same - cfg.ngram + 1) :])
        self.seeded = list(ids)
        return self.pool

    def remember(self, prefix: str, suffix: str, text: str | None) -> None:
        """The suggestion shown for this cursor context (None: nothing shown, e.g. cancelled)."""
        self.last = (prefix, suffix, text) if text else None

    def type_through(self, prefix: str, suffix: str) -> str | None:
        """The rest of the last suggestion if the user has typed its start since, else None."""
        if self.last is None:
            return None
        old_prefix, old_suffix, text = self.last
        if suffix != old_suffix or not prefix.startswith(old_prefix):
            return None
        typed = prefix[len(old_prefix) :]
        if not typed or not text.startswith(typed) or len(typed) >= len(text):
            return None
        return text[len(typed) :]


MAX_DEVICE_TREES = 4  # configs of trees drafted on the device kept at once (requests may name their own)


class SessionStore:
    def __init__(self, runner: Runner, budget_bytes: int, max_sessions: int = 64):
        self.runner = runner
        self.budget_bytes = budget_bytes
        self.max_sessions = max_sessions
        self.sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self.active: Session | None = None
        self.evictions = 0
        self.recycling_seed: np.ndarray | None = None  # the recycling table's start (`engine/recycling_prior.py`)
        self._unlearned: list[tuple[dict[str, SuffixAutomaton], list[int], list[int]]] = []  # `completed`
        self.device_trees: dict[TreeConfig, DeviceTree] = {}  # trees drafted on the device, by config
        self.forget_learned()

    def forget_learned(self) -> None:
        """Start tree decoding's shared memory afresh (benchmarks: no case may see its own earlier output). The
        recycling table goes back to its seed: that is the model's, not learned from any request."""
        self.learn_completed()  # the documents' histories keep what they were taught, as they always did
        self.workspace = SuffixAutomaton(WORKSPACE_HISTORY)
        # a row for every id the model has
        self.recycling = Recycling(vocab=self.runner.model.args.vocab_size, seed=self.recycling_seed)
        self.calibration = Calibration()
        for tree in self.device_trees.values():
            tree.forget()

    def device_tree(self, cfg: TreeConfig) -> DeviceTree:
        """The device's state for a tree drafted there: made on first use, then kept (its table, its graphs)."""
        tree = self.device_trees.pop(cfg, None)  # back in last: the least recently used goes first
        if tree is None:
            if len(self.device_trees) >= MAX_DEVICE_TREES:  # each holds a table and graphs on the device
                del self.device_trees[next(iter(self.device_trees))]
            tree = DeviceTree(
                self.runner, cfg.budget, cfg.depth if "prompt" in cfg.sources else 0, "recycling" in cfg.sources,
                min(cfg.depth, RECYCLING_DEPTH), self.recycling_seed)
        self.device_trees[cfg] = tree
        return tree

    def drafters(self, session: Session, ids: list[int], cfg: TreeConfig, extra: Sequence[int] = (),
                 persistent: bool = True) -> Drafters:
        """The sources of one tree-decoded request on `ids`; `extra`: text to look up that the prompt lacks.
        Not `persistent`: the document's own history and n-grams are left out (and not kept)."""
        text: list[Source] = []
        if "prompt" in cfg.sources:
            text.append(PromptLookup(ids, extra))
        if "history" in cfg.sources:
            text.append(HistoryLookup(self.histories(session, persistent), ids))
        window = None
        if cfg.window_rows:
            pool = session.window_pool if persistent else None
            window = JacobiWindow(cfg.window, cfg.levels, ids, pool)
            if persistent:
                session.window_pool = window.pool
        recycling = self.recycling if "recycling" in cfg.sources else None
        return Drafters(text, recycling, window, self.calibration)

    def completed(self, session: Session, ids: list[int], completion: list[int], persistent: bool = True) -> None:
        """A request on prompt `ids` committed `completion`: the histories learn it (the document's own only
        when `persistent`), in `learn_completed`, while the next request's prefill runs on the GPU rather than
        before this one's answer: ~0.3 ms a completion on this repository's CPU, and a rebuild of a full history
        (every few hundred completions) ~55 ms."""
        self._unlearned.append((self.histories(session, persistent), ids[-CONTEXT_TAIL:], list(completion)))

    def learn_completed(self) -> None:
        """The histories learn the completions finished since the last call (before anything drafts from them)."""
        for scopes, ids, completion in self._unlearned:
            remember(scopes, ids, completion)
        self._unlearned.clear()

    def histories(self, session: Session, persistent: bool = True) -> dict[str, SuffixAutomaton]:
        """The history scopes a request of `session` reads and feeds: its document's (when `persistent`) and
        the workspace's (every document this engine served)."""
        return {"doc": session.history, "workspace": self.workspace} if persistent else {"workspace": self.workspace}

    def parked_bytes(self) -> int:
        return sum(s.parked.nbytes for s in self.sessions.values() if s.parked is not None)

    def activate(self, document: str) -> Session:
        """Make `document`'s K/V the working cache's contents; returns its session."""
        session = self.sessions.get(document)
        if session is None:
            session = self.sessions[document] = Session(document)
            while len(self.sessions) > self.max_sessions:
                self.drop(next(iter(self.sessions)))
        self.sessions.move_to_end(document)
        session.used = time.monotonic()
        if self.active is session:
            return session
        if self.active is not None:
            self._park(self.active)
        if session.parked is not None:
            self.runner.restore(session.parked)
            session.parked = None
        self.active = session
        return session

    def _park(self, session: Session) -> None:
        if not session.tokens:
            return
        need = self.runner.bytes_per_token * len(session.tokens)
        self._evict_until(self.budget_bytes - need)
        if need > self.budget_bytes:
            session.tokens = []
            return
        try:
            session.parked = self.runner.save(len(session.tokens))
        except torch.OutOfMemoryError:
            self._evict_until(0)
            session.tokens = []

    def _evict_until(self, limit: int) -> None:
        parked = self.parked_bytes()  # summed once, not per session looked at: 14 against 225 µs for 64 sessions
        for s in list(self.sessions.values()):  # oldest first
            if parked <= limit:
                return
            if s.parked is not None:
                parked -= s.parked.nbytes
                s.parked, s.tokens = None, []
                self.evictions += 1

    def drop(self, document: str) -> None:
        """Forget a document (closed in the editor, or evicted as the least recently used)."""
        session = self.sessions.pop(document, None)
        if session is not None and session is self.active:
            self.active = None

    def trim(self) -> int:
        """Drop every parked copy (after running out of memory); returns how many were dropped."""
        parked = sum(s.parked is not None for s in self.sessions.values())
        self._evict_until(0)
        return parked

    def invalidate_working_cache(self) -> None:
        """The working cache was overwritten outside a session (e.g. a benchmark)."""
        if self.active is not None:
            self.active.tokens = []
