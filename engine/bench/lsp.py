"""`ahead bench lsp`: keystroke latency as an editor sees it, through `ahead lsp` and the engine daemon.

A pygls LanguageClient starts `ahead lsp` over stdio, pointed at an `ahead engine` this command
starts; it opens a long file, then types the characters after each cursor back one by one as
incremental edits, asking for an inline completion after every one (stop rules on, the server's
default settings otherwise). The time is from sending `textDocument/inlineCompletion` to its
answer: debounce, type-through, the socket and the engine all included. pygls is imported only
here, when the command runs (the GPU machine carries it as wheels).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from ..client import EngineClient
from ..errors import AheadError
from .daemon import engine_process
from .harness import format_table, mean, percentile
from .keystrokes import Position, check_args, positions_in, synthesize_file


def utf16_position(text: str, offset: int):
    """The LSP position (line, UTF-16 column) of a string offset."""
    from lsprotocol import types

    line = text.count("\n", 0, offset)
    start = text.rfind("\n", 0, offset) + 1
    column = sum(2 if ord(c) > 0xFFFF else 1 for c in text[start:offset])
    return types.Position(line=line, character=column)


async def start_client(options: dict, root: Path | None = None):
    """`ahead lsp` on stdio under pygls' LanguageClient, initialized with `options` (and `root` as its
    workspace folder), as an editor with inline completion starts it."""
    from lsprotocol import types
    from pygls.lsp.client import LanguageClient

    client = LanguageClient("ahead-bench", "1")
    await client.start_io(sys.executable, "-m", "engine.cli", "lsp")
    capabilities = types.ClientCapabilities(text_document=types.TextDocumentClientCapabilities(
        inline_completion=types.InlineCompletionClientCapabilities()))
    folders = {"root_uri": root.as_uri(), "workspace_folders": [types.WorkspaceFolder(uri=root.as_uri(),
                                                                                      name=root.name)]} if root else {}
    await client.initialize_async(types.InitializeParams(capabilities=capabilities, initialization_options=options,
                                                         **folders))
    client.initialized(types.InitializedParams())
    return client


async def stop_client(client) -> dict:
    """The server's `ahead/status`, then shutdown and exit."""
    status = plain(await client.protocol.send_request_async("ahead/status", {}))
    await client.shutdown_async(None)
    client.exit(None)
    await client.stop()
    return status


async def type_through_lsp(args: argparse.Namespace, socket: Path, text: str, positions: list[Position]) -> dict:
    from lsprotocol import types

    options = {"engine": {"socket": str(socket)}, "maxTokens": args.max_tokens, "decoding": args.decoding,
               "lookahead": args.lookahead or "auto"}
    if args.debounce is not None:
        options["debounceMs"] = args.debounce
    client = await start_client(options)
    cold: list[float] = []
    warm: list[float] = []
    shown: list[bool] = []
    for i, pos in enumerate(positions):
        uri = f"file:///ahead-bench/position{i}.py"
        current = text[: pos.offset] + text[pos.offset + len(pos.typed) :]
        version = 1
        client.text_document_did_open(types.DidOpenTextDocumentParams(
            text_document=types.TextDocumentItem(uri=uri, language_id="python", version=version, text=current)))
        for j in range(len(pos.typed) + 1):
            if j:
                at = utf16_position(current, pos.offset + j - 1)
                version += 1
                client.text_document_did_change(types.DidChangeTextDocumentParams(
                    text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
                    content_changes=[types.TextDocumentContentChangePartial(
                        range=types.Range(start=at, end=at), text=pos.typed[j - 1])]))
                current = current[: pos.offset + j - 1] + pos.typed[j - 1] + current[pos.offset + j - 1 :]
            params = types.InlineCompletionParams(
                text_document=types.TextDocumentIdentifier(uri=uri),
                position=utf16_position(current, pos.offset + j),
                context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic))
            started = time.perf_counter()
            result = await client.text_document_inline_completion_async(params)
            ms = (time.perf_counter() - started) * 1e3
            items = result.items if isinstance(result, types.InlineCompletionList) else (result or [])
            (warm if j else cold).append(ms)
            if j:
                shown.append(bool(items))
        client.text_document_did_close(types.DidCloseTextDocumentParams(
            text_document=types.TextDocumentIdentifier(uri=uri)))
    status = await stop_client(client)
    return {
        "keystrokes": len(warm),
        "latency_ms_p50": percentile(warm, 50),
        "latency_ms_p95": percentile(warm, 95),
        "latency_ms_mean": mean(warm),
        "cold_ms_p50": percentile(cold, 50),
        "shown_share": mean([float(s) for s in shown]),
        "server_status": status,
    }


def plain(value):
    """pygls hands custom results back as namedtuples: dicts again, for JSON."""
    if hasattr(value, "_asdict"):
        return {k: plain(v) for k, v in value._asdict().items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def report(result: dict) -> str:
    keys = ("keystrokes", "latency_ms_p50", "latency_ms_p95", "latency_ms_mean", "cold_ms_p50", "shown_share",
            "start_to_ready_s")
    head = f"{result.get('model')}: keystrokes through ahead lsp -> ahead engine, debounce {result['debounce']}"
    return head + "\n" + format_table(["metric", "value"], [[k, result.get(k)] for k in keys])


def main(args: argparse.Namespace) -> int:
    try:
        import pygls  # noqa: F401
    except ImportError:
        raise AheadError("ahead bench lsp needs the lsp extra: pip install 'ahead[lsp]'") from None
    source, _ = check_args(args)
    text, positions = source.text, source.positions
    if text is None:  # synthesized from the cases, sized at ~3 characters a token (no tokenizer here)
        text = synthesize_file(source.cases, lambda s: len(s) // 3)
        positions = positions_in(text, args, (2 / 3, 1.0))
    with engine_process(args) as (socket, starts, _):
        with EngineClient(socket) as client:
            model = client.info["model"]
        result = asyncio.run(type_through_lsp(args, socket, text, positions))
    result |= {"model": model, "debounce": args.debounce if args.debounce is not None else "default",
               "start_to_ready_s": starts}
    print(json.dumps(result) if args.json else report(result))
    return 0
