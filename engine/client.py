"""Clients of the engine daemon: blocking (CLI, tests, benchmarks) and asyncio (the language server).

Both do the handshake on connect and turn error replies into `EngineError` with the server's
code, so callers handle `cancelled` or `does_not_fit` the same way whether the engine runs
in-process or behind the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import protocol
from .errors import AheadError
from .listen import default_socket

OnText = Callable[[str], None]


class EngineError(AheadError):
    """An error reply from the daemon."""

    def __init__(self, code: str, message: str, data: dict | None = None):
        super().__init__(message)
        self.code = code
        self.data = data or {}


def hello_params(name: str, token: str | None) -> dict:
    params: dict[str, Any] = {"protocol": protocol.PROTOCOL_VERSION, "client": name}
    if token is not None:
        params["token"] = token
    return params


def answer(frame: dict) -> dict:
    if "error" in frame:
        err = frame["error"] if isinstance(frame["error"], dict) else {}
        raise EngineError(str(err.get("code", "error")), str(err.get("message", "error")), err)
    return frame.get("result") or {}


class EngineClient:
    """A blocking connection: one request at a time."""

    def __init__(self, socket_path: Path | str | None = None, *, tcp: tuple[str, int] | None = None,
                 token: str | None = None, timeout: float | None = None, name: str = "ahead"):
        if tcp is not None:
            self.sock = socket.create_connection(tcp, timeout=timeout)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(str(socket_path or default_socket()))
        self.unpacker = protocol.unpacker()
        self.ids = itertools.count(1)
        self.info = self.request("hello", hello_params(name, token))

    def __enter__(self) -> EngineClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def request(self, method: str, params: dict | None = None, on_partial: OnText | None = None) -> dict:
        request_id = next(self.ids)
        self.sock.sendall(protocol.pack({"id": request_id, "method": method, "params": params or {}}))
        while True:
            frame = self._read()
            if frame.get("id") not in (request_id, None):
                continue  # a late answer to an earlier request
            if "partial" in frame:
                if on_partial is not None:
                    on_partial(frame["partial"].get("text", ""))
                continue
            return answer(frame)

    def _read(self) -> dict:
        while True:
            for frame in self.unpacker:
                if isinstance(frame, dict):
                    return frame
            data = self.sock.recv(1 << 16)
            if not data:
                raise EngineError("closed", "the engine closed the connection")
            self.unpacker.feed(data)

    def complete(self, on_text: OnText | None = None, **params: Any) -> dict:
        """`complete` with the protocol's params (prefix, suffix, document, max_tokens, stop, ...)."""
        return self.request("complete", {**params, "stream": on_text is not None}, on_text)

    def status(self) -> dict:
        return self.request("status")

    def close_document(self, document: str) -> dict:
        return self.request("close_document", {"document": document})

    def shutdown(self) -> dict:
        return self.request("shutdown")


class AsyncEngineClient:
    """An asyncio connection with many requests in flight; cancelling an awaiting task cancels its request."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.ids = itertools.count(1)
        self.waiting: dict[int, tuple[asyncio.Future, OnText | None]] = {}
        self.info: dict = {}
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()
        self._reading = asyncio.create_task(self._read_loop())

    @classmethod
    async def connect(cls, socket_path: Path | str | None = None, *, tcp: tuple[str, int] | None = None,
                      token: str | None = None, name: str = "ahead") -> AsyncEngineClient:
        if tcp is not None:
            reader, writer = await asyncio.open_connection(*tcp)
        else:
            reader, writer = await asyncio.open_unix_connection(str(socket_path or default_socket()))
        client = cls(reader, writer)
        client.info = await client.request("hello", hello_params(name, token))
        return client

    async def close(self) -> None:
        self._reading.cancel()
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    async def _read_loop(self) -> None:
        unpacker = protocol.unpacker()
        error = EngineError("closed", "the engine closed the connection")
        try:
            while data := await self.reader.read(1 << 16):
                unpacker.feed(data)
                for frame in unpacker:
                    if not isinstance(frame, dict):
                        continue
                    entry = self.waiting.get(frame.get("id"))  # type: ignore[arg-type]
                    if entry is None:
                        continue
                    future, on_text = entry
                    if "partial" in frame:
                        if on_text is not None:
                            on_text(frame["partial"].get("text", ""))
                    elif not future.done():
                        try:
                            future.set_result(answer(frame))
                        except EngineError as exc:
                            future.set_exception(exc)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            for future, _ in self.waiting.values():
                if not future.done():
                    future.set_exception(error)
            if not self.closed.done():
                self.closed.set_result(None)

    async def request(self, method: str, params: dict | None = None, on_partial: OnText | None = None) -> dict:
        request_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.waiting[request_id] = (future, on_partial)
        try:
            self.writer.write(protocol.pack({"id": request_id, "method": method, "params": params or {}}))
            await self.writer.drain()
            return await future
        except asyncio.CancelledError:
            if method == "complete" and not self.writer.is_closing():
                cancel = {"id": next(self.ids), "method": "cancel", "params": {"id": request_id}}
                self.writer.write(protocol.pack(cancel))
            raise
        finally:
            self.waiting.pop(request_id, None)

    async def complete(self, on_text: OnText | None = None, **params: Any) -> dict:
        return await self.request("complete", {**params, "stream": on_text is not None}, on_text)

    async def status(self) -> dict:
        return await self.request("status")

    async def close_document(self, document: str) -> dict:
        return await self.request("close_document", {"document": document})

    async def shutdown(self) -> dict:
        return await self.request("shutdown")
