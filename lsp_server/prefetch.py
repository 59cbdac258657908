"""Prefetch: once a suggestion is shown, compute the one for the state where the user accepts it.

Accepting ghost text and typing on is the moment a completion tool feels slow: the editor asks
again at once, at the end of what it just inserted. So while the GPU would otherwise idle, the
server asks for that next completion ahead of time (llama.vim does the same) and answers the
request from it when the user does accept. Any real request for the document cancels a prefetch
that no longer fits (the engine also lets the newest request for a document win), so typing
something else costs at most one decoding step of wasted work.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

Fetch = Callable[[str, str], Awaitable[str]]  # (prefix, suffix) -> completion text


class Prefetcher:
    """At most one prefetch per document: the completion for (prefix + shown suggestion, suffix)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[str, str, asyncio.Task[str]]] = {}
        self.hits = 0
        self.started = 0

    def start(self, uri: str, prefix: str, suffix: str, fetch: Fetch) -> None:
        """Begin computing the completion for `prefix`/`suffix` (the state after an accept)."""
        self.cancel(uri)
        self.entries[uri] = (prefix, suffix, asyncio.ensure_future(fetch(prefix, suffix)))
        self.started += 1

    async def take(self, uri: str, prefix: str, suffix: str) -> str | None:
        """The prefetched completion if it is for exactly this state (waiting for it if it is still
        running), else None after cancelling a prefetch that no longer fits."""
        entry = self.entries.get(uri)
        if entry is None:
            return None
        if (entry[0], entry[1]) != (prefix, suffix):
            self.cancel(uri)
            return None
        del self.entries[uri]
        try:
            text = await asyncio.shield(entry[2])
        except asyncio.CancelledError:
            entry[2].cancel()
            raise
        except Exception:
            return None  # a failed prefetch is no answer; the caller asks the backend itself
        if not text:
            return None
        self.hits += 1
        return text

    def cancel(self, uri: str) -> None:
        entry = self.entries.pop(uri, None)
        if entry is not None and not entry[2].done():
            entry[2].cancel()

    def cancel_all(self) -> None:
        for uri in list(self.entries):
            self.cancel(uri)

    def running(self) -> bool:
        return any(not task.done() for _, _, task in self.entries.values())

    async def drain(self) -> None:
        """Wait for running prefetches (tests, shutdown)."""
        for _, _, task in list(self.entries.values()):
            with contextlib.suppress(BaseException):
                await task
