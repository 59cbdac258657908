"""`ahead lsp`: the language server that shows the engine's completions as ghost text.

One small handler per LSP method on a module-level server (pygls 2 style); state lives on
AheadLanguageServer, and what is not protocol lives in pure modules: settings.py (merging),
suggestion.py (cursor -> engine params -> items), typing_cache.py (type-through),
backends.py (where completions come from), documents.py (line breaks).

A completion request goes: the text around the cursor -> the type-through cache (the user
typed the start of the last suggestion: the rest, without the backend) -> the request in
flight for the document is joined (same cursor) or superseded (its caller gets no items at
once, the engine stops its work) -> debounce -> the backend -> an item at the cursor.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import unquote
from uuid import uuid4

from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pygls.lsp.server import LanguageServer
from pygls.uris import to_fs_path
from pygls.workspace import TextDocument

from engine.flags import version

from . import logs
from .backends import Backend, EngineBackend, Unavailable, make_backend
from .documents import LspProtocol
from .prefetch import Prefetcher
from .settings import Settings, resolve, summary
from .suggestion import completion_list, engine_params, inline_list, line_ending, to_document, to_model
from .typing_cache import TypeThroughCache

log = logging.getLogger("ahead.lsp")

STATUS = "ahead/status"
CHARS_PER_TOKEN = 4  # code averages ~3-4 characters per token; the engine trims context to its own token budget
TOLD_ONCE = ("does_not_fit", "bad_request")  # engine errors that mean the settings need changing


class Pending:
    """The backend request in flight for a document, shared by the requests made at the same cursor."""

    def __init__(self, prefix: str, suffix: str, task: asyncio.Task[str]):
        self.prefix = prefix
        self.suffix = suffix
        self.task = task
        self.waiters = 0


class LspReporter:
    """A backend's start and failures, as $/progress (when the client has it) and window/showMessage."""

    def __init__(self, ls: AheadLanguageServer):
        self.ls = ls
        self.token: str | None = None

    def progress_supported(self) -> bool:
        window = getattr(self.ls.client_capabilities, "window", None)
        return bool(window and window.work_done_progress)

    async def begin(self, title: str, message: str) -> None:
        log.info(f"{title}: {message}")
        if not self.progress_supported():
            return
        token = f"ahead-{uuid4().hex}"
        try:
            await asyncio.wait_for(self.ls.work_done_progress.create_async(token), 5)
        except Exception as exc:  # the client refused or did not answer: no progress bar, the log has it
            log.info(f"no progress bar: {type(exc).__name__}")
            return
        self.token = token
        self.ls.work_done_progress.begin(token, types.WorkDoneProgressBegin(title=title, message=message))

    async def report(self, message: str, percentage: int | None = None) -> None:
        if self.token is not None:
            self.ls.work_done_progress.report(self.token,
                                              types.WorkDoneProgressReport(message=message, percentage=percentage))

    async def end(self, message: str) -> None:
        if self.token is not None:
            self.ls.work_done_progress.end(self.token, types.WorkDoneProgressEnd(message=message))
            self.token = None

    def show(self, message: str, error: bool = True) -> None:
        (log.error if error else log.warning)(message)
        self.ls.tell(message, types.MessageType.Error if error else types.MessageType.Warning)


class AheadLanguageServer(LanguageServer):
    def __init__(self) -> None:
        super().__init__("ahead", version(), protocol_cls=LspProtocol,
                         text_document_sync_kind=types.TextDocumentSyncKind.Incremental)
        self.init_options: Any = None
        self.config: Any = None  # the client's "ahead" section, from didChangeConfiguration or a pull
        self.settings = Settings()
        self.backend: Backend | None = None
        self.reporter = LspReporter(self)
        self.cache = TypeThroughCache()
        self.prefetch = Prefetcher()
        self.last_request: dict[str, float] = {}  # document -> when its last backend request was made
        self.pending: dict[str, Pending] = {}
        self.context: Any = None  # lsp_server.context.RepoContext while settings.repo_context is on
        self.stats: Counter[str] = Counter()
        self.told: set[str] = set()
        self.warned: list[str] = []  # the settings warnings last shown: each shown once, not at every merge
        self.reconfiguring = asyncio.Lock()  # one settings change at a time: a restart takes seconds

    def report_server_error(self, error: Exception, source: Any) -> None:
        """pygls' read loop reports a message it could not use here (source JsonRpcException): answer it
        instead of showing the user an error about a message the client sent."""
        if source is JsonRpcException:
            self.protocol.answer_unreadable(error)  # type: ignore[attr-defined]  # LspProtocol
            return
        super().report_server_error(error, source)

    def tell(self, message: str, kind: types.MessageType = types.MessageType.Info) -> None:
        if kind == types.MessageType.Info:
            log.info(message)
        self.window_show_message(types.ShowMessageParams(type=kind, message=f"ahead: {message}"))

    def open_document(self, uri: str) -> TextDocument | None:
        return self.workspace.text_documents.get(unquote(uri))

    # -- settings ----------------------------------------------------------------------------------
    async def pull_configuration(self) -> None:
        """Ask the client for the "ahead" section, when it can answer (workspace/configuration)."""
        workspace = getattr(self.client_capabilities, "workspace", None)
        if not (workspace and workspace.configuration):
            return
        items = types.ConfigurationParams(items=[types.ConfigurationItem(section="ahead")])
        try:
            answer = await asyncio.wait_for(self.workspace_configuration_async(items), 5)
        except Exception as exc:
            log.info(f"workspace/configuration failed: {type(exc).__name__}")
            return
        if answer and isinstance(answer[0], dict):
            self.config = answer[0]

    async def reconfigure(self) -> None:
        """Merge the settings again and apply what changed: backend, engine, repo context."""
        async with self.reconfiguring:
            await self._reconfigure()

    def merge(self) -> Settings:
        settings, warnings = resolve(self.init_options, self.config)
        if warnings and warnings != self.warned:
            self.reporter.show("settings: " + "; ".join(warnings), error=False)
        self.warned = warnings
        return settings

    async def _reconfigure(self) -> None:
        settings = self.merge()
        old, self.settings = self.settings, settings
        if settings != old:
            self.cache.forget()
            self.told.clear()
        if self.backend is None or settings.remote != old.remote or settings.engine != old.engine:
            if self.backend is not None:
                await self.backend.aclose()
            self.backend = make_backend(settings, self.reporter, log.info)
            if isinstance(self.backend, EngineBackend):
                self.backend.start()
        elif settings.launch != old.launch and isinstance(self.backend, EngineBackend):
            model, device, dtype = settings.launch
            self.tell(f"the engine restarts with model {model or 'default'}, device {device or 'default'}, "
                      f"dtype {dtype or 'default'}")
            await self.backend.restart(settings)
        self.update_context()

    # -- repository context ----------------------------------------------------------------------
    def folders(self) -> list[Path]:
        paths = [to_fs_path(folder.uri) for folder in self.workspace.folders.values()]
        paths = [p for p in paths if p] or ([self.workspace.root_path] if self.workspace.root_path else [])
        return [Path(p) for p in paths]

    def update_context(self) -> None:
        if self.settings.repo_context and self.context is None:
            try:
                from .context import RepoContext
            except ImportError as exc:
                log.info(f"no repository context: {exc}")
                return
            try:
                self.context = RepoContext(self.folders(), log.info)
                self.context.start()
            except Exception:
                log.exception("the repository context failed to start")
                self.context = None
        elif not self.settings.repo_context and self.context is not None:
            self.context.stop()
            self.context = None

    def note(self, event: str, uri: str) -> None:
        """Tell the repository context that a file was opened, edited or saved."""
        path = to_fs_path(uri) if uri.startswith("file:") else None
        if self.context is None or path is None:
            return
        try:
            getattr(self.context, f"note_{event}")(Path(path))
        except Exception:
            log.exception(f"repository context: note_{event} failed")

    def context_for(self, path: str | None) -> tuple[str | None, list[tuple[str, str]]]:
        """The document's path as the model sees it and the other files to show, most relevant last."""
        if self.context is None or not path:
            return None, []
        try:
            pieces = self.context.pieces(Path(path), self.settings.context_tokens * CHARS_PER_TOKEN)
        except Exception:
            log.exception("repository context: pieces failed")
            return None, []
        for folder in self.folders():
            if Path(path).is_relative_to(folder):
                return str(Path(path).relative_to(folder)), pieces
        return Path(path).name, pieces

    # -- completions -------------------------------------------------------------------------------
    async def suggest(self, uri: str, position: types.Position, selected: types.SelectedCompletionInfo | None = None
                      ) -> str:
        """The completion at a cursor, in the document's line ends; "" for none.

        With `selected` (the item picked in the client's completion menu), the completion continues the
        document as if that item were inserted: its range replaced by its text, the cursor after it."""
        document = self.open_document(uri)
        if document is None:
            return ""
        self.stats["requests"] += 1
        source = document.source
        offset = document.offset_at_position(types.Position(line=position.line, character=position.character))
        before, after = source[:offset], source[offset:]
        if selected is not None:
            start = document.offset_at_position(selected.range.start)
            end = max(document.offset_at_position(selected.range.end), offset)
            before, after = source[:start] + selected.text, source[end:]
        prefix, suffix = to_model(before), to_model(after)
        rest = self.cache.rest(uri, prefix, suffix)
        if rest is not None:
            self.stats["type_through"] += 1
            return to_document(rest, line_ending(source))
        path = document.path if uri.startswith("file:") else None
        text = await self.prefetch.take(uri, prefix, suffix)
        if text is not None:
            self.cache.remember(uri, prefix, suffix, text)
        else:
            text = await self.ask(uri, path, prefix, suffix)
        if text and self.settings.prefetch and not any(not p.task.done() for p in self.pending.values()):
            self.prefetch.start(uri, prefix + text, suffix, lambda pre, suf: self.fetch_ahead(uri, path, pre, suf))
        return to_document(text, line_ending(source))

    async def fetch_ahead(self, uri: str, path: str | None, prefix: str, suffix: str) -> str:
        """A prefetch's backend request: no debounce, and nothing shown until the user gets there."""
        if self.backend is None:
            return ""
        where, context = self.context_for(path)
        result = await self.backend.complete(engine_params(self.settings, uri, prefix, suffix, where, context))
        return str(result.get("text") or "")

    async def ask(self, uri: str, path: str | None, prefix: str, suffix: str) -> str:
        """The backend's completion, through the document's one request in flight."""
        pending = self.pending.get(uri)
        if pending is not None and not pending.task.done() and (pending.prefix, pending.suffix) == (prefix, suffix):
            self.stats["joined"] += 1
        else:
            if pending is not None and not pending.task.done():
                pending.task.cancel()  # its callers answer with no items now; the engine gets `cancel`
                self.stats["superseded"] += 1
            pending = Pending(prefix, suffix, asyncio.create_task(self.fetch(uri, path, prefix, suffix)))
            self.pending[uri] = pending
            pending.task.add_done_callback(lambda _, p=pending: self.settled(uri, p))
        pending.waiters += 1
        try:
            return await asyncio.shield(pending.task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is None or not me.cancelling():
                return ""  # superseded: a newer request for the document took over
            self.stats["cancelled"] += 1  # $/cancelRequest: drop the work once nobody waits for it
            pending.waiters -= 1
            if pending.waiters == 0:
                pending.task.cancel()
            raise

    def settled(self, uri: str, pending: Pending) -> None:
        if self.pending.get(uri) is pending:
            del self.pending[uri]

    def in_burst(self, uri: str) -> bool:
        """Whether this request follows the document's last one within the debounce time. Only bursts are
        debounced: an isolated keystroke goes to the engine at once, since a request that a later keystroke
        supersedes costs the engine about one decoding step, while waiting costs every keystroke the delay."""
        now = time.monotonic()
        last, self.last_request[uri] = self.last_request.get(uri), now
        return last is not None and (now - last) * 1000 < self.settings.debounce_ms

    async def fetch(self, uri: str, path: str | None, prefix: str, suffix: str) -> str:
        """Debounce a burst, then one backend request; any failure is no completion (and a log line)."""
        settings = self.settings
        if settings.debounce_ms and self.in_burst(uri):
            self.stats["debounced"] += 1
            await asyncio.sleep(settings.debounce_ms / 1000)
        if self.backend is None:
            return ""
        where, context = self.context_for(path)
        params = engine_params(settings, uri, prefix, suffix, where, context)
        self.stats["backend_requests"] += 1
        started = time.perf_counter()
        try:
            result = await self.backend.complete(params)
        except Unavailable as exc:
            self.stats["unavailable"] += 1
            log.debug(f"no completion: {exc}")
            return ""
        except Exception as exc:  # the engine refused it (EngineError), or the connection broke
            code = str(getattr(exc, "code", type(exc).__name__))
            self.stats["errors"] += 1
            log.info(f"no completion: {code}: {str(exc).splitlines()[0] if str(exc) else ''}")
            if code in TOLD_ONCE and code not in self.told:
                self.told.add(code)
                self.reporter.show(str(exc), error=False)
            return ""
        text = str(result.get("text") or "")
        self.cache.remember(uri, prefix, suffix, text)
        # Per keystroke, so DEBUG: a client that never reads the server's stderr (pygls' LanguageClient) would
        # otherwise fill the pipe and stall the server.
        log.debug(f"completion: {len(text)} chars, stop {result.get('stop_reason')}, "
                  f"{(time.perf_counter() - started) * 1e3:.0f} ms: {text!r}")
        return text

    # -- status and shutdown ----------------------------------------------------------------------
    def own_status(self) -> dict:
        encoding = self.workspace.position_encoding
        return {
            "version": self.version,
            "documents_open": len(self.workspace.text_documents),
            "documents": [{"uri": doc.uri, "version": doc.version, "chars": len(doc.source),
                           "sha256": hashlib.sha256(doc.source.encode("utf-8", "surrogatepass")).hexdigest()}
                          for doc in self.workspace.text_documents.values()],
            "position_encoding": getattr(encoding, "value", encoding),
            "requests": self.stats["requests"],
            "backend_requests": self.stats["backend_requests"],
            "type_through_hits": self.stats["type_through"],
            "prefetches": self.prefetch.started,
            "prefetch_hits": self.prefetch.hits,
            "joined": self.stats["joined"],
            "superseded": self.stats["superseded"],
            "debounced": self.stats["debounced"],
            "cancelled": self.stats["cancelled"],
            "unavailable": self.stats["unavailable"],
            "errors": self.stats["errors"],
            "in_flight": len(self.pending),
            "repo_context": self.context is not None,
            "settings": summary(self.settings),
        }

    async def close(self) -> None:
        self.prefetch.cancel_all()
        for pending in list(self.pending.values()):
            pending.task.cancel()
        if self.context is not None:
            self.context.stop()
            self.context = None
        if self.backend is not None:
            await self.backend.aclose()


server = AheadLanguageServer()


@server.feature(types.INITIALIZE)
def initialize(ls: AheadLanguageServer, params: types.InitializeParams) -> None:
    ls.init_options = params.initialization_options
    ls.settings = ls.merge()


@server.feature(types.INITIALIZED)
async def initialized(ls: AheadLanguageServer, params: types.InitializedParams) -> None:
    """Start the backend now (the engine may take seconds to load), with the client's settings."""
    await ls.pull_configuration()
    await ls.reconfigure()


@server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
async def did_change_configuration(ls: AheadLanguageServer, params: types.DidChangeConfigurationParams) -> None:
    if isinstance(params.settings, dict) and "ahead" in params.settings:
        ls.config = params.settings["ahead"]
    else:  # the pull model: the notification only says that something changed
        await ls.pull_configuration()
    await ls.reconfigure()


@server.feature(types.TEXT_DOCUMENT_DID_OPEN)
def did_open(ls: AheadLanguageServer, params: types.DidOpenTextDocumentParams) -> None:
    ls.note("opened", params.text_document.uri)


@server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
def did_change(ls: AheadLanguageServer, params: types.DidChangeTextDocumentParams) -> None:
    ls.note("edited", params.text_document.uri)


@server.feature(types.TEXT_DOCUMENT_DID_SAVE)
def did_save(ls: AheadLanguageServer, params: types.DidSaveTextDocumentParams) -> None:
    ls.note("saved", params.text_document.uri)


@server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
async def did_close(ls: AheadLanguageServer, params: types.DidCloseTextDocumentParams) -> None:
    """Forget the document here and in the engine (its KV session, n-gram pool, last suggestion)."""
    uri = params.text_document.uri
    ls.cache.forget(uri)
    ls.prefetch.cancel(uri)
    ls.last_request.pop(uri, None)
    if (pending := ls.pending.get(uri)) is not None:
        pending.task.cancel()
    if ls.backend is not None:
        await ls.backend.close_document(uri)


@server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
async def inline_completion(ls: AheadLanguageServer,
                            params: types.InlineCompletionParams) -> types.InlineCompletionList:
    cursor = types.Position(line=params.position.line, character=params.position.character)
    context = params.context
    selected = context.selected_completion_info if context is not None else None
    text = await ls.suggest(params.text_document.uri, cursor, selected)
    invoked = context is not None and context.trigger_kind == types.InlineCompletionTriggerKind.Invoked
    if selected is not None:  # the item replaces the selection's range and starts with its text
        return inline_list(selected.text + text, cursor, selected.range, alternatives=invoked)
    return inline_list(text, cursor, alternatives=invoked)


@server.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions())
async def completion(ls: AheadLanguageServer, params: types.CompletionParams) -> types.CompletionList:
    """For clients without inline completion: the whole completion as one item, invoked by the user."""
    cursor = types.Position(line=params.position.line, character=params.position.character)
    return completion_list(await ls.suggest(params.text_document.uri, cursor), cursor)


@server.feature(STATUS)
async def status(ls: AheadLanguageServer, params: Any) -> dict:
    """`ahead/status`: the backend's status (model, device, latency, queue, sessions) and the server's own.
    A backend that cannot answer is a state to report, not a failed request."""
    try:
        backend = await ls.backend.status() if ls.backend is not None else {"state": "not started"}
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        backend = {"state": "unreachable", "error": f"{type(exc).__name__}: {first}"}
    return {"server": ls.own_status(), "backend": backend}


@server.feature(types.SHUTDOWN)
async def shutdown(ls: AheadLanguageServer, params: None) -> None:
    await ls.close()


def main(tcp: tuple[str, int] | None = None, log_file: Path | None = None, debug: bool = False) -> int:
    """Serve on stdio (stdout is the LSP channel: a stray print goes to stderr instead) or on TCP."""
    logs.configure(log_file, debug)
    log.info(f"ahead lsp {server.version} on {f'tcp {tcp[0]}:{tcp[1]}' if tcp else 'stdio'}")
    if tcp is not None:
        server.start_tcp(*tcp)
        return 0
    channel = sys.stdout.buffer
    sys.stdout = sys.stderr
    server.start_io(sys.stdin.buffer, channel)
    return 0
