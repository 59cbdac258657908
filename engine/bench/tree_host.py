"""Where a tree step's host time goes: microseconds per step in each part of the decode loop.

On the GPU a step's kernels run while the host waits, so whatever Python the loop does between
reading one step's result and launching the next adds straight to the step. This runs tree
decoding on the cases with each of the loop's parts timed (drafting, trie, layout, recycling,
slot moves, stop rules), then times bare replays of the step shapes (launch, then the argmax read)
for the GPU's own share, and prints one JSON object:

    python -m engine.bench.tree_host --model qwen.gguf [--cases cases.jsonl] [--limit 16] [--tree 48,0,2]

`critical_path_us` says what a step waits on in the timed run: the host's work from reading one step's argmax
to asking for the next (the GPU idles), the launch call, and the wait for the GPU's result.

The timed run also records every step's outputs. `--replays` passes then decode the same cases with
each step answered from that recording: the whole loop's host work, and nothing else, per step. Two
builds whose drafting agrees replay the same steps, so their host work compares without the GPU's
noise (a replay that meets other steps than the recording stops with an error). On a shared GPU
host the process decided more than the work: one build replayed a 64-row tree at 485 µs a step and
its 48-row tree at 753 µs, each process's passes within 0.5%. There, compare builds by the per-part
figures, or replay on a quiet host.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from .. import engine as engine_module
from .. import flags, tree_decoding
from ..calibration import Calibration
from ..decoding import DecodeState
from ..healing import Healing
from ..request import CompletionRequest
from ..runner import DECODE, Runner, StepShape, sync
from ..sources.history import HistoryLookup
from ..sources.prompt_lookup import PromptLookup
from ..sources.recycling import Recycling
from ..staging import ReadBack
from ..tree import TokenTrie, tree_shape
from ..tree_decoding import TreeConfig
from .harness import cases_path, load_cases, warm_engine

PARTS = [  # (owner, attribute, label): what the tree loop calls, timed where it is looked up
    (tree_decoding, "build_step", "step layout"),
    (tree_decoding, "load", "layout copy"), (tree_decoding, "accept", "accept"),
    (TokenTrie, "insert", "trie insert"), (TokenTrie, "score", "trie score"),
    (TokenTrie, "select", "trie select"), (Calibration, "learn", "calibration (overlapped on GPU)"),
    (Recycling, "grow", "recycling tree"), (Recycling, "top", "recycling top-k launch (overlapped)"),
    (Recycling, "remember", "recycling table"), (PromptLookup, "propose", "prompt lookup"),
    (PromptLookup, "observe", "prompt lookup observe"), (HistoryLookup, "propose", "history"),
    (HistoryLookup, "observe", "history observe"), (DecodeState, "commit", "commit + stop rules"),
    (Runner, "move_slots", "slot moves (queued)"), (Runner, "flush_moves", "slot moves made apart"),
    (Healing, "draft", "healing drafts"), (Healing, "prune", "healing prune"),
    (Healing, "constrain", "healing choice"),
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


@contextmanager
def critical_path(runner: Runner, spans: dict[str, list[float]]) -> Iterator[None]:
    """Per tree step, into `spans` (seconds): "host" from reading a step's argmax to asking for the next step
    (the GPU idles meanwhile), "launch" inside `runner.step` until it returns (the GPU starts at its end) and
    "wait" for the argmax (the GPU's share left after the launch). The parts' own timers, if any, count in."""
    values, step = ReadBack.values, vars(runner).get("step")
    ready: list[float] = []

    def read(self: ReadBack) -> tuple[Tensor, ...]:
        started = time.perf_counter()
        out = values(self)
        if self is runner.read_back("tree argmax"):
            now = time.perf_counter()
            spans["wait"].append(now - started)
            ready[:] = [now]
        return out

    def launch(shape: StepShape, tokens: list[int] | Tensor | np.ndarray, base: int, graph: bool = True):
        started = time.perf_counter()
        tree = shape.name.startswith("tree")
        if tree and ready:
            spans["host"].append(started - ready[0])
        ready.clear()
        out = (step or type(runner).step.__get__(runner))(shape, tokens, base, graph)
        if tree:
            spans["launch"].append(time.perf_counter() - started)
        return out

    ReadBack.values, runner.step = read, launch
    try:
        yield
    finally:
        ReadBack.values = values
        if step is None:
            del runner.step
        else:
            runner.step = step


class ReplayMismatch(RuntimeError):
    """A replayed decode asked for other steps than the recorded one: its drafting differs."""


def as_list(tokens: list[int] | Tensor | np.ndarray) -> list[int]:
    return tokens.tolist() if isinstance(tokens, Tensor | np.ndarray) else list(tokens)


@contextmanager
def recording(runner: Runner, log: list) -> Iterator[None]:
    """Append each step's (shape name, tokens, argmax, logits of one-row steps), each recycling top-k's
    (ids, probs) and each healing step's constrained predictions to `log`, in call order."""
    step, top, constrain = runner.step, Recycling.top, Healing.constrain

    def record_step(shape: StepShape, tokens: list[int] | Tensor, base: int, graph: bool = True):
        argmax, logits = step(shape, tokens, base, graph)
        one_row = logits.clone() if logits is not None and shape.size == 1 else None  # token healing reads them
        log.append((shape.name, as_list(tokens), argmax.clone(), one_row))
        return argmax, logits

    def record_top(self: Recycling, logits: Tensor, rows: int) -> tuple[Tensor, Tensor]:
        ids, probs = top(self, logits, rows)
        log.append(("top-k", ids.clone(), probs.clone()))
        return ids, probs

    def record_constrain(self: Healing, pred: np.ndarray, logits: Tensor) -> np.ndarray:
        out = constrain(self, pred, logits)
        log.append(("healing", out.copy(), None))
        return out

    runner.step, Recycling.top, Healing.constrain = record_step, record_top, record_constrain
    try:
        yield
    finally:
        del runner.step
        Recycling.top, Healing.constrain = top, constrain


@contextmanager
def replaying(runner: Runner, log: list) -> Iterator[None]:
    """Steps and top-k answered from `log`: the runner still stages each step's inputs and slot moves, but
    runs no forward (nor graph)."""
    answers = iter(log)
    step, top, constrain = runner.step, Recycling.top, Healing.constrain
    answer: list = []

    def replay_step(shape: StepShape, tokens: list[int] | Tensor, base: int, graph: bool = True):
        name, recorded, argmax, logits = next(answers, ("the end of the recording", None, None, None))
        if (name, recorded) != (shape.name, as_list(tokens)):
            raise ReplayMismatch(f"the replay asked for a {shape.name} step where the recording has {name}")
        answer[:] = [argmax, logits]
        return step(shape, tokens, base, graph=False)

    def replay_top(self: Recycling, logits: Tensor, rows: int) -> tuple[Tensor, Tensor]:
        kind, ids, probs = next(answers, ("the end of the recording", None, None))
        if kind != "top-k":
            raise ReplayMismatch(f"the replay asked for a top-k where the recording has {kind}")
        return ids, probs

    def replay_constrain(self: Healing, pred: np.ndarray, logits: Tensor) -> np.ndarray:
        kind, out, _ = next(answers, ("the end of the recording", None, None))
        if kind != "healing":
            raise ReplayMismatch(f"the replay asked for healing's predictions where the recording has {kind}")
        return out

    runner.step, runner._forward = replay_step, lambda shape, visible: tuple(answer)
    Recycling.top, Healing.constrain = replay_top, replay_constrain
    try:
        yield
    finally:
        del runner.step, runner._forward
        Recycling.top, Healing.constrain = top, constrain


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
    parser.add_argument("--replays", type=int, default=3, help="host-only passes over the recorded steps (best counts)")
    args = parser.parse_args(argv)
    engine = flags.engine_from_args(args)
    cfg = TreeConfig.parse(args.tree) if args.tree else engine.default_tree()
    cases = load_cases(cases_path(args.cases), args.limit)

    def tree_request(case: dict, document: str) -> CompletionRequest:
        return CompletionRequest(case["prefix"], case["suffix"], document=document, max_tokens=args.max_tokens,
                                 decoding="tree", tree=cfg)

    def requests(tag: str) -> Iterator[CompletionRequest]:
        # As `ahead bench` does: no case may see its own earlier output, and each pass starts from what the
        # timed run started from.
        engine.sessions.forget_learned()
        for i, case in enumerate(cases):  # fresh documents: no pass reuses another's KV
            yield tree_request(case, f"{tag}-{i}")

    warm_engine(engine, cases, [cfg.shape()], args.max_tokens)  # graphs for every cache length
    # One tree request first, as `ahead bench` makes: what a process pays once (numba loading its compiled
    # parts, the tokenizer's byte tables for healing) had landed on the timed run's first steps, ~1 s over
    # 606 steps on an H200's host, as "healing drafts" and "trie insert".
    engine.complete(tree_request(cases[0], "tree-host-warmup"))
    engine.close_document("tree-host-warmup")
    sizes = sorted({32, 64, cfg.budget})
    spent: Counter = Counter()
    steps = tokens = 0
    step_ms: list[float] = []
    log: list = []

    spans: dict[str, list[float]] = {"host": [], "launch": [], "wait": []}
    with timed(PARTS, spent), recording(engine.runner, log), critical_path(engine.runner, spans):
        for request in requests("timed"):
            done = engine.complete(request)
            steps, tokens, step_ms = steps + done.steps, tokens + len(done.tokens), step_ms + done.step_ms
    passes = []
    for r in range(args.replays):
        loop: Counter = Counter()
        with replaying(engine.runner, log), timed([(engine_module, "decode_tree", "tree loop")], loop):
            for request in requests(f"replay{r}"):
                engine.complete(request)
        passes.append(loop["tree loop"] * 1e6 / max(steps, 1))
    result = {
        "device": torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu",
        "model": engine.model_name, "tree": str(cfg), "cases": len(cases), "steps": steps,
        "tokens_per_step": round(tokens / max(steps, 1), 3),
        "step_ms_median": round(statistics.median(step_ms), 3) if step_ms else None,
        "step_ms_mean": round(statistics.fmean(step_ms), 3) if step_ms else None,
        "host_us_per_step": {label: round(s * 1e6 / max(steps, 1), 1) for label, s in spent.most_common()},
        # what a tree step waits on (mean µs): host work between two steps, the launch, then the GPU
        "critical_path_us": {name: round(statistics.fmean(t) * 1e6, 1) if t else None for name, t in spans.items()},
        # the whole tree loop with every step answered from the recording: its host work only
        "replayed_loop_us_per_step": {"best": round(min(passes), 1), "median": round(statistics.median(passes), 1),
                                      "passes": len(passes)} if passes else None,
        # at ~2k tokens of context, like the cases
        "bare_steps": bare_steps(engine, sizes, base=max(0, min(2048, engine.runner.capacity - 2 * sizes[-1]))),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
