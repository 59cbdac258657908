"""Tensor-parallel step times of a Qwen2.5-Coder-32B-shaped model with random bf16 weights.

    python -m engine.bench.tp [--layers 64] [--context 1024] [--lookahead "15,15,15 8,8,8"] [--trees "32 64"]
                              [--tokens-per-step 15,15,15=2.9 --tokens-per-step tree64=3.9 ...] [--tp 2]
                              [--skip-tp1] [--tiny]

On a machine with two GPUs: AR and lookahead step times at TP=2 through the engine's own
tensor-parallel path (rank 0's LeaderRunner, a follower process, NCCL, CUDA graphs), the
all-reduce share of each step (the step's 2 x layers all-reduces timed alone, as a CUDA graph),
the bandwidth floor (the weights one GPU reads per step over its measured copy bandwidth), the
same steps at TP=1 on one GPU when the whole model fits there, and, given tokens per step
measured on a real model (`ahead tune` on the 1.5B fixture), the projected lookahead speedup.
Prints one JSON object on stdout. `--tiny` runs a tiny shape on the CPU (gloo), to check it runs.
Random weights: the times are real, the tokens meaningless; acceptance must come from a real model.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time

import torch

from ..errors import AheadError
from ..loading import kv_bytes, weight_bytes
from ..lookahead import LookaheadConfig, step_shape
from ..model import WHOLE, ModelArgs
from ..parallel import TensorParallel, random_model
from ..runner import DECODE, Runner, StepShape, sync
from ..tree import tree_shape
from .tune import time_step

QWEN25_CODER_32B = ModelArgs(arch="qwen2", vocab_size=152064, dim=5120, n_layers=64, n_heads=40, n_kv_heads=8,
                             head_dim=128, intermediate_size=27648, norm_eps=1e-6, rope_theta=1e6, qkv_bias=True,
                             tie_embeddings=False)
TINY = dataclasses.replace(QWEN25_CODER_32B, vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                           head_dim=16, intermediate_size=128)
SEED_SPEEDUP = 1.6  # the seed's TP=2 lookahead (15,15,15) over TP=2 AR on Qwen2.5-Coder-32B


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def copy_bandwidth(device: torch.device, nbytes: int, reps: int = 10) -> float:
    """Bytes per second a device-to-device copy moves, counting bytes read and written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    started = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * reps / (time.perf_counter() - started)


def bytes_read_per_step(args: ModelArgs, dtype: torch.dtype, world: int, context: int) -> int:
    """What one GPU must read for a decode step: its weights (the embedding table only if it is the LM
    head too: a step reads one row of it) and its KV heads' cache up to `context`."""
    table = 0 if args.tie_embeddings else args.vocab_size * args.dim * torch.finfo(dtype).bits // 8
    return weight_bytes(args, dtype, world) - table + kv_bytes(args, context, dtype, world)


def measure(runner: Runner, shapes: list[StepShape], context: int, replays: int,
            all_reduce: bool) -> dict[str, dict[str, float]]:
    """{shape: {step_ms[, all_reduce_ms]}} with `context` random tokens in the cache."""
    prompt = torch.randint(runner.model.args.vocab_size, (context,), generator=torch.Generator().manual_seed(0))
    runner.prefill(prompt.tolist(), 0)
    out = {}
    for shape in shapes:
        row = {"tokens": shape.size, "step_ms": time_step(runner, shape, context, replays)}
        if all_reduce:  # one all-reduce after attention and one after the MLP, per layer
            row["all_reduce_ms"] = runner.time_all_reduce(shape.size, 2 * runner.model.args.n_layers, replays)
            row["all_reduce_share"] = row["all_reduce_ms"] / row["step_ms"]
        out[shape.name] = row
        log(f"tp: {shape.name}: {row}")
    return out


def release_memory() -> None:
    """Hand freed GPU memory back (the caller has dropped its references), so the next model fits."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(opts: argparse.Namespace) -> dict:
    device = torch.device("cpu" if opts.tiny else "cuda")
    dtype = torch.float32 if opts.tiny else torch.bfloat16
    args = TINY if opts.tiny else dataclasses.replace(QWEN25_CODER_32B, n_layers=opts.layers)
    configs = [LookaheadConfig.parse(c) for c in opts.lookahead.split()]
    trees = [int(b) for b in opts.trees.split()]
    # name in --tokens-per-step -> the shape that config runs
    named = {str(c): step_shape(c) for c in configs} | {f"tree{b}": tree_shape(b) for b in trees}
    shapes = [DECODE, *named.values()]
    max_seq_len = -(-(opts.context + max(s.size for s in shapes) + 1) // 256) * 256
    summary: dict = {
        "shape": "tiny" if opts.tiny else "qwen2.5-coder-32b" + (f" ({opts.layers} of 64 layers)"
                                                                  if opts.layers != 64 else ""),
        "args": dataclasses.asdict(args), "dtype": str(dtype).removeprefix("torch."), "context": opts.context,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "tp": opts.tp,
        "env": {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "TORCH_SYMM", "NVSHMEM"))},
    }

    log(f"tp: TP={opts.tp}, {summary['shape']}, random {summary['dtype']} weights, context {opts.context}")
    started = time.perf_counter()
    tp = TensorParallel.launch(opts.tp, args, device=device, dtype=dtype, max_seq_len=max_seq_len, log=log)
    model = random_model(args, max_seq_len, tp.shard, device, dtype)
    runner = tp.connect(model)
    log(f"tp: ranks ready in {time.perf_counter() - started:.1f} s")
    summary[f"tp{opts.tp}"] = measure(runner, shapes, opts.context, opts.replays, all_reduce=True)
    tp.close()
    del runner, model
    release_memory()

    need = weight_bytes(args, dtype) + kv_bytes(args, max_seq_len, dtype)
    free = torch.cuda.mem_get_info(0)[0] if device.type == "cuda" else float("inf")
    if opts.skip_tp1:
        summary["tp1"] = "skipped (--skip-tp1)"
    elif need > 0.95 * free:
        summary["tp1"] = f"skipped: the whole model needs {need / 2**30:.1f} GiB, one GPU has {free / 2**30:.1f} free"
    else:
        model = random_model(args, max_seq_len, WHOLE, device, dtype)
        summary["tp1"] = measure(Runner(model), shapes, opts.context, opts.replays, all_reduce=False)
        del model
        release_memory()

    bandwidth = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 26))
    summary["copy_bandwidth_gb_s"] = bandwidth / 1e9
    for world in sorted({1, opts.tp}):
        read = bytes_read_per_step(args, dtype, world, opts.context)
        summary[f"floor_tp{world}"] = {"bytes_per_gpu": read, "ms": read / bandwidth * 1e3}

    tps = dict(parse_tokens_per_step(t) for t in opts.tokens_per_step)
    ar = summary[f"tp{opts.tp}"][DECODE.name]["step_ms"]
    ar1 = summary["tp1"][DECODE.name]["step_ms"] if isinstance(summary["tp1"], dict) else None
    projected = {}
    for name, shape in named.items():
        step = summary[f"tp{opts.tp}"][shape.name]["step_ms"]
        row = {"step_ms": step, "step_over_ar": step / ar}
        if name in tps:
            row |= {"tokens_per_step": tps[name], f"speedup_vs_tp{opts.tp}_ar": tps[name] * ar / step}
            if ar1 is not None:
                row["speedup_vs_tp1_ar"] = tps[name] * ar1 / step
        projected[name] = row
    summary["projected"] = projected
    summary["seed_speedup_vs_tp2_ar"] = SEED_SPEEDUP
    summary["seconds"] = time.perf_counter() - started
    return summary


def parse_tokens_per_step(text: str) -> tuple[str, float]:
    cfg, _, value = text.partition("=")
    try:
        name = cfg if cfg.startswith("tree") and cfg[4:].isdigit() else str(LookaheadConfig.parse(cfg))
        return name, float(value)
    except ValueError:
        raise AheadError("--tokens-per-step takes W,N,G=TOKENS or treeB=TOKENS, e.g. 15,15,15=2.9 "
                         f"(got '{text}')") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench.tp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU (gloo): does it run at all")
    parser.add_argument("--tp", type=int, default=2, help="processes (GPUs) to split over (default 2)")
    parser.add_argument("--layers", type=int, default=64, help="layers of the 32B shape to build (default all 64)")
    parser.add_argument("--context", type=int, default=1024, help="tokens in the KV cache when steps are timed")
    parser.add_argument("--lookahead", default="15,15,15 8,8,8 4,6,8", help="W,N,G configs, space-separated")
    parser.add_argument("--trees", default="32 64", help="candidate-tree budgets (rows per step), space-separated")
    parser.add_argument("--tokens-per-step", action="append", default=[], metavar="W,N,G=TOKENS",
                        help="tokens per step measured on a real model for a config, or treeB=TOKENS (repeatable)")
    parser.add_argument("--replays", type=int, default=30, help="timed steps per shape (median)")
    parser.add_argument("--skip-tp1", action="store_true", help="do not time the unsplit model on one GPU")
    opts = parser.parse_args(argv)
    if opts.tiny:
        opts.context, opts.replays = min(opts.context, 64), min(opts.replays, 5)
    elif not torch.cuda.is_available() or torch.cuda.device_count() < opts.tp:
        raise SystemExit(f"tp: needs {opts.tp} CUDA GPUs (or --tiny on the CPU)")
    try:
        print(json.dumps(run(opts), indent=1))
    except AheadError as exc:
        print(f"ahead: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
