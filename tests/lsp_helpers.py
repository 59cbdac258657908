"""What the language-server tests share: `ahead lsp` driven by pygls' LanguageClient, and the engine's own
answer to compare its items with."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lsprotocol import types
from pygls.lsp.client import LanguageClient

from engine.stops import StopRules
from lsp_server.documents import split_lines

REPO = Path(__file__).resolve().parents[1]
MAX_SEQ_LEN = 4096  # room for the long generation the cancel test interrupts
# Prefetch off: most tests count engine requests; test_prefetch_answers_an_accept_without_waiting turns it on.
BASE = {"decoding": "ar", "maxTokens": 16, "debounceMs": 0, "device": "cpu", "prefetch": False}
CAPABILITIES = types.ClientCapabilities(
    window=types.WindowClientCapabilities(work_done_progress=True),
    text_document=types.TextDocumentClientCapabilities(
        inline_completion=types.InlineCompletionClientCapabilities(),
        completion=types.CompletionClientCapabilities(),
    ),
)


def position_at(text: str, offset: int) -> types.Position:
    lines = split_lines(text[:offset]) or ("",)
    last = lines[-1] if not lines[-1].endswith(("\n", "\r")) else ""
    line = len(lines) - (0 if lines[-1].endswith(("\n", "\r")) else 1)
    return types.Position(line=line, character=sum(2 if ord(c) > 0xFFFF else 1 for c in last))


def plain(value: Any) -> Any:
    """pygls gives custom results as namedtuples: back to dicts."""
    if hasattr(value, "_asdict"):
        return {k: plain(v) for k, v in value._asdict().items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


class Session:
    """`ahead lsp` as a subprocess, driven by pygls' LanguageClient on an event loop in a thread."""

    def __init__(self, options: dict, env: dict, log_file: Path, capabilities=CAPABILITIES):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.messages: list[types.ShowMessageParams] = []
        self.progress: list[dict] = []
        self.texts: dict[str, str] = {}
        self.versions: dict[str, int] = {}
        self.log_file = log_file
        self.client: LanguageClient = self.call(self._start(options, env, capabilities))

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def sync(self, fn, *args, **kwargs):
        """fn(*args) on the client's loop: its transport is not thread-safe."""

        async def run():
            return fn(*args, **kwargs)

        return self.call(run())

    async def _start(self, options: dict, env: dict, capabilities) -> LanguageClient:
        client = LanguageClient("ahead-tests", "1")

        @client.feature(types.WINDOW_SHOW_MESSAGE)
        def show(params: types.ShowMessageParams) -> None:
            self.messages.append(params)

        @client.feature(types.PROGRESS)
        def progress(params: types.ProgressParams) -> None:
            self.progress.append(plain(params.value))

        @client.feature(types.WINDOW_WORK_DONE_PROGRESS_CREATE)
        def create(params: types.WorkDoneProgressCreateParams) -> None:
            return None

        await client.start_io(sys.executable, "-m", "engine.cli", "lsp", "--log-file", str(self.log_file),
                              cwd=REPO, env=env)
        self.init = await client.initialize_async(types.InitializeParams(
            capabilities=capabilities, initialization_options=options, root_uri=REPO.as_uri()))
        client.initialized(types.InitializedParams())
        return client

    def open(self, uri: str, text: str) -> None:
        self.texts[uri], self.versions[uri] = text, 1
        self.sync(self.client.text_document_did_open, types.DidOpenTextDocumentParams(
            text_document=types.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))

    def edit(self, uri: str, start: int, end: int, new: str) -> None:
        """Replace text[start:end] (string indices) with `new`, as an incremental change in UTF-16 positions."""
        text = self.texts[uri]
        change = types.TextDocumentContentChangePartial(
            range=types.Range(start=position_at(text, start), end=position_at(text, end)), text=new)
        self.texts[uri] = text[:start] + new + text[end:]
        self.versions[uri] += 1
        self.sync(self.client.text_document_did_change, types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=self.versions[uri]),
            content_changes=[change]))

    def inline_params(self, uri: str, offset: int) -> types.InlineCompletionParams:
        return types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri), position=position_at(self.texts[uri], offset),
            context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic))

    def inline(self, uri: str, offset: int, timeout: float = 60) -> types.InlineCompletionList:
        return self.call(self.client.text_document_inline_completion_async(self.inline_params(uri, offset)), timeout)

    def completion(self, uri: str, offset: int) -> types.CompletionList:
        params = types.CompletionParams(text_document=types.TextDocumentIdentifier(uri=uri),
                                        position=position_at(self.texts[uri], offset))
        return self.call(self.client.text_document_completion_async(params))

    def status(self) -> dict:
        async def ask():
            return await self.client.protocol.send_request_async("ahead/status", {})

        return plain(self.call(ask()))

    def configure(self, settings: dict) -> None:
        self.sync(self.client.workspace_did_change_configuration,
                  types.DidChangeConfigurationParams(settings={"ahead": settings}))

    def wait_for(self, predicate, timeout: float = 60, every: float = 0.1):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := predicate():
                return found
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout} s")

    def close(self) -> None:
        async def stop() -> None:
            await asyncio.wait_for(self.client.shutdown_async(None), 30)
            self.client.exit(None)  # on the loop already
            await asyncio.wait_for(self.client.stop(), 30)

        try:
            self.call(stop(), 90)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def kill_engine_on(sock: Path) -> None:
    """Whatever engine holds the socket's lock (its pid is in the lock file): the last resort of a teardown."""
    lock = sock.with_name(sock.name + ".lock")
    try:
        os.kill(int(lock.read_text().split()[0]), signal.SIGKILL)
    except (OSError, ValueError, IndexError):
        pass


def expected(local, prefix: str, suffix: str, max_tokens: int = 16, **rules) -> str:
    """The in-process engine's completion with the settings' stop rules (fresh: no KV reuse, no type-through)."""
    from conftest import complete

    return complete(local, prefix, suffix, reuse_kv=False, type_through=False, max_tokens=max_tokens,
                    decoding="ar", stop=StopRules(**rules)).text


def item_text(result: types.InlineCompletionList) -> str:
    assert len(result.items) <= 1
    return result.items[0].insert_text if result.items else ""
