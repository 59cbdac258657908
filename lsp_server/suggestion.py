"""Between the editor and the engine: the cursor's surroundings out, the completion back as LSP items.

The engine completes `prefix` + cursor + `suffix` and answers the text to insert at the cursor
(docs/PROTOCOL.md), so every item here replaces the empty range at the cursor: mid-line, the
line-end rule has already cut the text to what belongs before the rest of the line. Documents
with CRLF line ends are shown to the model with LF and get CRLF back.
"""

from __future__ import annotations

from lsprotocol import types

from .settings import Settings

PREFIX_CHARS = 1 << 20  # far beyond any prompt window; keeps a frame under the protocol's 16 MiB on huge files
SUFFIX_CHARS = 1 << 18


def line_ending(source: str) -> str:
    """The document's line end, judged by its first line break."""
    first = source.find("\n")
    return "\r\n" if first > 0 and source[first - 1] == "\r" else "\n"


def to_model(text: str) -> str:
    return text.replace("\r\n", "\n")


def to_document(text: str, eol: str) -> str:
    return text.replace("\n", eol) if eol != "\n" else text


def clip(prefix: str, suffix: str) -> tuple[str, str]:
    """The text around the cursor the engine needs, cut at line starts when a file is huge."""
    if len(prefix) > PREFIX_CHARS:
        prefix = prefix[-PREFIX_CHARS:]
        prefix = prefix[prefix.find("\n") + 1 :]
    if len(suffix) > SUFFIX_CHARS:
        suffix = suffix[:SUFFIX_CHARS]
        suffix = suffix[: suffix.rfind("\n") + 1]
    return prefix, suffix


def engine_params(settings: Settings, document: str, prefix: str, suffix: str, path: str | None = None,
                  context: list[tuple[str, str]] | None = None) -> dict:
    """The `complete` request (docs/PROTOCOL.md) for a cursor, with the settings' limits and stop rules."""
    prefix, suffix = clip(prefix, suffix)
    stop = settings.stop
    params: dict = {
        "prefix": prefix, "suffix": suffix, "document": document, "max_tokens": settings.max_tokens,
        "decoding": settings.decoding,
        "type_through": False,  # ours (typing_cache.py) knows what the editor was shown; the engine's does not
        "stop": {"block_end": stop.block_end, "suffix_overlap": stop.suffix_overlap, "line_end": stop.line_end,
                 "max_lines": settings.max_lines},
    }
    if settings.lookahead != "auto":
        params["lookahead"] = settings.lookahead
    if context:
        params["context"] = [{"path": where, "text": text} for where, text in context]
        if path:
            params["path"] = path
    return params


def at(cursor: types.Position) -> types.Range:
    return types.Range(start=cursor, end=cursor)


def first_line(text: str) -> str | None:
    """The text up to its first line break after some code; None when that is all of it."""
    start = len(text) - len(text.lstrip())
    cut = text.find("\n", start)
    if cut < 0 or not text[cut:].strip():
        return None
    return text[:cut]


def inline_list(text: str, cursor: types.Position, replaced: types.Range | None = None,
                alternatives: bool = False) -> types.InlineCompletionList:
    """The inline item inserting `text` at the cursor (or over `replaced`); none for a blank text.

    With `alternatives` (the user asked explicitly), a multi-line text also comes as its first line
    alone: the one alternative that costs nothing, since it is a cut of the same completion."""
    if not text.strip():
        return types.InlineCompletionList(items=[])
    where = replaced or at(cursor)
    texts = [text]
    if alternatives and (line := first_line(text)) is not None and line.strip():
        texts.append(line)
    return types.InlineCompletionList(items=[types.InlineCompletionItem(insert_text=t, range=where) for t in texts])


def label_of(text: str) -> str:
    """The completion's first line with code on it, as a completion menu shows it."""
    first = next((line for line in text.splitlines() if line.strip()), text)
    return first.strip()


def completion_list(text: str, cursor: types.Position) -> types.CompletionList:
    """One completion item (for clients without inline completion) that inserts the whole text at the cursor.

    `AsIs`: the text's lines carry their own indentation, which a client would otherwise add to again;
    incomplete: the answer depends on every character typed, so the client must ask again."""
    if not text.strip():
        return types.CompletionList(is_incomplete=True, items=[])
    item = types.CompletionItem(
        label=label_of(text),
        kind=types.CompletionItemKind.Text,
        detail="ahead",
        documentation=types.MarkupContent(kind=types.MarkupKind.PlainText, value=text),
        sort_text="0",
        preselect=True,
        insert_text=text,
        insert_text_format=types.InsertTextFormat.PlainText,
        insert_text_mode=types.InsertTextMode.AsIs,
        text_edit=types.TextEdit(range=at(cursor), new_text=text),
    )
    return types.CompletionList(is_incomplete=True, items=[item])
