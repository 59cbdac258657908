"""`ahead bench daemon`: what serving through the socket costs on top of the engine itself.

`ahead engine` runs as a user runs it, in its own process (the last of `--starts` fresh starts:
the first converts the weights, later ones find them cached); this process loads the same model
too and replays the same typing twice per cursor: through the socket with the real client, and
in-process. Protocol overhead is each socket completion's client wall time minus the engine's
own time for it. Cancel latency is the time from sending `cancel` to the `cancelled` answer while
a long completion streams, set against one decoding step.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .. import flags
from ..client import AsyncEngineClient, EngineClient, EngineError
from ..engine import Engine
from ..request import CompletionRequest
from ..stops import StopRules
from .harness import engine_facts, format_table, mean, percentile, progress
from .keystrokes import Position, check_args, place

READY = "engine ready"


def typing(text: str, pos: Position) -> list[tuple[str, str]]:
    """(prefix, suffix) of every keystroke typing `pos.typed` back, after a cold request without it."""
    suffix = text[pos.offset + len(pos.typed) :]
    return [(text[: pos.offset + j], suffix) for j in range(len(pos.typed) + 1)]


def replay_socket(client: EngineClient, args, strokes: list[tuple[str, str]], document: str) -> list[dict]:
    out = []
    for prefix, suffix in strokes:
        started = time.perf_counter()
        result = client.complete(prefix=prefix, suffix=suffix, document=document, max_tokens=args.max_tokens,
                                 decoding=args.decoding, lookahead=args.lookahead, stop="raw")
        wall = (time.perf_counter() - started) * 1e3
        out.append({"wall_ms": wall, "engine_ms": result["time_ms"], "overhead_ms": wall - result["time_ms"],
                    "text": result["text"], "type_through": result["type_through"]})
    client.close_document(document)
    return out


def replay_local(engine: Engine, args, strokes: list[tuple[str, str]], document: str) -> list[dict]:
    cfg = flags.parse_lookahead(args.lookahead) if args.lookahead else None
    out = []
    for prefix, suffix in strokes:
        request = CompletionRequest(prefix, suffix, document=document, max_tokens=args.max_tokens,
                                    decoding=args.decoding, lookahead=cfg, stop=StopRules.raw())
        started = time.perf_counter()
        completion = engine.complete(request)  # all features on, as the daemon serves it
        out.append({"wall_ms": (time.perf_counter() - started) * 1e3, "text": completion.text,
                    "step_ms": completion.step_ms, "type_through": completion.type_through})
    engine.close_document(document)
    return out


async def cancel_once(socket: Path, prefix: str, suffix: str, args) -> tuple[float, int]:
    """(ms from sending cancel to the `cancelled` answer, tokens committed by then) for one long completion."""
    client = await AsyncEngineClient.connect(socket, name="bench-cancel")
    try:
        seen: list[str] = []
        going = asyncio.Event()  # a few partials in: decoding is in its steady state, not setting up

        def on_text(text: str) -> None:
            seen.append(text)
            if len(seen) == 3:
                going.set()

        task = asyncio.create_task(client.complete(
            on_text=on_text, prefix=prefix, suffix=suffix, document="bench-cancel", max_tokens=512,
            decoding=args.decoding, lookahead=args.lookahead, stop="raw"))
        waiting = asyncio.ensure_future(going.wait())
        await asyncio.wait({task, waiting}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if task.done():
            return float("nan"), -1  # it finished too soon to be cancelled mid-way
        sent = time.perf_counter()
        await client.request("cancel", {"id": 2})  # hello was request 1, the completion 2
        try:
            await task
        except EngineError as exc:
            if exc.code != "cancelled":
                raise
            return (time.perf_counter() - sent) * 1e3, int(exc.data.get("tokens", 0))
        return float("nan"), -1  # it finished before the cancel arrived
    finally:
        await client.close()


def start_engines(args: argparse.Namespace, count: int, socket: Path) -> tuple[subprocess.Popen, list[float], bool]:
    """Start `ahead engine` `count` times (at least once) in fresh processes, timing each from start to
    its ready line; the last one is left running on `socket`. Also says whether the first start had to
    convert the weights (the cache folder, AHEAD_HOME, did not hold them yet)."""
    from ..loading import resolve_device, resolve_dtype
    from ..weight_cache import cache_path

    model = Path(args.model).expanduser() if args.model else None
    converted = bool(model and model.suffix == ".gguf" and not cache_path(
        model, resolve_dtype(args.dtype, resolve_device(args.device))).exists())
    cmd = [sys.executable, "-m", "engine.cli", "engine", "--socket", str(socket)]
    for flag in ("model", "device", "dtype", "max_seq_len", "prefix_tokens", "suffix_tokens", "threads"):
        value = getattr(args, flag, None)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    seconds: list[float] = []
    for k in range(max(1, count)):
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        for line in proc.stderr:
            print(line, end="", file=sys.stderr)
            if READY in line:
                seconds.append(time.perf_counter() - started)
                break
        else:
            raise RuntimeError(f"`ahead engine` exited with {proc.wait()} before it was ready")
        if k < max(1, count) - 1:
            proc.terminate()
            proc.wait(60)
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep its pipe drained
    return proc, seconds, converted


def run_daemon_bench(engine: Engine, args: argparse.Namespace, source, socket: Path) -> dict:
    text, positions = place(engine, source, args)
    via_socket, local = [], []
    with EngineClient(socket, name="bench") as client:
        for i, pos in enumerate(progress(positions, "typing", "position")):
            strokes = typing(text, pos)
            replay_socket(client, args, strokes[:2], f"warm-{i}")  # first requests at these lengths
            via_socket.append(replay_socket(client, args, strokes, f"socket-{i}"))
            local.append(replay_local(engine, args, strokes, f"local-{i}"))
        status = client.status()
    same = [a["text"] == b["text"] for s, lo in zip(via_socket, local, strict=True) for a, b in zip(s, lo, strict=True)]
    sock = [r for rs in via_socket for r in rs[1:]]  # keystrokes only: the cold first request is apart
    loc = [r for rs in local for r in rs[1:]]
    step_ms = mean([ms for r in loc for ms in r["step_ms"]])
    pos = positions[0]
    cancels = [asyncio.run(cancel_once(socket, text[: pos.offset], text[pos.offset :], args))
               for _ in range(args.cancels)]
    cancel_ms = [ms for ms, _ in cancels if ms == ms]
    # One step of that same long completion, in-process: what a cancel may have to wait for.
    same_prompt = replay_local(engine, args, [(text[: pos.offset], text[pos.offset :])], "bench-cancel-steps")
    cancel_step_ms = mean(same_prompt[0]["step_ms"])
    return {
        **engine_facts(engine),
        "decoding": args.decoding,
        "lookahead": (args.lookahead or status["lookahead"]) if args.decoding == "lookahead" else None,
        "requests": len(sock),
        "socket_latency_ms_p50": percentile([r["wall_ms"] for r in sock], 50),
        "socket_latency_ms_p95": percentile([r["wall_ms"] for r in sock], 95),
        "in_process_latency_ms_p50": percentile([r["wall_ms"] for r in loc], 50),
        "in_process_latency_ms_p95": percentile([r["wall_ms"] for r in loc], 95),
        "protocol_overhead_ms_p50": percentile([r["overhead_ms"] for r in sock], 50),
        "protocol_overhead_ms_p95": percentile([r["overhead_ms"] for r in sock], 95),
        "cold_socket_ms_p50": percentile([rs[0]["wall_ms"] for rs in via_socket], 50),
        # Keystrokes that typed into the last suggestion are answered from it, without the model.
        "type_through_share_socket": mean([float(r["type_through"]) for r in sock]),
        "type_through_share_in_process": mean([float(r["type_through"]) for r in loc]),
        "model_latency_ms_p50_socket": percentile([r["wall_ms"] for r in sock if not r["type_through"]], 50),
        "model_latency_ms_p95_socket": percentile([r["wall_ms"] for r in sock if not r["type_through"]], 95),
        "same_text_share": sum(same) / len(same) if same else None,
        "step_ms_mean": step_ms,
        "cancel_ms_p50": percentile(cancel_ms, 50),
        "cancel_ms_max": max(cancel_ms) if cancel_ms else None,
        "cancel_step_ms_mean": cancel_step_ms,
        "cancel_in_steps_max": max(cancel_ms) / cancel_step_ms if cancel_ms and cancel_step_ms else None,
        "cancels": [{"ms": ms, "tokens_before": tokens} for ms, tokens in cancels],
    }


def report(result: dict) -> str:
    keys = ("requests", "socket_latency_ms_p50", "socket_latency_ms_p95", "in_process_latency_ms_p50",
            "in_process_latency_ms_p95", "protocol_overhead_ms_p50", "protocol_overhead_ms_p95", "cold_socket_ms_p50",
            "type_through_share_socket", "type_through_share_in_process", "model_latency_ms_p50_socket",
            "model_latency_ms_p95_socket",
            "same_text_share", "step_ms_mean", "cancel_ms_p50", "cancel_ms_max", "cancel_step_ms_mean",
            "cancel_in_steps_max",
            "start_to_ready_s")
    rows = [[k, result.get(k)] for k in keys if k in result]
    head = f"{result['engine']}: keystrokes through the socket vs in-process, {result['decoding']}"
    return head + "\n" + format_table(["metric", "value"], rows)


@contextlib.contextmanager
def engine_process(args: argparse.Namespace) -> Iterator[tuple[Path, list[float], bool]]:
    """`ahead engine` on a private socket for the block (see start_engines): (socket, start seconds,
    whether the first start converted the weights); stopped afterwards."""
    with tempfile.TemporaryDirectory(prefix="ahead-bench-") as tmp:
        os.chmod(tmp, 0o700)
        socket = Path(tmp) / "engine.sock"
        daemon, starts, converted = start_engines(args, args.starts, socket)
        try:
            yield socket, starts, converted
        finally:
            daemon.terminate()
            daemon.wait(60)


def main(args: argparse.Namespace) -> int:
    source, _ = check_args(args)
    with engine_process(args) as (socket, starts, converted):
        engine = flags.engine_from_args(args)
        engine.warmup()
        result = run_daemon_bench(engine, args, source, socket)
    result["start_to_ready_s"] = starts
    result["first_start_converted_weights"] = converted
    print(json.dumps(result) if args.json else report(result))
    return 0
