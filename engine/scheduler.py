"""What the engine thread runs next when many editors share one GPU at batch size 1.

Typing produces a request per keystroke, and only the newest one for a document matters: a
new request for a document cancels the older ones (queued: they are answered `cancelled`
without running; running: the engine stops within one step). Each client has its own bounded queue and the engine takes
from the clients in turn, so a client flooding requests delays only itself.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from typing import Protocol

from .errors import Overloaded

LOCAL = "local"  # the client of work submitted in-process


class Work(Protocol):
    client: str


class FifoScheduler:
    """One queue, first in first out: for a single caller (tests, benchmarks, the CLI)."""

    def __init__(self) -> None:
        self._items: deque[Work | None] = deque()
        self._ready = threading.Condition()

    def put(self, item: Work | None) -> None:
        with self._ready:
            self._items.append(item)
            self._ready.notify()

    def get(self) -> Work | None:
        """The next item, blocking; None once closed."""
        with self._ready:
            while not self._items:
                self._ready.wait()
            return self._items.popleft()

    def close(self) -> None:
        self.put(None)

    def pending(self) -> int:
        return sum(item is not None for item in self._items)


class FairScheduler:
    """Round robin over clients, bounded per client, newest request per document wins."""

    def __init__(self, per_client: int = 16):
        self.per_client = per_client
        self._queues: OrderedDict[str, deque[Work]] = OrderedDict()  # in turn order
        self._latest: dict[str, Work] = {}  # document -> its newest completion job
        self._ready = threading.Condition()
        self._closed = False

    def put(self, item: Work) -> None:
        with self._ready:
            if self._closed:
                raise Overloaded("the engine is shutting down")
            queue = self._queues.setdefault(item.client, deque())
            document = getattr(item, "document", None)
            if document is not None:
                older = self._latest.get(document)
                if older is not None:
                    # Queued, it stays queued: the engine thread answers it `cancelled` without
                    # running it, so its caller hears back. Running, it stops within a step.
                    older.supersede()  # type: ignore[attr-defined]
                self._latest[document] = item
            if len(queue) >= self.per_client:
                raise Overloaded(f"client '{item.client}' has {len(queue)} requests queued; wait for answers")
            queue.append(item)
            self._ready.notify()

    def get(self) -> Work | None:
        """The next client's oldest item, blocking; None once closed and drained."""
        with self._ready:
            while True:
                for client in list(self._queues):
                    queue = self._queues[client]
                    self._queues.move_to_end(client)  # this client's turn is used
                    if queue:
                        item = queue.popleft()
                        if not queue:
                            del self._queues[client]
                        return item  # stays the document's latest while it runs: a newer one cancels it
                    del self._queues[client]
                if self._closed:
                    return None
                self._ready.wait()

    def forget(self, document: str) -> None:
        """The document was closed: nothing of it needs superseding any more."""
        with self._ready:
            self._latest.pop(document, None)

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def pending(self) -> int:
        with self._ready:
            return sum(len(q) for q in self._queues.values())
