"""Pay every CUDA graph capture before the engine reports ready, not during the first requests.

Requests use the one-token decode step, the lookahead step(s), and prefill chunks padded to
`runner.graph_prefill_sizes`, each at every visible-length bucket a step based anywhere in the cache can
reach, and whole prompts padded to `runner.whole_prompt_sizes` (from slot 0: one length each); captured
lazily, a user typing pays ~60 ms per new (shape, bucket) and seconds on the first request. Measured on
an H200, Qwen2.5-Coder-1.5B shape, 4096 slots: 111 graphs (five prefill sizes then) in 8.8 s (20.8 s on
a fresh machine, where Triton also compiles its kernels), and the first 3.1k-token request then took 180
ms instead of 4.9 s. The steps write junk K/V: the caller must treat the working cache as invalid.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from .runner import DECODE, Runner, StepShape, causal_shape

PROGRESS_EVERY_S = 2.0  # how often to log a progress line while capturing


def capture_plan(
    runner: Runner, step_shapes: Sequence[StepShape], limit: int | None = None
) -> list[tuple[StepShape, int]]:
    """(shape, visible length) for every graph that requests may replay, largest steps first; only
    visible lengths up to `limit` (default: the whole cache), so that a huge cache need not cost minutes:
    steps past it capture on first use, as without warm-up."""
    shapes = {s.name: s for s in [*[causal_shape(b) for b in runner.graph_prefill_sizes], DECODE, *step_shapes]}
    limit = runner.capacity if limit is None else limit
    plan = []
    for shape in sorted(shapes.values(), key=lambda s: -s.size):
        ends = sorted(runner.visible_ends(shape.size))
        plan.extend((shape, end) for end in ends if end <= limit and (shape.name, end) not in runner.graphs)
    # Whole prompts run from slot 0 only, so each of their sizes reaches one cache length.
    planned = {(shape.name, end) for shape, end in plan} | set(runner.graphs)
    whole = [(causal_shape(b), runner.visible_len(b)) for b in sorted(runner.whole_prompt_sizes, reverse=True)
             if b <= runner.capacity]
    plan[:0] = [(shape, end) for shape, end in whole if end <= limit and (shape.name, end) not in planned]
    return plan


def warm_up(
    runner: Runner,
    step_shapes: Sequence[StepShape] = (),
    log: Callable[[str], None] = print,
    limit: int | None = None,
) -> int:
    """Capture every graph of `capture_plan` (CUDA), or run one eager decode step (CPU: it pages in the
    memory-mapped weights and pays first-call initialisation); returns the number of graphs captured.
    Leaves junk in the KV cache."""
    if not runner.use_graphs:
        runner.step(DECODE, [0], 0, graph=False)
        return 0
    plan = capture_plan(runner, step_shapes, limit)
    if not plan:
        return 0
    log(f"ahead: capturing {len(plan)} CUDA graphs ({len({s.name for s, _ in plan})} step shapes "
        f"x cache lengths up to {max(end for _, end in plan)}) ...")
    started = last = time.perf_counter()
    for i, (shape, end) in enumerate(plan, 1):
        runner.step(shape, [0] * shape.size, end - shape.size)  # based here, the step sees exactly `end` slots
        if time.perf_counter() - last > PROGRESS_EVERY_S and i < len(plan):
            last = time.perf_counter()
            log(f"ahead: captured {i}/{len(plan)} CUDA graphs ({last - started:.0f} s)")
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    log(f"ahead: captured {len(plan)} CUDA graphs in {time.perf_counter() - started:.1f} s")
    return len(plan)
