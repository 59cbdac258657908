"""Where a tree step's host time goes: microseconds per step in each part of the decode loop.

On the GPU a step's kernels run while the host waits, so whatever Python the loop does between
reading one step's result and launching the next adds straight to the step. This runs tree
decoding on the cases with each of the loop's parts timed (drafting, trie, layout, recycling,
slot moves, stop rules), then times bare replays of the step shapes (launch, then the argmax read)
for the GPU's own share, and prints one JSON object:

    python -m engine.bench.tree_host --model qwen.gguf [--cases cases.jsonl] [--limit 16] [--tree 48,0,2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .. import flags, tree_decoding
from ..decoding import DecodeState
from ..request import CompletionRequest
from ..runner import DECODE, Runner, sync
from ..sources.history import HistoryLookup
from ..sources.prompt_lookup import PromptLookup
from ..sources.recycling import Recycling
from ..tree import TokenTrie, tree_shape
from ..tree_decoding import Calibration, TreeConfig
from .harness import cases_path, load_cases, warm_engine

PARTS = [  # (owner, attribute, label): what the tree loop calls, timed where it is looked up
    (tree_decoding, "build_step", "step layout"),
    (tree_decoding, "load", "layout copy"), (tree_decoding, "accept", "accept"),
    (TokenTrie, "insert", "trie insert"), (TokenTrie, "graft", "trie graft"), (TokenTrie, "score", "trie score"),
    (TokenTrie, "select", "trie select"), (Calibration, "learn", "calibration (overlapped on GPU)"),
    (Recycling, "tree", "recycling tree"), (Recycling, "top", "recycling top-k launch (overlapped)"),
    (Recycling, "remember", "recycling table"), (PromptLookup, "propose", "prompt lookup"),
    (PromptLookup, "observe", "prompt lookup observe"), (HistoryLookup, "propose", "history"),
    (HistoryLookup, "observe", "history observe"), (DecodeState, "commit", "commit + stop rules"),
    (Runner, "move_slots", "slot moves (queued)"), (Runner, "flush_moves", "slot moves made apart"),
]


@contextmanager
def timed(parts: list[tuple[object, str, str]], spent: Counter) -> Iterator[None]:
    """Each part adds its wall time to spent[label] while inside; the originals come back after."""
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in parts]

    def wrap(fn, label):
        def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - started
        return run

    try:
        for (owner, name, fn), (_, _, label) in zip(originals, parts, strict=True):
            setattr(owner, name, wrap(fn, label))
        yield
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)


def bare_steps(engine, sizes: list[int], base: int, replays: int = 50) -> dict[str, dict[str, float]]:
    """Median ms until a bare replay returns (launch) and until its argmax is read (the GPU's share)."""
    out = {}
    for shape in [DECODE, *(tree_shape(s) for s in sizes)]:
        tokens = list(range(shape.size))
        for _ in range(3):
            engine.runner.step(shape, tokens, base)[0].tolist()
        launch, total = [], []
        for _ in range(replays):
            sync(engine.device)
            started = time.perf_counter()
            argmax, _ = engine.runner.step(shape, tokens, base)
            launched = time.perf_counter()
            argmax.tolist()
            launch.append((launched - started) * 1e3)
            total.append((time.perf_counter() - started) * 1e3)
        out[shape.name] = {"launch_ms": round(statistics.median(launch), 3),
                           "read_ms": round(statistics.median(total), 3)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench.tree_host", description=__doc__.split("\n")[0])
    flags.add_engine_flags(parser)
    parser.add_argument("--cases", help="JSON lines of cases (default: the shared bench cases when present)")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--tree", metavar="B,W,L,D", help="the tree to run (default: the engine's)")
    args = parser.parse_args(argv)
    engine = flags.engine_from_args(args)
    cfg = TreeConfig.parse(args.tree) if args.tree else engine.default_tree()
    cases = load_cases(cases_path(args.cases), args.limit)

    warm_engine(engine, cases, [cfg.shape()], args.max_tokens)  # graphs for every cache length
    engine.sessions.forget_learned()  # as `ahead bench` does: no case may see its own earlier output
    sizes = sorted({32, 64, cfg.budget})
    spent: Counter = Counter()
    steps = tokens = 0
    step_ms: list[float] = []
    with timed(PARTS, spent):
        for i, case in enumerate(cases):
            done = engine.complete(CompletionRequest(case["prefix"], case["suffix"], document=f"timed-{i}",
                                                     max_tokens=args.max_tokens, decoding="tree", tree=cfg))
            steps, tokens, step_ms = steps + done.steps, tokens + len(done.tokens), step_ms + done.step_ms
    result = {
        "device": torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu",
        "model": engine.model_name, "tree": str(cfg), "cases": len(cases), "steps": steps,
        "tokens_per_step": round(tokens / max(steps, 1), 3),
        "step_ms_median": round(statistics.median(step_ms), 3) if step_ms else None,
        "step_ms_mean": round(statistics.fmean(step_ms), 3) if step_ms else None,
        "host_us_per_step": {label: round(s * 1e6 / max(steps, 1), 1) for label, s in spent.most_common()},
        # at ~2k tokens of context, like the cases
        "bare_steps": bare_steps(engine, sizes, base=max(0, min(2048, engine.runner.capacity - 2 * sizes[-1]))),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
