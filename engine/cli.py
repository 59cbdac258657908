"""`ahead` command line: complete a file at a cursor; run the engine daemon; `bench` and `tune` (engine/bench/).

Only argparse and the flag definitions are imported up front: `ahead --help` must not wait
seconds for torch, and every argument is checked before the model loads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import flags
from .bench.commands import add_bench, add_tune
from .errors import AheadError


def read_source(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        raise AheadError(f"{path} is a directory; pass the file to complete")
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


def stop_rules(args: argparse.Namespace):
    """The default rules (or none with --no-stop-rules), with --max-lines as a cap either way."""
    from dataclasses import replace

    from .stops import StopRules

    return replace(StopRules.raw() if args.no_stop_rules else StopRules(), max_lines=args.max_lines)


def engine_socket(args: argparse.Namespace) -> Path | None:
    """The running engine to use: --socket (which must answer), else the default one if it answers."""
    from .listen import default_socket, reachable

    if args.in_process:
        return None
    if args.socket is not None:
        if not reachable(args.socket):
            raise AheadError(f"no engine answers on {args.socket}; start one with `ahead engine --socket "
                             f"{args.socket}` or leave --socket out to run in-process")
        return args.socket
    return default_socket() if reachable(default_socket()) else None


def complete_with_engine(args: argparse.Namespace, socket: Path, prefix: str, suffix: str) -> dict:
    """The completion from the running engine, as the in-process path's dict."""
    from dataclasses import asdict

    from .client import EngineClient

    with EngineClient(socket, name="ahead complete") as client:
        served = client.info["model"]
        if args.model and args.model not in (served, str(Path(args.model).expanduser().resolve())):
            raise AheadError(f"the engine on {socket} serves {served}, not {args.model}; "
                             "pass --in-process to load that model here")
        result = client.complete(
            prefix=prefix, suffix=suffix, document=str(Path(args.path).resolve()), max_tokens=args.max_tokens,
            decoding=args.decoding, lookahead=args.lookahead, heal=not args.no_heal,
            stop={k: v for k, v in asdict(stop_rules(args)).items() if k != "sequences"},
        )
    return result | {"model": served, "engine": client.info["engine"], "served_by": "engine",
                     "tokens_per_step": result["tokens"] / result["steps"] if result["steps"] else 0.0}


def complete_in_process(args: argparse.Namespace, prefix: str, suffix: str) -> dict:
    cfg = flags.parse_lookahead(args.lookahead) if args.lookahead else None
    flags.check_fits(args, args.max_tokens, flags.step_tokens(args.decoding, cfg))
    engine = flags.engine_from_args(args)

    from .request import CompletionRequest

    request = CompletionRequest(prefix, suffix, document=str(Path(args.path).resolve()), max_tokens=args.max_tokens,
                                decoding=args.decoding, lookahead=cfg, heal=not args.no_heal, stop=stop_rules(args))
    result = engine.complete(request)
    out = result.to_dict()
    out["tokens"] = len(result.tokens)
    out["step_ms_mean"] = sum(result.step_ms) / len(result.step_ms) if result.step_ms else 0.0
    del out["step_ms"]
    return out | {"model": engine.model_name, "engine": engine.describe(), "served_by": "in-process"}


def cmd_complete(args: argparse.Namespace) -> int:
    text = read_source(args.path)
    prefix, suffix = split_at(text, args.line, args.col)
    if args.lookahead:
        flags.parse_lookahead(args.lookahead)  # a bad spec is reported before anything else runs
    socket = engine_socket(args)
    out = complete_with_engine(args, socket, prefix, suffix) if socket else complete_in_process(args, prefix, suffix)
    if args.json:
        cursor = {"line": args.line, "character": args.col}
        # The text is inserted at the cursor: healing re-generates bytes before it, but they are left out.
        print(json.dumps(out | {"range": {"start": cursor, "end": cursor}}))
        return 0
    if out["text"]:
        sys.stdout.write(out["text"] + "\n")
    else:
        print(f"(no completion: {out['stop_reason']})", file=sys.stderr)
    print(f"[{out['tokens']} tokens, {out['steps']} steps ({out['tokens_per_step']:.2f} tokens/step), "
          f"{out['time_ms']:.0f} ms, {out['decoding']}{' ' + out['lookahead'] if out['lookahead'] else ''}, "
          f"stop: {out['stop_reason']}, {out['served_by']}]", file=sys.stderr)
    return 0


def host_port(text: str) -> tuple[str, int]:
    """HOST:PORT (port 0: any free port) as an argparse type."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got '{text}'")
    return host.strip("[]"), int(port)


def cmd_engine(args: argparse.Namespace) -> int:
    from .listen import default_socket, reachable, read_token, serve_unix_path

    path = serve_unix_path(args.socket or default_socket())
    if args.stop or args.status:
        if not reachable(path):
            raise AheadError(f"no engine answers on {path}")
        from .client import EngineClient

        with EngineClient(path, name="ahead engine") as client:
            print(json.dumps(client.shutdown() if args.stop else client.status(), indent=2))
        return 0
    from .logstream import protect_stderr

    protect_stderr()  # a daemon must outlive a full disk under its log
    if args.tcp or args.openai:
        read_token(args.token_file)  # created, or refused if others can read it, before the model loads
    if args.openai:
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            raise AheadError("--openai needs aiohttp: pip install 'ahead[openai]'") from None

    import asyncio

    from .collector import freeze_startup
    from .server import ServeOptions, serve

    def build():
        engine = flags.engine_from_args(args)
        engine.warmup()
        freeze_startup()  # the daemon's start-up objects live as long as it does
        return engine

    options = ServeOptions(socket=path, tcp=args.tcp, openai=args.openai, token_file=args.token_file,
                           per_client=args.per_client)
    return asyncio.run(serve(options, build))


def add_engine(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "engine", help="run the resident engine daemon that editors connect to",
        description="Load and warm the model once, then serve completions over a Unix socket (docs/PROTOCOL.md), "
                    "optionally over TCP and an OpenAI-compatible HTTP endpoint, until SIGTERM/SIGINT.",
    )
    flags.add_engine_flags(p)
    p.add_argument("--socket", type=Path, default=None,
                   help="Unix socket (default: $XDG_RUNTIME_DIR/ahead/engine.sock)")
    p.add_argument("--tcp", type=host_port, metavar="HOST:PORT",
                   help="also serve the protocol on TCP (needs the token)")
    p.add_argument("--openai", type=host_port, metavar="HOST:PORT",
                   help="also serve POST /v1/completions (OpenAI-compatible; needs the token off loopback)")
    p.add_argument("--token-file", type=Path, default=None,
                   help="shared secret for TCP clients, mode 0600 (default: created next to the socket)")
    p.add_argument("--per-client", type=flags.int_at_least(1), default=16, help="queued requests per client")
    p.add_argument("--status", action="store_true", help="print the running engine's status and exit")
    p.add_argument("--stop", action="store_true", help="ask the running engine to shut down and exit")
    p.set_defaults(func=cmd_engine)
    return p


def cmd_lsp(args: argparse.Namespace) -> int:
    """The language server (lsp_server/, the `lsp` extra), imported only here: engine/ never needs pygls."""
    try:
        from lsp_server.server import main as serve_lsp
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] in ("pygls", "lsprotocol", "cattrs", "attrs"):
            raise AheadError("ahead lsp needs the lsp extra: pip install 'ahead[lsp]'") from None
        raise
    return serve_lsp(tcp=args.tcp, log_file=args.log_file, debug=args.debug)


def add_lsp(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "lsp", help="run the language server (stdio) that shows completions in editors",
        description="Serve LSP on stdio (or --tcp): inline completion, completion and ahead/status, backed by the "
                    "running engine (started when none answers on its socket). Settings come from the client "
                    "(initializationOptions, section 'ahead').",
    )
    p.add_argument("--tcp", type=host_port, metavar="HOST:PORT", help="serve LSP on TCP instead of stdio")
    p.add_argument("--log-file", type=Path, default=None, help="log here instead of stderr (never stdout)")
    p.add_argument("--debug", action="store_true",
                   help="log LSP messages and completion text (off by default: logs hold no source code)")
    p.set_defaults(func=cmd_lsp)
    return p


def add_complete(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("complete", help="complete a file at a cursor position",
                              description="Complete FILE at a 0-based cursor; the completion goes to stdout.")
    p.add_argument("path", metavar="FILE")
    p.add_argument("--line", type=int, required=True, help="0-based line of the cursor")
    p.add_argument("--col", type=int, required=True, help="0-based column of the cursor, in characters")
    p.add_argument("--max-tokens", type=flags.int_at_least(0), default=128)
    p.add_argument("--decoding", choices=["ar", "lookahead", "tree"], default="lookahead")
    p.add_argument("--lookahead", default=None, metavar="W,N,G", help=flags.LOOKAHEAD_HELP)
    p.add_argument("--no-heal", action="store_true", help="turn token healing at the cursor off")
    p.add_argument("--no-stop-rules", action="store_true",
                   help="raw output: stop only at the model's stop token, --max-tokens or --max-lines")
    p.add_argument("--max-lines", type=flags.int_at_least(0), default=0, help="stop after N lines (default: no cap)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--socket", type=Path, default=None,
                   help="use the engine serving on this socket (default: the default socket, if an engine answers)")
    p.add_argument("--in-process", action="store_true", help="load the model here even if an engine is running")
    flags.add_engine_flags(p)
    p.set_defaults(func=cmd_complete)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = flags.Parser(prog="ahead", description="Fast multi-line code completion engine")
    parser.add_argument("--version", action="version", version=f"%(prog)s {flags.version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{complete,engine,lsp,bench,tune}")
    add_complete(sub)
    add_engine(sub)
    add_lsp(sub)
    add_bench(sub)
    add_tune(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a bad flag already reported in one line
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args) or 0
    except AheadError as exc:
        print(f"ahead: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
