"""Tree decoding must produce exactly greedy AR's tokens: every source alone, all together, and the
verifier on hand-made trees (shared prefixes, wrong branches, an empty tree, a stop token inside
an accepted path). Tiny random models cover shapes and edge cases in milliseconds; the real SmolLM2
weights on bench code check that the default settings really accept several tokens per step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import complete

from engine.calibration import Calibration
from engine.decoding import DecodeState, decode_ar
from engine.request import CompletionRequest
from engine.sources import Draft, match_bucket
from engine.sources.history import HistoryLookup, SuffixAutomaton
from engine.sources.jacobi import JacobiWindow
from engine.sources.prompt_lookup import PromptLookup
from engine.sources.recycling import Recycling, pair_key
from engine.tree import TokenTrie, accept, build_step, tree_shape
from engine.tree_decoding import SOURCES, TEXT_DRAFTS, Drafters, TreeConfig, decode_tree, first_step

REPETITIVE = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)\n" * 3


# -- helpers ---------------------------------------------------------------------------------------
class Scripted:
    """A source that knows the greedy continuation (`truth`, after `start` committed tokens) and proposes
    it together with wrong variants that share its prefix, so that the trie has real branches."""

    name = "scripted"

    def __init__(self, truth: list[int], start: int, depth: int = 5, vocab: int = 512):
        self.truth, self.start, self.depth, self.vocab = truth, start, depth, vocab

    def propose(self, seq: list[int], depth: int, limit: int) -> list[Draft]:
        done = len(seq) - self.start
        right = tuple(self.truth[done : done + min(depth, self.depth)])
        if not right:
            return []
        wrong_first = ((right[0] + 1) % self.vocab,) + right[1:]  # a sibling at depth 1
        wrong_third = right[:2] + ((right[2] + 7) % self.vocab,) if len(right) > 2 else ()  # shares 2 tokens
        drafts = [Draft(self.name, wrong_first, "x"), Draft(self.name, right, "x")]
        if wrong_third:
            drafts.append(Draft(self.name, wrong_third, "x"))
        return drafts[:limit]

    def observe(self, seq: list[int], new: int) -> None:
        pass


def decode(engine, ids: list[int], stop: frozenset[int] = frozenset(), cfg: TreeConfig | None = None,
           drafters: Drafters | None = None, max_new: int = 40) -> DecodeState:
    """Drive AR (cfg None) or tree decoding directly on the engine's runner, with our own stop set."""
    engine.sessions.invalidate_working_cache()
    engine.runner.prefill(ids[:-1], 0)
    state = DecodeState(list(ids), max_new, stop)
    if cfg is None:
        decode_ar(engine.runner, state)
    else:
        decode_tree(engine.runner, state, cfg, drafters or Drafters())
    return state


def check_stats(state: DecodeState) -> None:
    """Per-step accounting adds up: every committed token belongs to exactly one step."""
    assert sum(state.accepted) == len(state.new) and state.steps == len(state.accepted)


# -- the trie and the step layout -------------------------------------------------------------------
def put(trie: TokenTrie, cal: Calibration, tokens: tuple[int, ...], source: str, key: str) -> None:
    k = cal.key(source, key)
    trie.insert(tokens, k, int(cal.column[k]))


def test_a_reset_trie_is_a_new_one() -> None:
    """The decode loop reuses two tries: reset to a new root, one holds exactly what a new trie would. Catches a
    reset that leaves the old root's children reachable or keeps the old size."""
    cal = Calibration()
    used = TokenTrie(root=1)
    put(used, cal, (2, 3, 4), "prompt", "m4")
    put(used, cal, (5,), "history", "m1")
    used.reset(7)
    fresh = TokenTrie(root=7)
    for trie in (used, fresh):
        put(trie, cal, (2, 8), "prompt", "m2")
    assert used.size == fresh.size == 3 and used.child(0, 5) == -1
    n = used.size
    for name in ("token", "parent", "depth", "first_child", "next_sibling", "keys"):
        assert getattr(used, name)[:n].tolist() == getattr(fresh, name)[:n].tolist(), name


def test_trie_shares_prefixes_and_selects_whole_paths() -> None:
    """Drafts with a common prefix share its nodes (one row each), and a budget cut keeps every chosen node's
    parent: catches a trie that duplicates prefixes or a selection that orphans a node."""
    trie, cal = TokenTrie(root=1, capacity=2), Calibration()  # a small capacity that inserting must grow
    put(trie, cal, (5, 6, 7, 8), "a", "p0.5")  # keys "p<x>": a prior belief of x
    put(trie, cal, (5, 6, 9), "b", "p0.9")
    put(trie, cal, (4,), "a", "p0.5")
    assert trie.size == 1 + 4 + 1 + 1  # 5 and 6 are shared
    five = trie.child(0, 5)
    assert trie.sources_of(five, cal) == {"a": "p0.5", "b": "p0.9"}
    assert trie.depth[trie.child(trie.child(five, 6), 9)] == 3 and trie.child(five, 9) == -1
    trie.score(cal)
    assert trie.prob[five] == pytest.approx(1 - 0.5 * 0.1)  # two sources agreeing are more likely right
    assert trie.reach[trie.child(five, 6)] == pytest.approx(trie.prob[five] ** 2)
    for budget in range(trie.size):
        chosen = trie.select(budget).tolist()
        assert len(chosen) == budget
        assert all(trie.parent[i] == 0 or trie.parent[i] in chosen[:k] for k, i in enumerate(chosen))
    # Budget 3: the confident shared path 5, 6 and source b's continuation 9 beat a's lone 4 and deep 7.
    assert trie.token[trie.select(3)].tolist() == [5, 6, 9]


def test_recycling_grows_into_the_trie_on_the_paths_drafts_made() -> None:
    """The recycling tree lands on the nodes that text drafts already made, with both sources' keys, and adds
    new branches where it differs: catches a tree grown under the wrong parent or a node made twice."""
    trie, cal, rec = TokenTrie(root=1), Calibration(), Recycling(top_k=2)
    put(trie, cal, (5, 6), "a", "k")
    logits = torch.full((2, 10), -30.0)
    logits[0, 5], logits[0, 8] = 5.0, 2.0  # after 1: 5, or 8
    logits[1, 6], logits[1, 7] = 4.0, 4.0  # after 5: 6 or 7
    rec.learn([1, 5], logits)
    assert rec.grow(trie, [0, 1], depth=2, limit=4, calibration=cal) == 4
    five, eight = trie.child(0, 5), trie.child(0, 8)
    six, seven = trie.child(five, 6), trie.child(five, 7)
    assert trie.size == 1 + 4 and min(five, six, seven, eight) > 0
    assert trie.sources_of(five, cal) == {"a": "k", "recycling": "p0.9"}
    assert trie.sources_of(six, cal) == {"a": "k", "recycling": "p0.3"}  # its probability is ~0.5
    assert trie.sources_of(seven, cal) == {"recycling": "p0.3"} and trie.depth[seven] == 2 and trie.depth[eight] == 1


def test_build_step_layout() -> None:
    """Each node sits at position p + depth and sees the root, its ancestors and itself; the window keeps v1's
    layout; padding rows see only themselves. Catches a mask that leaks a sibling's K/V into a node."""
    trie, cal = TokenTrie(root=3), Calibration()
    put(trie, cal, (10, 11, 12), "a", "k")
    put(trie, cal, (10, 20), "a", "k")
    put(trie, cal, (30,), "a", "k")
    trie.score(cal)
    chosen = trie.select(8)
    assert len(chosen) == trie.size - 1 == 5  # a budget larger than the trie takes all of it
    window = JacobiWindow(2, 2, [1, 2, 3, 4, 5, 6], None)
    step = build_step(16, trie, chosen, window.layout(), window.tokens())
    first = 1 + window.rows
    assert step.used == first + 5 and step.tokens[step.used :].tolist() == [3] * (16 - step.used)
    assert step.tokens[1:first].tolist() == window.tokens()
    assert (step.local[:first, :first] == window.layout().local.numpy()).all()
    assert (step.rel_pos[:first] == window.layout().rel_pos.numpy()).all()
    for i in chosen:
        row = step.row_of[i]
        assert step.tokens[row] == trie.token[i] and step.rel_pos[row] == trie.depth[i]
        seen = set(step.local[row].nonzero()[0].tolist())
        assert seen == {0, row} | {step.row_of[a] for a in trie.path(i)[:-1]}
        assert step.parent_row[row] == step.row_of[trie.parent[i]]
    assert step.previous(7)[: first + 2].tolist() == [7] + [-1] * window.rows + [3, 10]  # rows of 10 and 11
    for row in range(step.used, 16):
        assert set(step.local[row].nonzero()[0].tolist()) == {row}
    with pytest.raises(ValueError):
        build_step(8, trie, chosen, window.layout(), window.tokens())  # root + 4 window rows + 5 nodes > 8


def test_accept_walks_the_greedy_path_only() -> None:
    """Acceptance follows the parent row's prediction, never a node that was left out of the step."""
    trie, cal = TokenTrie(root=1), Calibration()
    put(trie, cal, (5, 6, 7), "a", "k")
    put(trie, cal, (5, 8), "a", "k")
    trie.score(cal)
    chosen = trie.select(3)  # 5, 6, 7 (or 8): one node of depth 2 or 3 is left out
    step = build_step(8, trie, chosen)
    pred = np.zeros(8, np.int64)
    pred[0] = 5
    pred[step.row_of[trie.child(0, 5)]] = 8 if 8 in trie.token[chosen] else 6
    path, bonus = accept(trie, step, pred)
    assert trie.token[path].tolist()[:2] in ([5, 8], [5, 6])
    left_out = next(t for t in (6, 7, 8) if t not in trie.token[chosen])
    pred[step.row_of[path[-1]]] = left_out
    path, bonus = accept(trie, step, pred)
    assert bonus == left_out and left_out not in trie.token[path]
    pred[0] = 9  # the model disagrees at once: nothing accepted, its own token is the bonus
    path, bonus = accept(trie, step, pred)
    assert path.tolist() == [] and bonus == 9


# -- the sources ------------------------------------------------------------------------------------
def test_prompt_lookup_longest_match_variable_length() -> None:
    """The longest earlier match comes first and its continuation runs as far as the text (and depth) allow;
    catches fixed-length n-gram lookup and recency beating a longer match."""
    text = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 2, 3, 40, 41, 9, 1, 2, 3]
    lookup = PromptLookup(text)
    drafts = lookup.propose(text, depth=10, limit=4)
    assert drafts[0].tokens == (4, 5, 6, 7, 8, 9, 0, 2, 3, 40) and drafts[0].key == "m4"  # match 1,2,3
    assert drafts[1].tokens == (40, 41, 9, 1, 2, 3) and drafts[1].key == "m2"  # only 2,3 matches
    lookup.observe(text + [4, 5], 2)  # the text grows: 1,2,3,4,5 now matches 5 tokens back
    assert lookup.propose(text + [4, 5], 3, 1)[0].tokens == (6, 7, 8)
    assert PromptLookup([7]).propose([7], 4, 4) == []
    suffix_only = PromptLookup([5, 1, 2], extra=[1, 2, 99, 98])  # the code after the cursor, not in the prompt
    assert suffix_only.propose([5, 1, 2], 4, 4)[0].tokens == (99, 98, 5, 1)


def test_prompt_lookup_agrees_with_a_scan_of_every_earlier_position() -> None:
    """On random small-alphabet texts (many repeats, long matches), growing step by step: the drafts equal those
    of a plain scan of every earlier position, in the same order. Catches an off-by-one in the vectorized
    search or its backward extension, a match cut short, or a lost recency order."""
    import random

    from engine.sources.prompt_lookup import MAX_MATCH

    def scan(text: list[int], depth: int, limit: int) -> list[tuple[tuple[int, ...], str]]:
        end = len(text) - 1
        found = []
        for i in range(end - 1, 0, -1):  # most recent first
            if (text[i - 1], text[i]) == (text[end - 1], text[end]):
                m = 2
                while m < MAX_MATCH and i - m >= 0 and text[i - m] == text[end - m]:
                    m += 1
                found.append((m, i + 1))
        found.sort(key=lambda f: -f[0])
        drafts: list[tuple[tuple[int, ...], str]] = []
        for m, after in found:
            cont = tuple(text[after : after + depth])
            if cont and cont not in [d[0] for d in drafts]:
                drafts.append((cont, match_bucket(m)))
        return drafts[:limit]

    rng = random.Random(7)
    for alphabet in (2, 3, 6):
        text = [rng.randrange(alphabet) for _ in range(40)]
        lookup = PromptLookup(text[:-1], extra=[rng.randrange(alphabet) for _ in range(5)])
        lookup.observe(text, 1)
        for _ in range(30):
            full = list(lookup.text)
            got = [(d.tokens, d.key) for d in lookup.propose(text, 6, 5)]
            assert got == scan(full, 6, 5)
            text.append(rng.randrange(alphabet))
            lookup.observe(text, 1)
        text.extend(rng.randrange(alphabet) for _ in range(400))  # past the buffer's first size: it grows
        lookup.observe(text, 400)
        assert [(d.tokens, d.key) for d in lookup.propose(text, 6, 5)] == scan(list(lookup.text), 6, 5)


def test_suffix_automaton_matches_and_branches() -> None:
    """Every token that followed the matched suffix in the history is a branch, most recent first; records never
    run into each other; a full automaton keeps its newest records. Catches a broken automaton construction."""
    sam = SuffixAutomaton(max_tokens=64)
    sam.add([1, 2, 3, 4, 5])
    sam.add([9, 2, 3, 7, 8])
    lookup = HistoryLookup({"doc": sam}, [0, 2, 3])
    assert [d.tokens for d in lookup.propose([0, 2, 3], 5, 4)] == [(7, 8), (4, 5)]
    lookup.observe([0, 2, 3, 4], 1)
    assert [d.tokens for d in lookup.propose([0, 2, 3, 4], 5, 4)] == [(5,)]  # the record ends: no 9 after 5
    lookup.observe([0, 2, 3, 4, 6], 1)
    assert lookup.propose([0, 2, 3, 4, 6], 5, 4) == []  # no match any more
    # Brute force on random records: the reported match is the longest suffix that occurs in some record.
    g = torch.Generator().manual_seed(0)
    records = [torch.randint(0, 6, (12,), generator=g).tolist() for _ in range(4)]
    sam = SuffixAutomaton(max_tokens=1000)
    for r in records:
        sam.add(r)
    text = torch.randint(0, 6, (30,), generator=g).tolist()
    state = matched = 0
    for n, c in enumerate(text, 1):
        state, matched = sam.step(state, matched, c)
        best = max(m for m in range(0, min(n, 12) + 1)
                   if m == 0 or any(r[i : i + m] == text[n - m : n] for r in records for i in range(len(r) - m + 1)))
        assert matched == best, (n, matched, best)
    full = SuffixAutomaton(max_tokens=20)
    for k in range(10):
        full.add([100 + k] * 3)
    assert len(full.text) <= 20 and full.records[-1] == [109] * 3 and [100] * 3 not in full.records


def leaf_paths(rec: Recycling, seq: list[int], depth: int, limit: int) -> list[tuple[int, ...]]:
    """The root-to-leaf paths of the tree `rec` grows after `seq`."""
    trie = TokenTrie(seq[-1])
    rec.grow(trie, seq, depth, limit, Calibration())
    inner = set(trie.parent[1 : trie.size].tolist())
    return [tuple(trie.token[trie.path(leaf)].tolist()) for leaf in range(1, trie.size) if leaf not in inner]


def test_recycling_grows_the_most_probable_tree() -> None:
    """The table keeps each token's latest top-k successors from the logits; drafts are the root-to-leaf paths
    of the best-first tree. Catches a table keyed by the wrong row and a tree that ignores probabilities."""
    rec = Recycling(top_k=2)
    logits = torch.full((3, 10), -30.0)
    logits[0, 4], logits[0, 5] = 5.0, 4.0  # after token 1: 4 (likely) or 5
    logits[1, 6], logits[1, 7] = 5.0, 1.0  # after token 4: 6, rarely 7
    logits[2, 8], logits[2, 9] = 3.0, 3.0  # after token 6: 8 or 9
    rec.learn([1, 4, 6], logits)
    assert rec.successors(None, 1)[0] == (4, 5) and rec.successors(None, 4)[0] == (6, 7)
    assert rec.successors(None, 1)[1][0] == pytest.approx(torch.softmax(logits[0], -1)[4].item(), rel=1e-5)
    # Best 4 nodes: 4 (.73), 4-6 (.72), 4-6-8 and 4-6-9 (.36 each) beat 5 (.27).
    assert sorted(leaf_paths(rec, [0, 1], depth=3, limit=4)) == [(4, 6, 8), (4, 6, 9)]
    assert leaf_paths(rec, [0, 2], 3, 4) == []  # nothing known about token 2
    assert len(leaf_paths(rec, [0, 1], depth=1, limit=4)) == 2  # depth 1: just the two successors
    # Successors seen after the pair (7, 1) win over token 1's own, for that pair only.
    after_pair = torch.full((1, 10), -30.0)
    after_pair[0, 3] = 9.0
    rec.learn([1], after_pair, previous=[7])
    assert leaf_paths(rec, [7, 1], depth=1, limit=1) == [(3,)]
    assert leaf_paths(rec, [0, 1], depth=1, limit=1) == [(3,)]  # the plain table saw the newest row too
    rec.learn([1], logits[:1], previous=[None])
    assert leaf_paths(rec, [7, 1], 1, 1) == [(3,)] and leaf_paths(rec, [0, 1], 1, 1) == [(4,)]
    with pytest.raises(ValueError, match="past the recycling table"):  # compiled code would write out of bounds
        Recycling(top_k=2, vocab=4).learn([6], logits[:1])
    bounded = Recycling(top_k=1, max_pairs=8)
    for t in range(20):
        bounded.learn([t], logits[:1], previous=[100 + t])
    assert len(bounded.pairs) == 8 and pair_key(119, 19) in bounded.pairs and pair_key(111, 11) not in bounded.pairs
    assert bounded.successors(112, 12) == bounded.successors(None, 19)  # the oldest kept pair, the newest row


def test_pair_table_keeps_the_newest_pairs_through_many_evictions() -> None:
    """The (previous, token) rows live in a ring found through an open-addressing hash table whose deletions
    move later entries back. Thousands of pairs from a small alphabet (repeats, evictions, long probe runs in a
    table sized for 64) against a plain dict model: catches a deletion that strands an entry past an empty slot
    (a kept pair no longer found), a re-seen pair given a second row, and an evicted pair still found."""
    rec = Recycling(top_k=1, max_pairs=64, vocab=64)
    rng = np.random.default_rng(0)
    model: dict[tuple[int, int], int] = {}  # pair -> its newest successor, in insertion order of their rows
    for step in range(3000):
        prev, token = (int(x) for x in rng.integers(0, 40, 2))
        rec.remember(np.array([token]), np.array([[step % 64]]), np.array([[0.5]], np.float32), np.array([prev]))
        if (prev, token) not in model and len(model) == 64:
            del model[next(iter(model))]  # the ring's oldest row goes
        model[prev, token] = step % 64
        if step % 97 == 0 or step > 2900:
            assert len(rec.pairs) == len(model)
            for (p, t), successor in model.items():
                assert rec.successors(p, t)[0] == (successor,)
            gone = [(p, t) for p in range(40) for t in range(40) if (p, t) not in model]
            assert not any(pair_key(p, t) in rec.pairs for p, t in gone)


def test_calibration_learns_from_the_true_path() -> None:
    """A source that is always right gains confidence, one that is always wrong loses it; only guesses whose
    parent was right count. Catches calibration that never moves (budget never follows the sources)."""
    cal = Calibration()
    before = cal.prob("prompt", "m4", 1)
    for _ in range(20):
        trie = TokenTrie(root=0)
        put(trie, cal, (1, 2, 3), "prompt", "m4")
        put(trie, cal, (5, 6), "jacobi", "")
        put(trie, cal, (1, 9), "jacobi", "")
        cal.learn(trie, [1, 2, 3, 4])
    assert cal.prob("prompt", "m4", 1) > 0.85 > before
    assert cal.prob("jacobi", "", 1) == pytest.approx(0.5, abs=0.05)  # 1 right, 5 wrong
    assert cal.prob("jacobi", "", 2) < 0.1
    assert cal.counts[("jacobi", "", 2)] == [0, 20]  # 9 after a right 1 counts; 6 after a wrong 5 does not


@pytest.mark.parametrize("spec", ["32", "8,2,2,3", "16,0,2,4:prompt+history", "64,4,3,12:jacobi"])
def test_tree_config_round_trips(spec: str) -> None:
    cfg = TreeConfig.parse(spec)
    assert TreeConfig.parse(str(cfg)) == cfg
    assert cfg.window_rows < cfg.budget


@pytest.mark.parametrize("spec", ["0", "4,2,2", "8,2,0", "8,1,1,0", "16:nope", "1,2,3,4,5", "x"])
def test_tree_config_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError):
        TreeConfig.parse(spec)


# -- exactness on tiny models -----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("budget", [4, 8, 32])
def test_tiny_verifier_with_shared_prefix_drafts_equals_ar(tiny_engine, arch: str, budget: int) -> None:
    """Right drafts with wrong siblings sharing their prefixes: output is AR's and steps drop sharply; catches any
    error in the tree mask, positions, acceptance or K/V moves (a wrong K/V corrupts every later token)."""
    engine = tiny_engine(arch)
    ids = engine.codec.encode("def total(values):\n    s = 0\n")
    ar = decode(engine, ids)
    scripted = Scripted(ar.new, len(ids))
    tree = decode(engine, ids, cfg=TreeConfig(budget, 0, 1, 5, ("prompt",)), drafters=Drafters([scripted]))
    assert tree.new == ar.new
    check_stats(tree)
    # The right draft and its wrong sibling look alike, so small budgets split their rows between both;
    # 32 rows hold every draft whole (5 drafted tokens + the bonus).
    assert max(tree.accepted) >= {4: 2, 8: 3, 32: 6}[budget]
    assert tree.steps <= len(ar.new) // 2
    # Every token but each step's bonus (the last step's may fall past the length limit).
    assert len(ar.new) - tree.steps <= tree.by_source["scripted"] <= len(ar.new) - tree.steps + 1


def test_learning_while_the_next_step_runs_learns_what_learning_at_once_does(tiny_engine) -> None:
    """On a GPU each step's calibration counts and per-source tallies are made while the next step runs, from the
    trie that step was built from, while the loop builds the next trie in a second one. Forced here on the CPU:
    the same tokens, tallies and counts as learning at once. Catches learning from a trie already reset for the
    next step, and the last step's lesson left unlearnt."""
    engine = tiny_engine("qwen2")
    ids = engine.codec.encode("def total(values):\n    s = 0\n")
    truth = decode(engine, ids).new
    runs = []
    for overlap in (False, True):
        engine.sessions.invalidate_working_cache()
        engine.runner.prefill(ids[:-1], 0)
        state, drafters = DecodeState(list(ids), 40, frozenset()), Drafters([Scripted(truth, len(ids))])
        decode_tree(engine.runner, state, TreeConfig(16, 0, 1, 6, ("prompt",)), drafters, overlap=overlap)
        runs.append((state, drafters.calibration.counts))
    (at_once, counts), (overlapped, overlapped_counts) = runs
    assert overlapped.new == at_once.new == truth and overlapped.accepted == at_once.accepted
    assert overlapped.by_source == at_once.by_source and overlapped.pool_hits == at_once.pool_hits > 0
    assert overlapped_counts == counts and sum(n for _, n in counts.values()) > 0


class Counted(Scripted):
    """`Scripted`, counting the steps it was asked to draft for."""

    asked = 0

    def propose(self, seq: list[int], depth: int, limit: int) -> list[Draft]:
        self.asked += 1
        return super().propose(seq, depth, limit)


def test_a_first_step_drafted_ahead_is_the_one_that_runs(tiny_engine) -> None:
    """The engine drafts a tree's first step while the GPU prefills (`first_step`): decoding must launch that
    step, not draft it again, and commit what drafting it in the loop commits. Catches a loop that ignores
    `first` (the source is asked once more), and one that runs it with another trie or layout (other tokens)."""
    engine = tiny_engine("qwen2")
    ids = engine.codec.encode("def total(values):\n    s = 0\n")
    truth = decode(engine, ids).new
    runs = []
    for ahead in (False, True):
        engine.sessions.invalidate_working_cache()
        engine.runner.prefill(ids[:-1], 0)
        cfg, source = TreeConfig(16, 0, 1, 6, ("prompt",)), Counted(truth, len(ids))
        drafters = Drafters([source])
        first = first_step(engine.runner, list(ids), cfg, drafters) if ahead else None
        asked_ahead = source.asked
        state = DecodeState(list(ids), 40, frozenset())
        decode_tree(engine.runner, state, cfg, drafters, first=first)
        runs.append((state, source.asked, asked_ahead))
    (loop, asked, _), (ahead, asked_with_first, asked_ahead) = runs
    assert ahead.new == loop.new == truth and ahead.accepted == loop.accepted and max(loop.accepted) > 1
    assert asked_ahead == 1 and asked_with_first == asked == loop.steps


def test_a_first_step_drafted_for_another_sequence_is_refused(tiny_engine) -> None:
    """A step drafted ahead for other text would verify drafts after the wrong token: refused, not decoded."""
    engine = tiny_engine("qwen2")
    ids = engine.codec.encode("def total(values):\n    s = 0\n")
    engine.sessions.invalidate_working_cache()
    engine.runner.prefill(ids[:-2], 0)
    cfg = TreeConfig(16, 0, 1, 6, ("prompt",))
    first = first_step(engine.runner, list(ids), cfg, Drafters())
    with pytest.raises(ValueError, match="another sequence"):
        decode_tree(engine.runner, DecodeState(list(ids[:-1]), 8, frozenset()), cfg, Drafters(), first=first)


def test_a_one_row_budget_decodes_as_ar_with_nothing_drafted_ahead(tiny_engine) -> None:
    """A budget of the root's row alone has nothing to verify: no first step is drafted, and the engine's
    tree request returns AR's tokens in one-token steps. Catches a first step laid out with no room for drafts
    (or a one-row tree run as a tree) where plain greedy steps were meant."""
    engine = tiny_engine("qwen2")
    ids = engine.codec.encode(REPETITIVE)
    assert first_step(engine.runner, list(ids), TreeConfig(1), Drafters()) is None
    kw = dict(document="one-row", max_tokens=24, type_through=False)
    ar = complete(engine, REPETITIVE, decoding="ar", **kw)
    one = complete(engine, REPETITIVE, decoding="tree", tree=TreeConfig(1), **kw)
    assert one.tokens == ar.tokens and one.steps == len(one.tokens)


def test_the_engine_drafts_a_trees_first_step_before_decoding_starts(tiny_engine, monkeypatch) -> None:
    """`Engine.complete` drafts the first tree step after launching the prefill and before its decode clock
    starts (on a GPU: before it waits for the prefill), and decodes with that very step. Catches drafting moved
    back into the loop (the first step's host work counted in the decode again) and a draft left unused."""
    import engine.engine as engine_module

    engine = tiny_engine("qwen2")
    events: list[str] = []
    made: list = []
    prefill, first_fn, state_cls, decode_fn = (engine.runner.prefill, engine_module.first_step,
                                               engine_module.DecodeState, engine_module.decode_tree)

    def spy_first(*args, **kwargs):
        events.append("first step")
        made.append(first_fn(*args, **kwargs))
        return made[-1]

    def spy_decode(*args, first=None, **kwargs):
        events.append("decode" + (" with it" if first is not None and first is made[-1] else ""))
        return decode_fn(*args, first=first, **kwargs)

    monkeypatch.setattr(engine.runner, "prefill", lambda *a, **k: events.append("prefill") or prefill(*a, **k))
    monkeypatch.setattr(engine_module, "first_step", spy_first)
    monkeypatch.setattr(engine_module, "DecodeState", lambda *a, **k: events.append("clock") or state_cls(*a, **k))
    monkeypatch.setattr(engine_module, "decode_tree", spy_decode)
    done = engine.complete(CompletionRequest("def total(values):\n    s = 0\n", "", max_tokens=8, decoding="tree",
                                             tree=TreeConfig(16)))
    assert events == ["prefill", "first step", "clock", "decode with it"] and done.tokens


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_empty_tree_is_ar(tiny_engine, arch: str) -> None:
    """No source proposes anything: each step commits exactly the greedy token (the padded rows change nothing)."""
    engine = tiny_engine(arch)
    ids = engine.codec.encode(REPETITIVE)
    ar = decode(engine, ids)
    tree = decode(engine, ids, cfg=TreeConfig(16, 0, 1, 8, ("prompt",)), drafters=Drafters())
    assert tree.new == ar.new and tree.accepted == [1] * len(ar.new) and tree.by_source == {}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_stop_token_inside_accepted_path(tiny_engine, arch: str) -> None:
    """A stop token in the middle of an accepted path ends the output right there, as AR does."""
    engine = tiny_engine(arch)
    ids = engine.codec.encode("def total(values):\n    s = 0\n")
    free = decode(engine, ids)
    cfg = TreeConfig(16, 0, 1, 6, ("prompt",))
    tree = decode(engine, ids, cfg=cfg, drafters=Drafters([Scripted(free.new, len(ids))]))
    assert tree.new == free.new and tree.accepted[0] >= 4
    stop_at = next(k for k in range(1, tree.accepted[0]) if free.new[k] not in free.new[:k])  # inside step 1
    stop = frozenset({free.new[stop_at]})
    ar = decode(engine, ids, stop)
    cut = decode(engine, ids, stop, cfg, Drafters([Scripted(free.new, len(ids))]))
    assert ar.new == cut.new == free.new[:stop_at]
    assert ar.stop_reason == cut.stop_reason == "stop" and cut.steps == 1
    assert cut.by_source == {"scripted": stop_at}  # all committed tokens were drafted: no bonus this time
    check_stats(cut)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("source", SOURCES)
def test_tiny_each_source_alone_equals_ar(tiny_engine, arch: str, source: str) -> None:
    """Each real source on its own, through the engine, twice on one document (history needs a first run):
    AR's tokens, and on looping output the source saves steps. Catches a source whose drafts break exactness
    (wrong rows, stale state) or that never gets anything accepted."""
    engine = tiny_engine(arch)
    engine.sessions.forget_learned()
    cfg = TreeConfig(24, 4 if source == "jacobi" else 0, 2, 8, (source,))
    kw = dict(document=f"alone-{source}", max_tokens=40, type_through=False)
    ar = complete(engine, REPETITIVE, decoding="ar", **kw)
    runs = [complete(engine, REPETITIVE, decoding="tree", tree=cfg, **kw) for _ in range(2)]
    for run in runs:
        assert run.tokens == ar.tokens and run.text == ar.text
        assert sum(run.accepted_per_step) == len(run.tokens) == 40
        assert set(run.by_source) <= {source}
    assert runs[-1].by_source.get(source, 0) > 0 and runs[-1].steps < ar.steps


def test_healing_prunes_drafts_that_disagree_with_the_removed_bytes(tiny_tokenizer) -> None:
    """Per trie node, what healing still has to re-type after its path; nodes that contradict it, and all below
    them, lose their reach (no row for what cannot be accepted). Catches a dead branch left selectable, a
    covered path still treated as healing, and a partial token whose rest is miscounted."""
    from engine.healing import Healing
    from engine.tokens import Codec

    codec = Codec(tiny_tokenizer)
    a, b, c = (codec.encode(x)[0] for x in "abc")
    trie = TokenTrie(c)
    for path in ([a], [a, b], [a, c], [c], [c, a], [a, b, c]):
        trie.insert(path, 0, 0)
    trie.reach[: trie.size] = 0.5
    healing = Healing(codec, b"ab")
    rest = healing.prune(trie)
    node = {tuple(trie.token[n] for n in trie.path(i)): i for i in range(1, trie.size)}
    expect = {(a,): b"b", (a, b): b"", (a, c): None, (c,): None, (c, a): None, (a, b, c): b""}
    assert {path: rest[i] for path, i in node.items()} == expect
    assert {path: float(trie.reach[i]) for path, i in node.items()} == {
        path: 0.0 if left is None else 0.5 for path, left in expect.items()}
    healing.advance([a])
    assert healing.rest == b"b" and healing.guesses() == [(b, "exact")]
    longer = next(t for t in codec.healing_candidates(b"b") if len(codec.token_bytes[t]) > 1)
    healing.advance([longer])  # a token that starts with the rest and goes on ends healing too
    assert not healing

def test_tiny_healing_inside_tree_steps_equals_ar(tiny_engine) -> None:
    """Prompts cut everywhere (inside names, after indentation): tree decoding re-types the healed bytes in its
    own steps with AR's tokens (AR heals by one-row steps). Catches a row judged by the plain greedy choice
    where healing's applies, at the root or deeper (a healing guess accepted, then the next healing token),
    and healing left to one-row steps before the tree's."""
    from engine.runner import DECODE

    engine = tiny_engine("qwen2")
    codec, runner = engine.codec, engine.runner
    shapes: list[str] = []
    step = runner.step

    def counted(shape, *args, **kwargs):
        shapes.append(shape.name)
        return step(shape, *args, **kwargs)

    kw = dict(max_tokens=16, type_through=False, reuse_kv=False)
    several = 0
    for cut in range(30, 200, 3):
        prompt = REPETITIVE[:cut]
        ar = complete(engine, prompt, decoding="ar", document="heal-ar", **kw)
        runner.step, shapes[:] = counted, []
        try:
            tree = complete(engine, prompt, decoding="tree", tree=TreeConfig(32), document="heal-tree", **kw)
        finally:
            del runner.step
        assert tree.tokens == ar.tokens, cut
        assert DECODE.name not in shapes, cut
        removed = codec.token_bytes[codec.encode(prompt)[-1]]
        healing = next(n for n in range(1, len(ar.tokens) + 1) if len(codec.to_bytes(ar.tokens[:n])) >= len(removed))
        several += healing > 1 and tree.accepted_per_step[0] >= healing
    assert several >= 3  # healing over two tokens or more, done in the first step (8 of 57 when written)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("spec", ["8", "32,4,2", "64,8,3,16", "2"])
def test_tiny_all_sources_equal_ar(tiny_engine, arch: str, spec: str) -> None:
    """All sources together at several budgets (2: a single draft row), across a cold and a warm request."""
    engine = tiny_engine(arch)
    cfg = TreeConfig.parse(spec)
    kw = dict(document="all", max_tokens=40, type_through=False)
    ar = complete(engine, REPETITIVE, "\n\nprint(fibonacci(3))\n", decoding="ar", **kw)
    for _ in range(2):
        tree = complete(engine, REPETITIVE, "\n\nprint(fibonacci(3))\n", decoding="tree", tree=cfg, **kw)
        assert tree.tokens == ar.tokens
        assert tree.steps < ar.steps
        assert tree.lookahead == str(cfg) and tree.decoding == "tree"


class CountingCalibration(Calibration):
    def __init__(self):
        super().__init__()
        self.lessons = 0

    def learn(self, trie, truth) -> None:
        self.lessons += 1
        super().learn(trie, truth)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_overlapped_learning_equals_ar_and_loses_no_lesson(tiny_engine, arch: str) -> None:
    """The GPU's order (learn from step k while step k+1 runs), forced on the CPU: AR's tokens, and every step,
    the last one included, is learned from. Catches lessons read from the wrong step or a last one dropped."""
    engine = tiny_engine(arch)
    ids = engine.codec.encode(REPETITIVE)
    ar = decode(engine, ids, max_new=40)
    for overlap in (False, True):
        calibration = CountingCalibration()
        drafters = Drafters([PromptLookup(ids)], Recycling(), None, calibration)
        engine.sessions.invalidate_working_cache()
        engine.runner.prefill(ids[:-1], 0)
        state = DecodeState(list(ids), 40, frozenset())
        decode_tree(engine.runner, state, TreeConfig(16), drafters, overlap=overlap)
        assert state.new == ar.new and state.steps < ar.steps
        assert calibration.lessons == state.steps
        assert len(drafters.recycling.pairs) and sum(o for _, o in calibration.counts.values()) > 0


class AskedPromptLookup(PromptLookup):
    """Prompt lookup that notes how many drafts each step asked it for."""

    def __init__(self, seq: list[int]):
        super().__init__(seq)
        self.limits: list[int] = []

    def propose(self, seq: list[int], depth: int, limit: int) -> list[Draft]:
        self.limits.append(limit)
        return super().propose(seq, depth, limit)


def test_tiny_text_sources_are_asked_for_their_best_few_drafts(tiny_engine) -> None:
    """A text source is asked for TEXT_DRAFTS drafts a step however many rows the budget has: its further
    drafts seldom win rows, and each costs host time between two GPU steps. Catches the cap dropped (a source
    asked for the whole budget) and a cap that changes the output."""
    engine = tiny_engine("qwen2")
    ids = engine.codec.encode(REPETITIVE)
    ar = decode(engine, ids)
    source = AskedPromptLookup(ids)
    tree = decode(engine, ids, cfg=TreeConfig(32), drafters=Drafters([source]))
    assert tree.new == ar.new and tree.steps < ar.steps
    assert source.limits and set(source.limits) == {TEXT_DRAFTS}


def test_tiny_slot_moves_ride_with_the_next_step(tiny_engine, monkeypatch) -> None:
    """Accepted drafts' K/V moves are made by the next tree step itself, not by launches of their own, and the
    last step's once the request ends: AR's tokens, no separate move during decoding, none left queued after.
    Catches moves made apart again (two launches a step, ~130 us of host time on an H100) or a last move lost."""
    engine = tiny_engine("qwen2")
    kw = dict(document="moves", max_tokens=40, type_through=False)
    ar = complete(engine, REPETITIVE, decoding="ar", **kw)
    flushed: list[int] = []
    real = engine.runner.flush_moves
    monkeypatch.setattr(engine.runner, "flush_moves", lambda: flushed.append(len(engine.runner._pending)) or real())
    tree = complete(engine, REPETITIVE, decoding="tree", tree=TreeConfig(16), **kw)
    assert tree.tokens == ar.tokens and len(tree.tokens) > tree.steps + 1  # drafts accepted: slots moved
    assert sum(1 for queued in flushed if queued) <= 1 and not engine.runner._pending  # at most the last step's


def test_tiny_a_deep_draft_s_moves_ride_with_the_step(tiny_engine, monkeypatch) -> None:
    """The moves of an accepted path as deep as drafts of 24 tokens ride with the next step, and leave the cache
    as moves made on their own do. Catches a step that carries fewer moves than drafts are deep (on an H200 the
    separate launches cost ~90 us a step with drafts of 24 while a step carried 16) and carried moves that land
    elsewhere."""
    engine = tiny_engine("qwen2")
    runner = engine.runner
    engine.sessions.invalidate_working_cache()
    runner.prefill(list(range(3, 43)), 0)
    saved = runner.save(80)
    src, dst = list(range(10, 34)), list(range(50, 74))
    flushed: list[int] = []
    real = runner.flush_moves
    monkeypatch.setattr(runner, "flush_moves", lambda: flushed.append(len(runner._pending)) or real())
    runner.move_slots(src, dst)
    runner.step(tree_shape(8), [5] * 8, 80)
    assert not any(flushed) and not runner._pending  # carried by the step
    carried = runner.model.kv[:, :, :, 50:74].clone()
    runner.restore(saved)
    runner.move_slots(src, dst)
    runner.flush_moves()
    assert torch.equal(carried, runner.model.kv[:, :, :, 50:74])
    assert torch.equal(carried, saved[:, :, :, 10:34])


def test_tiny_step_times_cover_the_host_work_between_steps(tiny_engine) -> None:
    """A step's time runs from the previous commit to its own, so work done after a commit (here a source that
    takes 10 ms to observe) is counted in the next step: the steps add up to the whole decode. Catches step
    times that start at the loop's top again, which left the post-commit work out of "decode tok/s"."""
    import time

    class SlowLookup(PromptLookup):
        def observe(self, seq: list[int], new: int) -> None:
            time.sleep(0.01)
            super().observe(seq, new)

    engine = tiny_engine("qwen2")
    ids = engine.codec.encode(REPETITIVE)
    engine.runner.prefill(ids[:-1], 0)
    state = DecodeState(list(ids), 24, frozenset())
    decode_tree(engine.runner, state, TreeConfig(16), Drafters([SlowLookup(ids)], Recycling()), overlap=False)
    assert state.steps > 2 and sum(state.step_ms) >= 10 * (state.steps - 1)


@pytest.mark.parametrize("max_tokens", [1, 3])
def test_tiny_length_limit_inside_accepted_path(tiny_engine, max_tokens: int) -> None:
    """A warm document accepts long paths at once; the length limit must still cut at exactly max_tokens."""
    engine = tiny_engine("qwen2")
    cfg = TreeConfig(32, 0, 1, 8)
    kw = dict(document="cut", type_through=False, heal=False)
    complete(engine, REPETITIVE, decoding="tree", tree=cfg, max_tokens=40, **kw)  # history now holds the answer
    ar = complete(engine, REPETITIVE, decoding="ar", max_tokens=max_tokens, **kw)
    tree = complete(engine, REPETITIVE, decoding="tree", tree=cfg, max_tokens=max_tokens, **kw)
    assert tree.tokens == ar.tokens and len(tree.tokens) == max_tokens and tree.stop_reason == "length"
    assert tree.steps == 1


def test_tree_is_a_request_decoding_and_the_cpu_default(tiny_engine) -> None:
    """"tree" validates as a decoding and runs the engine's default tree when none is given; on the CPU plain
    "lookahead" (no W,N,G) runs it too, while an explicit W,N,G still pins v1. Catches the default switch
    silently running something else, or overriding a caller's explicit lookahead config."""
    from engine.engine import TREE_BY_DEFAULT
    from engine.lookahead import LookaheadConfig

    engine = tiny_engine("qwen2")
    CompletionRequest("x", decoding="tree").validate()
    kw = dict(max_tokens=16, type_through=False)
    ar = complete(engine, REPETITIVE, decoding="ar", **kw)
    tree = complete(engine, REPETITIVE, decoding="tree", **kw)
    assert tree.lookahead == str(engine.default_tree()) and tree.tokens == ar.tokens
    assert TREE_BY_DEFAULT["cpu"]
    default = complete(engine, REPETITIVE, decoding="lookahead", **kw)
    assert (default.decoding, default.lookahead, default.tokens) == ("tree", str(engine.default_tree()), ar.tokens)
    pinned = complete(engine, REPETITIVE, decoding="lookahead", lookahead=LookaheadConfig(4, 3, 4), **kw)
    assert (pinned.decoding, pinned.lookahead, pinned.tokens) == ("lookahead", "4,3,4", ar.tokens)


def test_recycling_table_is_sized_for_the_vocabulary_once(tiny_engine) -> None:
    """The shared table has a row per vocabulary id from the start, so no step reallocates it (grown on demand,
    each fresh table, every bench case, paid ~6 copies of up to 5 MB for Qwen's vocabulary; a token past its rows
    is now an error). Catches the table built without the model's vocabulary size."""
    engine = tiny_engine("qwen2")
    table = engine.sessions.recycling.table
    assert len(table) == engine.model.args.vocab_size
    complete(engine, REPETITIVE, decoding="tree", tree=TreeConfig(16), max_tokens=24)
    assert engine.sessions.recycling.table is table and (table[:, 0, 0] >= 0).any()


def test_history_remembers_per_document_and_workspace(tiny_engine) -> None:
    """A completion seen before (same document, or another document of the workspace) is accepted in long
    paths; a non-persistent request leaves the document's history alone."""
    engine = tiny_engine("qwen2")
    engine.sessions.forget_learned()
    cfg = TreeConfig(16, 0, 1, 8, ("history",))
    prompt = "def total(values):\n    s = 0\n"
    first = complete(engine, prompt, decoding="tree", tree=cfg, document="a", max_tokens=30, type_through=False)
    assert "history" not in first.by_source  # nothing to remember yet (the output does not loop within 30 tokens)
    again = complete(engine, prompt, decoding="tree", tree=cfg, document="a", max_tokens=30, type_through=False)
    other = complete(engine, prompt, decoding="tree", tree=cfg, document="b", max_tokens=30, type_through=False)
    for run in (again, other):
        assert run.tokens == first.tokens and run.steps <= len(run.tokens) // 4 and run.by_source["history"] >= 20
    session = engine.sessions.activate("c")
    before = len(session.history.text)
    complete(engine, prompt, decoding="tree", tree=cfg, document="c", max_tokens=5, persistent_pool=False)
    assert len(session.history.text) == before == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("budget", [16, 64])
def test_cuda_graph_replays_each_steps_own_tree(tiny_config, tiny_model, budget: int) -> None:
    """On the GPU a tree step is one captured graph per budget whose mask and positions are rewritten before
    every replay: output must still be AR's. Catches a graph that froze the first step's tree."""
    from engine.loading import build_model
    from engine.runner import Runner

    _, ckpt = tiny_model(tiny_config("qwen2"))
    runner = Runner(build_model(ckpt, torch.device("cuda"), torch.float32, 1024), use_graphs=True)
    ids = (list(range(3, 40)) * 4)[:150]

    def run(cfg: TreeConfig | None, drafters: Drafters | None = None) -> DecodeState:
        runner.prefill(ids[:-1], 0)
        state = DecodeState(list(ids), 60, frozenset())
        decode_ar(runner, state) if cfg is None else decode_tree(runner, state, cfg, drafters)
        return state

    ar = run(None)
    tree = run(TreeConfig(budget, 2, 2, 6), Drafters([Scripted(ar.new, len(ids))], Recycling(),
                                                    JacobiWindow(2, 2, ids), Calibration()))
    assert tree.new == ar.new and tree.steps < len(ar.new) // 2
    assert any(name == f"tree{budget}" for name, _ in runner.graphs)


# -- real weights ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_default_tree_equals_ar_on_bench_code(smollm2_engine, bench_cases: list[dict]) -> None:
    """Real SmolLM2 on 4 bench cases with the engine's default CPU tree: AR's tokens and text, and far fewer
    steps than AR (catches a default that verifies nothing useful on real code)."""
    engine = smollm2_engine
    engine.sessions.forget_learned()
    tree_steps = ar_steps = tokens = 0
    for case in bench_cases[:4]:
        kw = dict(document=f"tree-{case['id']}", max_tokens=32, type_through=False)
        ar = complete(engine, case["prefix"], case["suffix"], decoding="ar", **kw)
        engine.close_document(kw["document"])
        tree = complete(engine, case["prefix"], case["suffix"], decoding="tree", **kw)
        engine.close_document(kw["document"])
        assert tree.tokens == ar.tokens and tree.text == ar.text, case["id"]
        assert sum(tree.accepted_per_step) == len(tree.tokens)
        tree_steps, ar_steps, tokens = tree_steps + tree.steps, ar_steps + ar.steps, tokens + len(tree.tokens)
    assert tokens / tree_steps >= 1.8, (tokens, tree_steps)


# -- ahead bench and ahead tune ----------------------------------------------------------------------
def test_bench_and_tune_know_tree_decoding(tiny_engine, tmp_path, monkeypatch, capsys) -> None:
    """`ahead bench --methods ar,tree` reports the tree's tokens/step, per-source acceptance, speed with stop rules
    and identical-to-AR shares; `ahead tune --trees` compares tree configs and stores the fastest as the tree
    default (not as lookahead's). Catches a bench that drops the tree method or its per-source figures, and a
    tune that stores a tree config where the engine does not read it."""
    import json

    from engine import cli, flags
    from engine.tuning_store import lookup_tuned

    engine = tiny_engine("qwen2", max_seq_len=1024)
    cases = tmp_path / "cases.jsonl"
    cases.write_text("\n".join(json.dumps({"id": f"c{i}", "prefix": REPETITIVE[: 90 + 20 * i], "suffix": "\n",
                                           "reference": "    return n\n"}) for i in range(2)) + "\n")
    monkeypatch.setattr(flags, "engine_from_args", lambda args: engine)
    common = ["--cases", str(cases), "--max-tokens", "24", "--prefix-tokens", "256", "--suffix-tokens", "32",
              "--max-seq-len", "1024", "--json", "--no-chart"]
    assert cli.main(["bench", *common, "--methods", "ar,lookahead,tree", "--tree", "16,2,2,8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tree"] == "16,2,2,8"
    assert result["identical"]["tree"] == {"vs_ar": 1.0, "vs_ar_rules": 1.0}
    tree, tree_rules = result["methods"]["tree"], result["methods_rules"]["tree"]
    assert tree["tokens"] == result["methods"]["ar"]["tokens"] and tree["tokens_per_step"] > 1.0
    assert tree["by_source_per_step"] and set(tree["by_source_per_step"]) <= set(SOURCES)
    assert result["speedup"]["tree"]["decode_vs_ar"] > 0 and result["speedup_rules"]["tree"]["vs_ar"] > 0
    assert tree_rules["tokens"] <= tree["tokens"]

    monkeypatch.setenv("AHEAD_HOME", str(tmp_path / "home"))
    assert cli.main(["tune", *common, "--trees", "4;8,2,1,4"]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert {r["config"] for r in tuned["results"]} == {"4,0,2,12", "8,2,1,4"}
    assert all(r["identical"] == 1.0 and r["kind"] == "tree" for r in tuned["results"])
    assert tuned["stored"]["stored"] and str(lookup_tuned(engine, "tree")) == tuned["best"]["config"]
    assert lookup_tuned(engine) is None  # lookahead's default is untouched


def test_tree_host_bench_times_the_loop_and_puts_it_back(tiny_engine, tmp_path, monkeypatch, capsys) -> None:
    """`python -m engine.bench.tree_host`: per-part host time of the tree loop and bare step times. Catches a
    part that is never reached (renamed in the loop), timers left wrapped around the engine afterwards, and a
    timed run that starts cold (no tree request before it) or leaves the warm-up's document open."""
    import json

    from engine import engine as engine_module
    from engine import flags
    from engine.bench import tree_host
    from engine.staging import ReadBack

    engine = tiny_engine("qwen2", max_seq_len=1024)
    cases = tmp_path / "cases.jsonl"
    cases.write_text(json.dumps({"prefix": REPETITIVE, "suffix": "\n"}) + "\n")
    monkeypatch.setattr(flags, "engine_from_args", lambda args: engine)
    trees: list[str] = []  # the documents of tree requests, in order
    complete = engine.complete

    def noted(request: CompletionRequest):
        if request.decoding == "tree":
            trees.append(request.document)
        return complete(request)

    monkeypatch.setattr(engine, "complete", noted)
    originals = [getattr(owner, name) for owner, name, _ in tree_host.PARTS]
    decode_tree, top, values = engine_module.decode_tree, Recycling.top, ReadBack.values
    assert tree_host.main(["--cases", str(cases), "--limit", "1", "--max-tokens", "24", "--tree", "16",
                           "--replays", "2"]) == 0
    # What a process pays once is paid by an untimed tree request first, whose document is then dropped.
    assert trees[:2] == ["tree-host-warmup", "timed-0"] and "tree-host-warmup" not in engine.sessions.sessions
    result = json.loads(capsys.readouterr().out)
    assert result["tree"] == "16,0,2,12" and result["steps"] > 0 and result["tokens_per_step"] > 1
    host = result["host_us_per_step"]
    assert {"recycling tree", "trie score", "step layout", "recycling table", "commit + stop rules",
            "healing choice"} <= set(host)  # healing too: the replay answers its constrained choices
    assert set(result["bare_steps"]) == {"decode", "tree16", "tree32", "tree64"}
    path = result["critical_path_us"]
    assert set(path) == {"host", "launch", "wait"} and path["host"] > 0 and path["launch"] > 0
    # Both replays met exactly the recorded steps (or they would have raised), and timed the loop.
    assert result["replayed_loop_us_per_step"]["passes"] == 2 and result["replayed_loop_us_per_step"]["best"] > 0
    assert [getattr(owner, name) for owner, name, _ in tree_host.PARTS] == originals
    assert (engine_module.decode_tree, Recycling.top, ReadBack.values) == (decode_tree, top, values)
    assert "step" not in vars(engine.runner) and "_forward" not in vars(engine.runner)


def test_tree_host_replay_stops_where_the_drafting_differs(tiny_engine) -> None:
    """A replay answers steps from a recording only while the decode asks for the very same steps: with other
    drafts (another tree) it must stop with an error, not time a loop fed with the wrong answers."""
    from engine.bench.tree_host import ReplayMismatch, recording, replaying

    engine = tiny_engine("qwen2", max_seq_len=1024)

    def request(tree: str, document: str) -> CompletionRequest:
        return CompletionRequest(REPETITIVE, "\n", document=document, max_tokens=16, decoding="tree",
                                 tree=TreeConfig.parse(tree))

    log: list = []
    engine.sessions.forget_learned()
    with recording(engine.runner, log):
        done = engine.complete(request("16", "recorded"))
    engine.sessions.forget_learned()
    with replaying(engine.runner, log):
        assert engine.complete(request("16", "again")).tokens == done.tokens
    engine.sessions.forget_learned()
    with pytest.raises(ReplayMismatch), replaying(engine.runner, log):
        engine.complete(request("8", "other"))
