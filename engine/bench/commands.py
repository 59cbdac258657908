"""Flags of `ahead bench`, `ahead bench keystrokes` and `ahead tune`.

Only argparse here: each command's module (and torch with it) is imported when the command
runs, so `ahead --help` stays instant. Each runner checks its arguments before it loads a model.
"""

from __future__ import annotations

import argparse

from ..flags import LOOKAHEAD_HELP, add_engine_flags, int_at_least

DEFAULT_CASES = "../shared/bench/cases.jsonl"
DEFAULT_OUT = "ahead-out"
METHODS = ("generate", "prompt_lookup", "ar", "lookahead", "tree")
TREE_HELP = ("B[,W,L[,D]][:sources]: tree decoding's rows per step, Jacobi window W x L, draft depth D, sources "
             "from prompt+history+recycling+jacobi (default: tuned for this model and GPU)")
SHAPE_NAMES = ("qwen2.5-coder-7b", "qwen2.5-coder-1.5b")  # the sizes tune.SHAPES describes
H100_BANDWIDTH = 3.35e12  # B/s, H100 SXM HBM3


def add_output_flags(parser: argparse.ArgumentParser, chart: bool) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    if chart:
        parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                            help=f"directory for the PNG chart, created as needed (default ./{DEFAULT_OUT})")
        parser.add_argument("--no-chart", action="store_true", help="draw no chart")


def run_bench(args: argparse.Namespace) -> int:
    from .compare import main

    return main(args)


def run_keystrokes(args: argparse.Namespace) -> int:
    from .keystrokes import main

    return main(args)


def run_daemon(args: argparse.Namespace) -> int:
    from .daemon import main

    return main(args)


def run_lsp(args: argparse.Namespace) -> int:
    from .lsp import main

    return main(args)


def run_lsp_quality(args: argparse.Namespace) -> int:
    from .lsp_quality import main

    return main(args)


def run_tune(args: argparse.Namespace) -> int:
    from .tune import main

    return main(args)


def add_bench(subparsers) -> argparse.ArgumentParser:
    """`ahead bench [--cases ...]`, with `ahead bench keystrokes ...` beneath it."""
    parser = subparsers.add_parser(
        "bench", help="compare decoding methods on completion cases: speed and quality",
        description="Time transformers generate / prompt lookup against ahead's AR and lookahead decoding on the "
                    "same prompts, and score ahead's completions against each case's reference, with and without "
                    "stop rules.",
    )
    add_engine_flags(parser)
    parser.add_argument("--cases", help=f"JSON lines of cases (default: {DEFAULT_CASES} when present)")
    parser.add_argument("--limit", type=int_at_least(1), default=16, help="first N cases (default 16)")
    parser.add_argument("--max-tokens", type=int_at_least(1), default=128)
    parser.add_argument("--lookahead", metavar="W,N,G", help=LOOKAHEAD_HELP)
    parser.add_argument("--tree", metavar="B,W,L,D", help=TREE_HELP)
    parser.add_argument("--methods", default="generate,prompt_lookup,ar,lookahead",
                        help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--repeat", type=int_at_least(1), default=1, help="time each case R times, report the median")
    parser.add_argument("--no-quality", action="store_true",
                        help="skip the stop-rule runs and the scores against the references")
    add_output_flags(parser, chart=True)
    parser.set_defaults(func=run_bench)
    modes = parser.add_subparsers(dest="bench_mode", metavar="{keystrokes,daemon,lsp,lsp-quality}")
    add_keystrokes(modes)
    add_daemon(modes)
    add_lsp(modes)
    add_lsp_quality(modes)
    return parser


def add_typing_flags(parser: argparse.ArgumentParser) -> None:
    """Where to type and what to ask for: shared by `keystrokes` and `daemon`."""
    add_engine_flags(parser, suppress=True)
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="one JSON object on stdout")
    parser.add_argument("--file", help="source file to type into (default: one synthesized from the bench cases)")
    # Suppressed like the engine flags, so that `ahead bench --cases F keystrokes` keeps F.
    parser.add_argument("--cases", default=argparse.SUPPRESS,
                        help=f"cases to synthesize the file from (default: {DEFAULT_CASES})")
    parser.add_argument("--line", type=int_at_least(0), help="0-based cursor line (default: spread positions)")
    parser.add_argument("--col", type=int_at_least(0), help="0-based cursor column (default: --chars before the end)")
    parser.add_argument("--chars", type=int_at_least(1), default=24, help="characters typed per position")
    parser.add_argument("--positions", type=int_at_least(1), default=3, help="cursor positions without --line")
    parser.add_argument("--max-tokens", type=int_at_least(1), default=64)
    parser.add_argument("--decoding", choices=("lookahead", "ar"), default="lookahead")
    parser.add_argument("--lookahead", metavar="W,N,G", help=LOOKAHEAD_HELP)


def add_keystrokes(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "keystrokes", help="replay typing and measure per-keystroke latency and KV reuse",
        description="Type the characters after a cursor back one by one; measure prefill, TTFT and latency.",
    )
    add_typing_flags(parser)
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip comparing each warm completion with a cold one")
    parser.set_defaults(func=run_keystrokes)
    return parser


def add_daemon(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "daemon", help="the same typing through the engine daemon's socket and in-process",
        description="Start `ahead engine` (timing start to ready) and replay typing through its socket and "
                    "in-process: latency, protocol overhead per completion, cancel latency.",
    )
    add_typing_flags(parser)
    parser.add_argument("--cancels", type=int_at_least(0), default=5, help="long completions to cancel mid-way")
    parser.add_argument("--starts", type=int_at_least(1), default=1,
                        help="start `ahead engine` this many times, timing start to ready; the last one serves")
    parser.set_defaults(func=run_daemon)
    return parser


def add_lsp(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "lsp", help="the same typing through `ahead lsp` and the engine daemon, as an editor sees it",
        description="Start `ahead engine` and `ahead lsp`; type into a file through pygls' client and time each "
                    "inline completion from request to answer (stop rules on).",
    )
    add_typing_flags(parser)
    parser.add_argument("--debounce", type=int_at_least(0), default=None, help="debounce ms (default: the server's)")
    parser.add_argument("--starts", type=int_at_least(1), default=1, help="start the engine this many times first")
    parser.set_defaults(func=run_lsp)
    return parser


def add_lsp_quality(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "lsp-quality", help="completion quality through `ahead lsp`, with and without repository context",
        description="Start `ahead engine`; run `ahead lsp` with repoContext off, then on, over a scratch workspace "
                    "made of the cases' files; score each case's inline completion against its reference.",
    )
    add_engine_flags(parser, suppress=True)
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="one JSON object on stdout")
    # Suppressed, so that `ahead bench --cases F --limit N lsp-quality` keeps them.
    parser.add_argument("--cases", default=argparse.SUPPRESS, help=f"cases (default: {DEFAULT_CASES})")
    parser.add_argument("--limit", type=int_at_least(1), default=argparse.SUPPRESS, help="first N cases")
    parser.add_argument("--max-tokens", type=int_at_least(1), default=argparse.SUPPRESS, help="default 128")
    parser.add_argument("--context-tokens", type=int_at_least(0), default=1024, help="the server's contextTokens")
    parser.add_argument("--file-chars", type=int_at_least(1), default=6000, help="characters of each stand-in file")
    parser.add_argument("--starts", type=int_at_least(1), default=1, help=argparse.SUPPRESS)
    parser.set_defaults(func=run_lsp_quality)
    return parser


def add_tune(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "tune", help="find the fastest lookahead W,N,G and make it the default",
        description="Sweep lookahead configs on completion cases; when more than one was compared, store the "
                    "fastest as the default for this model and device.",
    )
    add_engine_flags(parser)
    parser.add_argument("--cases", help=f"JSON lines of cases (default: {DEFAULT_CASES} when present)")
    parser.add_argument("--limit", type=int_at_least(1), default=8, help="first N cases")
    parser.add_argument("--max-tokens", type=int_at_least(1), default=128)
    parser.add_argument("--windows", default="4,8,12", help="W values")
    parser.add_argument("--ngrams", default="3,4,5,6", help="N values")
    parser.add_argument("--verify", default="4,8", help="G values")
    parser.add_argument("--grid", help='explicit configs "W,N,G;W,N,G;..." (instead of the product)')
    parser.add_argument("--trees", metavar="B,W,L,D;...", help="tune tree decoding instead: its configs, ';'-separated "
                        f"({TREE_HELP}); the fastest becomes the tree default")
    store = parser.add_mutually_exclusive_group()
    store.add_argument("--store", action="store_true", default=None,
                       help="store the best config as the default even when only one was measured")
    store.add_argument("--no-store", dest="store", action="store_false", help="do not store the best config")
    parser.add_argument("--shape", metavar="NAME", help=f"time steps of random weights of this shape "
                        f"({', '.join(SHAPE_NAMES)}); --model then only provides the tokenizer")
    parser.add_argument("--context", type=int_at_least(1), default=1024,
                        help="--shape: tokens in the cache while timing")
    parser.add_argument("--replays", type=int_at_least(1), default=50, help="--shape: timed replays per step (median)")
    parser.add_argument("--bandwidth", type=float, default=H100_BANDWIDTH, help="--shape: memory bandwidth, B/s")
    parser.add_argument("--tokens-per-step-from", metavar="JSON", help="--shape: a `tune --json` output on the real "
                        "model, to project speedups from its tokens per step")
    add_output_flags(parser, chart=True)
    parser.set_defaults(func=run_tune)
    return parser
