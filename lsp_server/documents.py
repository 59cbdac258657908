"""pygls' documents with LSP's line breaks.

pygls 2.1.1 splits documents with `str.splitlines`, which also breaks lines at form feeds
(`^L` page breaks in Python sources), vertical tabs, `\\x1c`-`\\x1e`, NEL and U+2028/U+2029.
Editors break lines only at `\\n`, `\\r\\n` and `\\r` (LSP's definition), so in such a file an
incremental edit lands on the wrong line and every later cursor is off. These classes keep
pygls' edit and position code and only give it the editor's lines, and positions past a line's
end clamped where LSP says.
"""

from __future__ import annotations

import re
from collections.abc import Generator, Sequence
from typing import Any

from lsprotocol import types
from pygls.protocol import lsp_method
from pygls.uris import from_fs_path
from pygls.workspace import PositionCodec, TextDocument, Workspace
from pygls.workspace.position_codec import ServerTextPosition

from .jsonrpc import AnsweringProtocol

LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")


def split_lines(text: str) -> tuple[str, ...]:
    """`text` split after each `\\n`, `\\r\\n` or `\\r`, ends kept (`str.splitlines(True)` with LSP's breaks)."""
    return tuple(LINE.findall(text))


class LspTextDocument(TextDocument):
    @property
    def lines(self) -> Sequence[str]:
        return split_lines(self.source)


class LspPositionCodec(PositionCodec):
    """pygls' codec, with positions past a line's end clamped as LSP says: to the line's end, before its
    line break. pygls 2.1.1 puts them one character early on a last line without a break (a cursor sent
    there completed before the line's last character) and after the break of the others."""

    def position_from_client_units(self, lines: Sequence[str], position: types.Position) -> ServerTextPosition:
        if 0 <= position.line < len(lines):
            width = self.client_num_units(lines[position.line].rstrip("\r\n"))
            if position.character > width:
                position = types.Position(line=position.line, character=width)
        return super().position_from_client_units(lines, position)


class LspWorkspace(Workspace):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._position_codec = LspPositionCodec(self.position_encoding)

    def _create_text_document(self, doc_uri: str, source: str | None = None, version: int | None = None,
                              language_id: str | None = None) -> TextDocument:
        return LspTextDocument(doc_uri, source=source, version=version, language_id=language_id,
                               sync_kind=types.TextDocumentSyncKind.Incremental, position_codec=self.position_codec)


class LspProtocol(AnsweringProtocol):
    """pygls' protocol (answering malformed requests, jsonrpc.py), with an LspWorkspace made at `initialize`."""

    @lsp_method(types.INITIALIZE)
    def lsp_initialize(self, params: types.InitializeParams) -> Generator[Any, Any, types.InitializeResult]:
        result = yield from super().lsp_initialize(params)
        root_uri = params.root_uri or (from_fs_path(params.root_path) if params.root_path else None)
        self._workspace = LspWorkspace(root_uri, types.TextDocumentSyncKind.Incremental,
                                       params.workspace_folders or [], self.workspace.position_encoding)
        return result
