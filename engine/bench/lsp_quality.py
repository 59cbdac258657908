"""`ahead bench lsp-quality`: completion quality and latency through `ahead lsp`, with and without repo context.

What an editor user gets, scored: every case becomes a file in a scratch workspace (the other
cases' files stand in for the rest of the repository, as in context_quality), `ahead lsp` runs
twice against one `ahead engine` — `repoContext` off, then on — and each case's document is
opened and asked for an inline completion at its cursor. The items are scored against the
case's `reference` (edit similarity, exact match); the time is request to answer, a cold
document each time, so with context it includes prefilling the other files. Context reaches the
model only when it has Qwen2.5-Coder's `<|file_sep|>` token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from ..client import EngineClient
from ..errors import AheadError
from .context_quality import stand_in_files
from .daemon import engine_process
from .harness import cases_path, format_table, load_cases
from .lsp import start_client, stop_client, utf16_position
from .quality import scores


def lay_out(cases: list[dict], root: Path, file_chars: int) -> list[Path]:
    """Each case's file under `root` (its stand-in text on disk), in case order."""
    files = stand_in_files(cases, file_chars)
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    paths = []
    for n, case in enumerate(cases):
        name = case.get("file") if isinstance(case.get("file"), str) else f"case{n}.py"
        paths.append(root / name)
    return paths


async def complete_all(cases: list[dict], paths: list[Path], root: Path, socket: Path, options: dict) -> dict:
    """Open each case's document in a fresh `ahead lsp` and take its inline completion at the cursor."""
    from lsprotocol import types

    client = await start_client({**options, "engine": {"socket": str(socket)}, "prefetch": False}, root)
    texts, times = [], []
    for case, path in zip(cases, paths, strict=True):
        uri = path.as_uri()
        text = case["prefix"] + case.get("suffix", "")
        client.text_document_did_open(types.DidOpenTextDocumentParams(
            text_document=types.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))
        params = types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri), position=utf16_position(text, len(case["prefix"])),
            context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic))
        started = time.perf_counter()
        result = await client.text_document_inline_completion_async(params)
        times.append((time.perf_counter() - started) * 1e3)
        items = result.items if isinstance(result, types.InlineCompletionList) else (result or [])
        texts.append(items[0].insert_text if items else "")
        client.text_document_did_close(types.DidCloseTextDocumentParams(
            text_document=types.TextDocumentIdentifier(uri=uri)))
    status = await stop_client(client)
    return {"texts": texts, "times": times, "repo_context": status["server"]["repo_context"]}


def measure(cases: list[dict], socket: Path, options: dict, file_chars: int) -> dict:
    references = [case["reference"] for case in cases]
    result: dict = {"cases": len(cases)}
    with tempfile.TemporaryDirectory(prefix="ahead-lsp-quality-") as scratch:
        root = Path(scratch) / "repo"
        paths = lay_out(cases, root, file_chars)
        runs = {mode: asyncio.run(complete_all(cases, paths, root, socket, {**options, "repoContext": on}))
                for mode, on in (("without", False), ("with", True))}
    for mode, run in runs.items():
        result[mode] = {**scores(run["texts"], references), "shown": sum(bool(t.strip()) for t in run["texts"]),
                        "latency_ms_median": statistics.median(run["times"]),
                        "latency_ms_max": max(run["times"]), "repo_context_on": run["repo_context"]}
    result["changed"] = sum(a != b for a, b in zip(runs["without"]["texts"], runs["with"]["texts"], strict=True))
    return result


def report(result: dict) -> str:
    rows = [[mode, f"{s['edit_sim_median']:.3f}", f"{s['edit_sim_mean']:.3f}", f"{s['exact']:.0%}",
             f"{s['shown']}/{result['cases']}", f"{s['latency_ms_median']:.0f}"]
            for mode in ("without", "with") for s in [result[mode]]]
    head = (f"{result.get('model')}: {result['cases']} cases through ahead lsp, repo context off / on; "
            f"{result['changed']} completions changed")
    return head + "\n" + format_table(["repo context", "edit sim median", "mean", "exact", "shown", "ms median"], rows)


def main(args: argparse.Namespace) -> int:
    try:
        import pygls  # noqa: F401
    except ImportError:
        raise AheadError("ahead bench lsp-quality needs the lsp extra: pip install 'ahead[lsp]'") from None
    cases = [c for c in load_cases(cases_path(args.cases)) if "reference" in c][: args.limit]
    if not cases:
        raise AheadError("no cases with a `reference` to score against")
    options = {"maxTokens": args.max_tokens, "contextTokens": args.context_tokens}
    with engine_process(args) as (socket, _, _):
        with EngineClient(socket) as client:
            model = client.info["model"]
        result = measure(cases, socket, options, args.file_chars) | {"model": model}
    print(json.dumps(result) if args.json else report(result))
    return 0
