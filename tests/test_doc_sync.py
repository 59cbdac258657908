"""Document sync: after thousands of random incremental edits, the server's text equals the client's.

The client is modelled as a plain string: an edit replaces text[i:j], and its range is computed here from
LSP's rules alone (lines end at \\n, \\r\\n or \\r; columns count UTF-16, UTF-8 or UTF-32 code units of the
line). The server side is lsp_server.documents.LspTextDocument (pygls' edit code with the editor's line
breaks), first directly (fast, thousands of edits), then through a real `ahead lsp` over stdio, whose
`ahead/status` reports a SHA-256 of each document's text.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest
from budget import budget, fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("pygls")

from lsprotocol import types  # noqa: E402
from pygls.workspace import PositionCodec  # noqa: E402

from lsp_server.documents import LspTextDocument  # noqa: E402

BREAK = re.compile(r"\r\n|\r|\n")
# ASCII, 2- and 3-byte UTF-8, astral (a UTF-16 surrogate pair), all three line breaks, and characters that
# str.splitlines breaks at but editors do not (form feed, \x1c, NEL, U+2028).
PIECES = ["a", "b", " ", "\t", "\u00e9", "\u4e2d", "\u20ac", "\U0001f600", "\U0001d518", "\n", "\r\n", "\r",
          "\f", "\x1c", "\x85", "\u2028", "if x:\n    ", "\r\n\r\n"]
texts = st.lists(st.sampled_from(PIECES), max_size=30).map("".join)
ENCODINGS = [types.PositionEncodingKind.Utf16, types.PositionEncodingKind.Utf8, types.PositionEncodingKind.Utf32]
EDITS_PER_DOCUMENT = 60


def units(text: str, encoding: str) -> int:
    """The client's column count for `text` in the negotiated position encoding."""
    if encoding == types.PositionEncodingKind.Utf8:
        return len(text.encode("utf-8"))
    if encoding == types.PositionEncodingKind.Utf16:
        return len(text.encode("utf-16-le")) // 2
    return len(text)


def position(text: str, index: int, encoding: str) -> types.Position:
    """Where text[index] is, as an editor counts: the line after `index`'s line breaks, the units before it."""
    before = text[:index]
    breaks = list(BREAK.finditer(before))
    start = breaks[-1].end() if breaks else 0
    return types.Position(line=len(breaks), character=units(before[start:], encoding))


def boundaries(text: str) -> list[int]:
    """The indices a cursor can take: any, except between the \\r and \\n of one line break."""
    return [i for i in range(len(text) + 1) if not (0 < i < len(text) and text[i - 1] == "\r" and text[i] == "\n")]


@st.composite
def edit(draw, text: str) -> tuple[int, int, str]:
    """A replacement of text[i:j]: an insertion, a deletion (possibly across lines) or both."""
    places = boundaries(text)
    i, j = sorted((draw(st.sampled_from(places)), draw(st.sampled_from(places))))
    if draw(st.booleans()):
        j = i  # half of them are pure insertions: typing
    return i, j, draw(texts)


def change(text: str, i: int, j: int, new: str, encoding: str) -> types.TextDocumentContentChangePartial:
    return types.TextDocumentContentChangePartial(
        range=types.Range(start=position(text, i, encoding), end=position(text, j, encoding)), text=new)


@pytest.mark.parametrize("encoding", ENCODINGS)
@given(start=texts, data=st.data())
@fuzz_settings(ci=60, long=1500)
def test_random_edits_keep_the_server_text_equal_to_the_client_text(encoding: str, start: str, data) -> None:
    """Catches: an edit applied at the wrong place (columns counted in code points instead of the client's
    units, a surrogate pair or \\r\\n split, a line broken at a form feed or U+2028, the last line or the end
    of a document ending in a line break mishandled); the first diverging edit is reported."""
    doc = LspTextDocument("file:///sync.py", source=start, version=0,
                          sync_kind=types.TextDocumentSyncKind.Incremental, position_codec=PositionCodec(encoding))
    text = start
    for step in range(EDITS_PER_DOCUMENT):
        i, j, new = data.draw(edit(text))
        doc.apply_change(change(text, i, j, new, encoding))
        text = text[:i] + new + text[j:]
        assert doc.source == text, f"edit {step}: text[{i}:{j}] = {new!r}"


# -- through the real server ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lsp(tmp_path_factory):
    """`ahead lsp` whose backend is a remote server that is not there: no engine is started, edits still sync."""
    from lsp_helpers import BASE, Session

    home = tmp_path_factory.mktemp("home")
    options = {**BASE, "remote": {"url": "http://127.0.0.1:9"}, "engine": {"socket": str(home / "none.sock")}}
    session = Session(options, {**os.environ, "AHEAD_HOME": str(home)}, home / "lsp.log")
    yield session
    session.close()


def server_sha256(lsp, uri: str) -> str:
    return next(d["sha256"] for d in lsp.status()["server"]["documents"] if d["uri"] == uri)


@given(start=texts, data=st.data())
@fuzz_settings(ci=3, long=30)
def test_the_real_server_keeps_the_client_text_through_random_edits(lsp, start: str, data) -> None:
    """Catches what the direct test cannot: pygls' LanguageClient -> JSON -> the server's didChange handling
    (UTF-16 negotiation, a change list, lone notifications lost or reordered) leaving another text."""
    uri = f"file:///sync/{hashlib.sha1(start.encode('utf-8', 'surrogatepass')).hexdigest()}-{len(lsp.texts)}.py"
    lsp.open(uri, start)
    text = start
    for _ in range(budget(100, 300)):
        i, j, new = data.draw(edit(text))
        lsp.versions[uri] += 1
        lsp.sync(lsp.client.text_document_did_change, types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=lsp.versions[uri]),
            content_changes=[change(text, i, j, new, types.PositionEncodingKind.Utf16)]))
        text = text[:i] + new + text[j:]
    assert server_sha256(lsp, uri) == hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_the_status_digest_is_of_the_text(lsp, tmp_path: Path) -> None:
    """Catches a digest that does not follow the text (the test above would then pass whatever the text)."""
    uri = "file:///sync/digest.py"
    lsp.open(uri, "x = 1\n")
    before = server_sha256(lsp, uri)
    lsp.edit(uri, 4, 5, "2")
    assert before == hashlib.sha256(b"x = 1\n").hexdigest()
    assert server_sha256(lsp, uri) == hashlib.sha256(b"x = 2\n").hexdigest()
