"""Type-through: while the user types what the ghost text shows, the rest of it is the next suggestion.

Most keystrokes during a suggestion type its next characters; asking the backend again costs
a round trip (and a queue wait on a busy engine) to learn what is already known. The cache
keeps the last suggestion per document with the text around the cursor it was made for, and
answers when the new cursor context is that one plus a prefix of the suggestion.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shown:
    prefix: str  # the document before the cursor when the suggestion was made
    suffix: str  # and after it
    text: str  # the suggestion


class TypeThroughCache:
    def __init__(self) -> None:
        self.shown: dict[str, Shown] = {}

    def remember(self, document: str, prefix: str, suffix: str, text: str) -> None:
        if text.strip():
            self.shown[document] = Shown(prefix, suffix, text)
        else:
            self.shown.pop(document, None)

    def rest(self, document: str, prefix: str, suffix: str) -> str | None:
        """What is left of the document's suggestion after the user typed its start; None: ask the backend.

        The text after the cursor must be unchanged and the text before it must be the old one
        plus the start of the suggestion (nothing typed: the same suggestion again)."""
        shown = self.shown.get(document)
        if shown is None or suffix != shown.suffix or not prefix.startswith(shown.prefix):
            return None
        typed = prefix[len(shown.prefix) :]
        if not shown.text.startswith(typed):
            return None
        rest = shown.text[len(typed) :]
        return rest if rest.strip() else None

    def forget(self, document: str | None = None) -> None:
        """Drop one document's suggestion, or all (the settings or the model changed)."""
        if document is None:
            self.shown.clear()
        else:
            self.shown.pop(document, None)
