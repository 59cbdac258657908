"""Where a decoding step's time goes on the GPU: kernels per step, time in kernels, and the gaps between them.

A captured step that takes longer than its kernels add up to is bound by launches and idle
gaps, not by memory bandwidth; a step whose kernels are many and short is bound by their fixed
cost. This profiles the AR decode step, one lookahead step and any tree steps asked for as the engine
replays them (CUDA graphs), with torch's profiler, and prints one JSON object:

    python -m engine.bench.profile_step --model qwen.gguf [--shape qwen2.5-coder-7b] [--lookahead 4,6,8] [--trees "48"]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

import torch

from .. import flags
from ..lookahead import LookaheadConfig, step_shape
from ..runner import DECODE, StepShape
from ..tree import tree_shape


def profile(engine, shape: StepShape, base: int, replays: int) -> dict:
    """Graph replays of `shape` at slot `base` under the profiler: per-step kernel count, time and gap."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from .tune import time_step

    step_ms = time_step(engine.runner, shape, base, replays)
    runner = engine.runner
    tokens = torch.randint(engine.model.args.vocab_size, (shape.size,)).tolist()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            runner.step(shape, tokens, base)[0].tolist()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_name: dict[str, list[float]] = defaultdict(list)
    for e in kernels:
        per_name[e.name].append(e.device_time)
    kernel_us = sum(e.device_time for e in kernels) / replays
    top = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:12]
    return {
        "shape": shape.name, "query_tokens": shape.size, "step_ms": round(step_ms, 3),
        "kernels_per_step": round(len(kernels) / replays, 1),
        "kernel_ms_per_step": round(kernel_us / 1e3, 3),
        "gap_ms_per_step": round(step_ms - kernel_us / 1e3, 3),
        "median_kernel_us": round(statistics.median(e.device_time for e in kernels), 2) if kernels else None,
        "top_kernels": [{"name": name[:90], "per_step": round(len(t) / replays, 1),
                         "us_per_step": round(sum(t) / replays, 1)} for name, t in top],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench.profile_step", description=__doc__.split("\n")[0])
    flags.add_engine_flags(parser)
    parser.add_argument("--lookahead", metavar="W,N,G", help="the lookahead step to profile (default: the tuned one)")
    parser.add_argument("--shape", help="random weights of this size instead of the model's (tune's shapes)")
    parser.add_argument("--context", type=int, default=2048, help="committed tokens before the step")
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--trees", default="", help="also profile tree steps of these row budgets, e.g. \"48 64\"")
    args = parser.parse_args(argv)
    if args.shape:
        from .tune import shape_engine

        engine = shape_engine(args)
    else:
        engine = flags.engine_from_args(args)
    if engine.device.type != "cuda":
        raise SystemExit("profile_step profiles CUDA graphs: it needs a GPU")
    cfg = LookaheadConfig.parse(args.lookahead) if args.lookahead else engine.default_lookahead()
    a = engine.model.args
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    result = {
        "gpu": torch.cuda.get_device_name(), "model": args.shape or engine.model_name,
        "layers": a.n_layers, "dim": a.dim, "weight_gb": round(weight_bytes / 1e9, 3),
        "steps": [profile(engine, shape, args.context, args.replays)
                  for shape in (DECODE, step_shape(cfg), *(tree_shape(int(b)) for b in args.trees.split()))],
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
