"""`ahead` command line: complete a file at a cursor, benchmark, tune."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import AheadError


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF file, model directory or HF id (default: embedded SmolLM2)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--max-seq-len", type=int, default=4096, help="KV cache slots (default 4096)")


def engine_from_args(args: argparse.Namespace):
    from .engine import Engine, EngineOptions

    return Engine(EngineOptions(model=args.model, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len))


def read_source(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise AheadError(f"no such file: {path}")
    data = p.read_bytes()
    if b"\0" in data[:8192]:
        raise AheadError(f"{path} looks like a binary file; ahead completes text files")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise AheadError(f"{path} is not UTF-8 text") from None


def split_at(text: str, line: int, col: int) -> tuple[str, str]:
    """Prefix and suffix around a 0-based (line, col) cursor; col counts characters."""
    lines = text.split("\n")
    if line < 0 or line >= len(lines):
        raise AheadError(f"line {line} is outside the file (it has {len(lines)} lines, 0-based)")
    if col < 0 or col > len(lines[line]):
        raise AheadError(f"column {col} is outside line {line} (it has {len(lines[line])} characters)")
    offset = sum(len(x) + 1 for x in lines[:line]) + col
    return text[:offset], text[offset:]


def cmd_complete(args: argparse.Namespace) -> int:
    from .lookahead import LookaheadConfig
    from .request import CompletionRequest
    from .stops import StopRules

    text = read_source(args.path)
    prefix, suffix = split_at(text, args.line, args.col)
    if args.max_tokens < 0:
        raise AheadError("--max-tokens must be >= 0")
    try:
        cfg = LookaheadConfig.parse(args.lookahead) if args.lookahead else None
    except ValueError as exc:
        raise AheadError(str(exc)) from None
    engine = engine_from_args(args)
    request = CompletionRequest(
        prefix, suffix, document=str(Path(args.path).resolve()), max_tokens=args.max_tokens,
        decoding=args.decoding, lookahead=cfg, heal=not args.no_heal,
        stop=StopRules.raw() if args.no_stop_rules else StopRules(max_lines=args.max_lines),
    )
    result = engine.complete(request)
    if args.json:
        out = {"completion": result.text, **result.to_dict()}
        del out["step_ms"]
        out["step_ms_mean"] = sum(result.step_ms) / len(result.step_ms) if result.step_ms else 0.0
        print(json.dumps(out))
    else:
        sys.stdout.write(result.text + ("\n" if not result.text.endswith("\n") else ""))
        print(
            f"[{len(result.tokens)} tokens, {result.steps} steps ({result.tokens_per_step:.2f} tokens/step), "
            f"{result.time_ms:.0f} ms, {result.decoding}{' ' + result.lookahead if result.lookahead else ''}]",
            file=sys.stderr,
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import bench, tune

    parser = argparse.ArgumentParser(prog="ahead", description="Fast multi-line code completion engine")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("complete", help="complete a file at a cursor position")
    p.add_argument("path")
    p.add_argument("--line", type=int, required=True, help="0-based line of the cursor")
    p.add_argument("--col", type=int, required=True, help="0-based column of the cursor")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--decoding", choices=["ar", "lookahead"], default="lookahead")
    p.add_argument("--lookahead", default=None, metavar="W,N,G", help="default: tuned for this model and GPU")
    p.add_argument("--no-heal", action="store_true", help="turn token healing at the cursor off")
    p.add_argument("--no-stop-rules", action="store_true",
                   help="raw output: stop only at the model's stop token or --max-tokens")
    p.add_argument("--max-lines", type=int, default=0, help="stop after this many lines (default: no cap)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_engine_flags(p)
    p.set_defaults(func=cmd_complete)
    bench.add_parser(sub)
    tune.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except AheadError as exc:
        print(f"ahead: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
