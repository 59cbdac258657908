"""Tree decoding drafted on the device (`engine/device_tree.py`): its fixed layout, its verifier, and output
identical to greedy decoding (tiny random models and the real SmolLM2, fp32 on the CPU, where the torch reference
of each step runs); on a GPU, its fused kernels against that reference, and its graphs against AR."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import complete

from engine.decoding import DecodeState, decode_ar
from engine.device_tree import RANK_ODDS, DeviceTree, decode_device_tree, layout
from engine.errors import BadRequest
from engine.sessions import MAX_DEVICE_TREES
from engine.tree_decoding import TreeConfig

REPETITIVE = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)\n" * 3


def decode(engine, ids: list[int], tree: DeviceTree | None = None, stop: frozenset[int] = frozenset(),
           max_new: int = 40) -> DecodeState:
    """AR (no tree) or the device tree (its table forgotten) on the engine's runner, from a fresh prefill, with our
    own stop set."""
    engine.sessions.invalidate_working_cache()
    engine.runner.prefill(ids[:-1], 0)
    state = DecodeState(list(ids), max_new, stop)
    if tree is None:
        decode_ar(engine.runner, state)
    else:
        tree.forget()  # the table as new: each run drafts as the first did
        decode_device_tree(engine.runner, state, tree)
    return state


def test_layout_puts_parents_first_and_each_row_sees_its_path() -> None:
    """Root, then the chain, then the recycling rank paths likeliest first: catches a row laid out before its
    parent (the draft fills rows level by level from their parents), and a mask that shows a row more or less
    than its ancestors."""
    lay = layout(64, 16)
    assert lay.rows == 64 and lay.parent[0] == -1 and all(lay.parent[r] < r for r in range(1, 64))
    assert list(lay.depth[:17]) == list(range(17)) and (lay.rank[:17] == -1).all()
    tree = np.arange(17, 64)
    assert (lay.rank[tree] >= 0).all() and (lay.depth[tree] == lay.depth[lay.parent[tree]] + 1).all()
    # the root's children come in rank order, and the likeliest grandchild beats a far sibling
    children = [r for r in tree if lay.parent[r] == 0]
    assert [lay.rank[r] for r in children] == list(range(len(children)))
    assert RANK_ODDS[0] ** 2 > RANK_ODDS[5] and lay.parent[children[0]] == 0
    assert any(lay.parent[r] == children[0] and lay.rank[r] == 0 for r in tree)
    sees = lay.sees()
    for r in range(64):
        path, a = set(), r
        while a >= 0:
            path.add(a)
            a = lay.parent[a]
        assert set(np.flatnonzero(sees[r])) == path
    bare = layout(8, 3, recycling=False)
    assert list(bare.parent) == [-1, 0, 1, 2, 0, 0, 0, 0] and (bare.rank == -1).all()
    with pytest.raises(ValueError, match="cannot hold"):
        layout(8, 8)


def test_verifier_commits_the_deepest_right_path_and_moves_its_slots(tiny_engine) -> None:
    """Rows set by hand, the greedy tokens made up: a wrong chain, a right recycling path two deep and a right
    sibling one deep. The commit is the deep path plus the greedy token after it; its rows' K/V go to the slots
    right after the root; the text and its length grow by the commit."""
    engine = tiny_engine("qwen2")
    tree = DeviceTree(engine.runner, 16, 3)
    lay = tree.layout
    first = next(r for r in range(4, 16) if lay.parent[r] == 0 and lay.rank[r] == 0)
    second = next(r for r in range(4, 16) if lay.parent[r] == first and lay.rank[r] == 0)
    sibling = next(r for r in range(4, 16) if lay.parent[r] == 0 and lay.rank[r] == 1)
    tree.start([5, 6, 7, 8])
    tokens = torch.full((16,), 300)
    tokens[0], tokens[1:4] = 8, torch.tensor([40, 41, 42])
    tokens[first], tokens[second], tokens[sibling] = 10, 11, 12
    greedy = torch.full((16,), 99)
    greedy[0] = 10  # after the root: row `first` is right (and the chain's 40 and the sibling's 12 are not)
    greedy[first] = 11  # after it: row `second` is right
    greedy[second] = 77  # the bonus
    tree.tokens.copy_(tokens)
    tree._verify(greedy, tree.n - 1)
    assert tree.count.tolist() == [3, second] and tree.commit[:3].tolist() == [10, 11, 77]  # and the path's row
    assert int(tree.n[0]) == 7 and tree.seq[:7].tolist() == [5, 6, 7, 8, 10, 11, 77]
    moved = tree.moves[0] != 0
    assert tree.moves[0][moved].tolist() == [3 + first, 3 + second] and tree.moves[1][moved].tolist() == [4, 5]
    # nothing right: the greedy token after the root alone, nothing moved
    tree.start([5, 6, 7, 8])
    greedy[0] = 55
    tree._verify(greedy, tree.n - 1)
    assert tree.count.tolist() == [1, 0] and int(tree.commit[0]) == 55 and not tree.moves.any()


def test_draft_copies_the_latest_longest_match_and_grows_the_table(tiny_engine) -> None:
    """The chain follows the latest of the longest earlier matches of the text's suffix (not the first, not a
    shorter later one); the recycling rows follow the table from the root. Catches a chain off by one, a match
    search that prefers a shorter or older match, and rows read from the wrong table column."""
    engine = tiny_engine("qwen2")
    tree = DeviceTree(engine.runner, 14, 3)
    text = [1, 2, 3, 50, 51, 52, 9, 2, 3, 60, 61, 62, 1, 2, 3, 70, 71, 72, 4, 3, 80, 81, 82, 1, 2, 3]
    # the suffix 1 2 3: at 0 (followed by 50...) and at 12 (70...); "2 3" alone at 7 is shorter, "3" at 19 too
    tree.start(text)
    tree.table[3] = torch.arange(100, 108)
    tree.table[100] = torch.arange(200, 208)
    tree._draft()
    lay = tree.layout
    assert tree.tokens[:4].tolist() == [3, 70, 71, 72]
    for r in range(4, 14):
        above = int(tree.tokens[lay.parent[r]])
        assert int(tree.tokens[r]) == int(tree.table[above, lay.rank[r]])
    assert int(tree.tokens[next(r for r in range(4, 14) if lay.parent[r] == 0 and lay.rank[r] == 2)]) == 102


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_device_tree_equals_ar_and_saves_steps(tiny_engine, arch: str) -> None:
    """AR's tokens, step for step, on repetitive text where the chain pays: fewer steps than tokens. Every kept
    drafted token is credited to the source of its path's deepest row (all but each step's greedy token after the
    path; the last step may end inside the path)."""
    engine = tiny_engine(arch)
    ids = engine.codec.encode(REPETITIVE)
    ar = decode(engine, ids)
    dev = decode(engine, ids, DeviceTree(engine.runner, 16, 6))
    assert dev.new == ar.new and sum(dev.accepted) == len(dev.new) and dev.steps < len(dev.new)
    assert set(dev.by_source) <= {"prompt", "recycling"}
    assert len(dev.new) - dev.steps <= sum(dev.by_source.values()) <= len(dev.new) - dev.steps + 1
    chain_only = decode(engine, ids, DeviceTree(engine.runner, 16, 6, recycling=False))
    table_only = decode(engine, ids, DeviceTree(engine.runner, 16, 0))
    assert chain_only.new == table_only.new == ar.new
    assert set(chain_only.by_source) == {"prompt"} and set(table_only.by_source) == {"recycling"}


@pytest.mark.parametrize("max_new", [1, 7])
def test_tiny_stop_token_and_length_limit_inside_a_device_step(tiny_engine, max_new: int) -> None:
    """A stop token in the middle of a step's accepted path ends the output there, as AR does; so does the
    length limit (the step queued ahead is dropped, not committed)."""
    engine = tiny_engine("qwen2")
    ids = engine.codec.encode(REPETITIVE)
    tree = DeviceTree(engine.runner, 16, 6)
    free = decode(engine, ids, tree)
    starts = np.cumsum([0, *free.accepted[:-1]])
    # a drafted (not bonus) token of a multi-token step, there for the first time
    step, stop_at = next((k, j) for k, (s, n) in enumerate(zip(starts, free.accepted, strict=True)) if n >= 2
                         for j in range(s, s + n - 1) if free.new[j] not in free.new[:j])
    stop = frozenset({free.new[stop_at]})
    ar, cut = decode(engine, ids, stop=stop), decode(engine, ids, tree, stop=stop)
    assert cut.new == ar.new == free.new[:stop_at] and cut.stop_reason == ar.stop_reason == "stop"
    assert cut.steps == step + 1
    short = decode(engine, ids, tree, max_new=max_new)
    assert short.new == free.new[:max_new] and short.stop_reason == "length"


def test_device_tree_configs_parse_and_the_engine_decodes_them(tiny_engine) -> None:
    """"@device" picks the device's drafting through the request's tree config, and the engine's output is AR's;
    configs it cannot run are refused in words."""
    cfg = TreeConfig.parse("16,0,2,6@device")
    assert cfg.on_device and cfg.sources == ("prompt", "recycling") and str(cfg) == "16,0,2,6@device"
    assert str(TreeConfig.parse("16,0,0,6:recycling@device")) == "16,0,0,6:recycling@device"
    for bad in ("16,4,2,6@device", "16,0,2,6:history@device", "8,0,2,12@device", "16@gpu"):
        with pytest.raises(ValueError):
            TreeConfig.parse(bad)
    engine = tiny_engine("qwen2")
    ar = complete(engine, REPETITIVE, decoding="ar", max_tokens=24, document="a", type_through=False)
    dev = complete(engine, REPETITIVE, decoding="tree", tree=cfg, max_tokens=24, document="b", type_through=False)
    assert dev.tokens == ar.tokens and dev.steps < len(dev.tokens)
    assert engine.sessions.device_tree(cfg) is engine.sessions.device_tree(cfg)  # its table is kept
    kept = engine.sessions.device_tree(cfg)
    others = [TreeConfig.parse(f"16,0,2,{depth}@device") for depth in range(2, 2 + MAX_DEVICE_TREES)]
    for other in others:  # requests naming their own configs: only the recently used few keep device memory
        engine.sessions.device_tree(cfg)
        engine.sessions.device_tree(other)
    trees = engine.sessions.device_trees
    assert len(trees) == MAX_DEVICE_TREES and trees[cfg] is kept and others[0] not in trees
    engine.tp = object()  # split over GPUs: the followers would not run the device's steps
    with pytest.raises(BadRequest, match="--tp"):
        complete(engine, REPETITIVE, decoding="tree", tree=cfg, max_tokens=4, document="c", type_through=False)


@pytest.mark.slow
def test_smollm2_device_tree_equals_ar_on_bench_code(smollm2_engine, bench_cases: list[dict]) -> None:
    """Real SmolLM2, fp32, 3 bench cases: AR's tokens and text, in far fewer steps than AR."""
    engine = smollm2_engine
    engine.sessions.forget_learned()
    cfg = TreeConfig.parse("64,0,2,16@device")
    steps = tokens = 0
    for case in bench_cases[:3]:
        kw = dict(document=f"device-{case['id']}", max_tokens=32, type_through=False, heal=False)
        ar = complete(engine, case["prefix"], case["suffix"], decoding="ar", **kw)
        engine.close_document(kw["document"])
        dev = complete(engine, case["prefix"], case["suffix"], decoding="tree", tree=cfg, **kw)
        engine.close_document(kw["document"])
        assert dev.tokens == ar.tokens and dev.text == ar.text, case["id"]
        steps, tokens = steps + dev.steps, tokens + len(dev.tokens)
    assert tokens / steps >= 1.8, (tokens, steps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_kernels_do_what_the_torch_steps_do(tiny_model, tiny_config) -> None:
    """On a GPU: each step's draft and verify kernels against the torch reference from the same state, several
    steps of real decoding with a busy table (tokens, commit, text, slot moves, table); then the graphed loop
    against AR."""
    from engine.loading import build_model
    from engine.runner import Runner

    _, ckpt = tiny_model(tiny_config("qwen2", vocab_size=512))
    model = build_model(ckpt, torch.device("cuda"), torch.float32, 1024)
    runner = Runner(model, use_graphs=False)
    tree = DeviceTree(runner, 32, 8)
    assert tree.fused
    ids = [int(x) for x in torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(1))] * 3
    runner.prefill(ids[:-1], 0)
    tree.start(ids)
    tree.table.copy_(torch.randint(0, 512, tree.table.shape, device="cuda"))
    visible = runner.visible_len(len(ids) + 200)
    for _ in range(8):
        state = [x.clone() for x in (tree.seq, tree.n, tree.table, model.kv)]
        tree.fused = False
        tree._step(visible)
        ref = [x.clone() for x in (tree.tokens, tree.commit, tree.count, tree.seq, tree.n, tree.moves, tree.table)]
        for mine, old in zip((tree.seq, tree.n, tree.table, model.kv), state, strict=True):
            mine.copy_(old)
        tree.fused = True
        tree._step(visible)
        got = (tree.tokens, tree.commit, tree.count, tree.seq, tree.n, tree.moves, tree.table)
        c = int(ref[2][0])
        assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2]) and torch.equal(got[1][:c], ref[1][:c])
        assert torch.equal(got[4], ref[4]) and torch.equal(got[3][: int(ref[4][0])], ref[3][: int(ref[4][0])])
        assert torch.equal(got[5], ref[5])
    graphed = Runner(model, use_graphs=True)
    fresh = DeviceTree(graphed, 32, 8)
    # before any request: its eager steps must stay in the cache
    assert fresh.capture(graphed.visible_ends(32, 0, 300)) == len(fresh.graphs) > 1
    runner.prefill(ids[:-1], 0)
    ar = DecodeState(list(ids), 60, frozenset())
    decode_ar(runner, ar)
    graphed.prefill(ids[:-1], 0)
    dev = DecodeState(list(ids), 60, frozenset())
    decode_device_tree(graphed, dev, fresh)
    assert dev.new == ar.new and dev.steps < len(dev.new)


def test_bench_and_tune_run_trees_drafted_on_the_device(tiny_engine, tmp_path, monkeypatch, capsys) -> None:
    """`ahead bench --tree ...@device` decodes AR's tokens in fewer steps, and `ahead tune` times such a tree beside a
    host-drafted one and stores the fastest where the engine reads it back (the "@device" survives the store)."""
    import json

    from engine import cli, flags
    from engine.tuning_store import lookup_tuned

    engine = tiny_engine("qwen2", max_seq_len=1024)
    cases = tmp_path / "cases.jsonl"
    cases.write_text("\n".join(json.dumps({"id": f"c{i}", "prefix": REPETITIVE[: 90 + 20 * i], "suffix": "\n"})
                               for i in range(2)) + "\n")
    monkeypatch.setattr(flags, "engine_from_args", lambda args: engine)
    common = ["--cases", str(cases), "--max-tokens", "24", "--max-seq-len", "1024", "--json", "--no-chart",
              "--device", "cpu"]  # the engine's: on a GPU machine the flags' default prompt budget would be CUDA's
    assert cli.main(["bench", *common, "--methods", "ar,tree", "--tree", "16,0,2,6@device"]) == 0
    result = json.loads(capsys.readouterr().out)
    same = result["identical"]["tree"]
    assert result["tree"] == "16,0,2,6@device" and same["vs_ar"] == 1.0 and all(v == 1.0 for v in same.values())
    assert result["methods"]["tree"]["tokens_per_step"] > 1.0
    monkeypatch.setenv("AHEAD_HOME", str(tmp_path / "home"))
    assert cli.main(["tune", *common, "--trees", "16,0,2,6@device;8,0,2,4"]) == 0
    tuned = json.loads(capsys.readouterr().out)
    by_config = {r["config"]: r for r in tuned["results"]}
    assert set(by_config) == {"16,0,2,6@device", "8,0,2,4"} and by_config["16,0,2,6@device"]["on_device"]
    assert all(r["identical"] == 1.0 for r in tuned["results"])
    assert str(lookup_tuned(engine, "tree")) == tuned["best"]["config"]
