"""Where completions come from: the Backend protocol, the ahead engine behind it, and the choice of backend.

The server asks a Backend with the engine protocol's `complete` params and gets its result
map back (docs/PROTOCOL.md), whoever answers: the engine daemon on this machine (started
here when none answers on its socket), one on another machine over TCP, or an
OpenAI-compatible server (lsp_server/remote.py). Failures are exceptions that the server
turns into "no completion"; a keystroke never waits for an engine that is still loading, and
an engine that dies is started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .settings import Settings
from .spawn import LocalEngine, Stage, StartFailed, lock_free

if TYPE_CHECKING:
    from engine.client import AsyncEngineClient

OnText = Callable[[str], None]
Log = Callable[[str], None]

CONNECT_WAIT_S = 1.0  # a running engine answers `hello` in milliseconds; more means it is being started
HELLO_TIMEOUT_S = 10.0
RETRY_AFTER_S = 30.0  # after a failed start, keystrokes start the engine again at most this often
DEATHS, DEATH_WINDOW_S = 3, 120.0  # an engine that dies this often is reported, not restarted forever
WAIT_FOR_OTHER_S = 900.0  # another editor's engine may take minutes (a first GGUF conversion) to load


class Backend(Protocol):
    async def complete(self, params: dict, on_text: OnText | None = None) -> dict:
        """The engine protocol's `complete`: params and result as in docs/PROTOCOL.md."""
        ...

    async def status(self) -> dict: ...

    async def close_document(self, document: str) -> None: ...

    async def aclose(self) -> None: ...


class Unavailable(Exception):
    """Nothing can answer now (starting, restarting, failed to start): the request gets no completion."""


class Reporter(Protocol):
    """How a backend tells the user about a slow start or a failure (the server maps it to LSP)."""

    async def begin(self, title: str, message: str) -> None: ...

    async def report(self, message: str, percentage: int | None = None) -> None: ...

    async def end(self, message: str) -> None: ...

    def show(self, message: str, error: bool = True) -> None: ...


def make_backend(settings: Settings, reporter: Reporter, log: Log) -> Backend:
    """The remote backend when a remote url is set (imported only then), else the ahead engine."""
    if settings.remote.url:
        try:
            from .remote import RemoteBackend
        except ImportError as exc:
            reporter.show(f"the remote backend is not available ({exc}); using the ahead engine instead")
        else:
            remote = settings.remote
            return RemoteBackend(remote.url, api_key=remote.api_key, model=remote.model, timeout_s=remote.timeout_s,
                                 qwen_layout=remote.qwen_layout)
    return EngineBackend(settings, reporter, log)


def same_model(wanted: str, served: str | None) -> bool:
    if served is None or wanted == served:
        return True
    with contextlib.suppress(OSError):
        return Path(wanted).expanduser().resolve() == Path(served).expanduser().resolve()
    return False


class EngineBackend:
    """The ahead engine daemon on a Unix socket (started here when none answers) or over TCP."""

    def __init__(self, settings: Settings, reporter: Reporter, log: Log):
        self.settings = settings
        self.reporter = reporter
        self.log = log
        self.client: AsyncEngineClient | None = None
        self.local: LocalEngine | None = None  # the engine process this server started, if any
        self.connecting: asyncio.Task | None = None
        self.failure: tuple[float, str] | None = None  # when and why the last start failed
        self.deaths: deque[float] = deque(maxlen=DEATHS)
        self.state = "not connected"
        self.loading = False  # an engine is loading: requests answer at once instead of waiting for it
        self.closing = False

    @property
    def where(self) -> str:
        endpoint = self.settings.engine
        return f"tcp:{endpoint.tcp}" if endpoint.tcp else str(endpoint.socket)

    # -- the Backend protocol ------------------------------------------------------------------
    async def complete(self, params: dict, on_text: OnText | None = None) -> dict:
        from engine.client import EngineError

        client = await self._client()
        try:
            return await client.complete(on_text, **params)
        except EngineError as exc:
            if exc.code == "closed":
                raise Unavailable("the engine closed the connection") from exc
            raise

    async def status(self) -> dict:
        out: dict = {"backend": "engine", "endpoint": self.where, "state": self.state,
                     "started_here": self.local is not None}
        if self.local is not None:
            out |= {"pid": self.local.pid, "log": str(self.local.log_path)}
        if self.failure is not None:
            out["error"] = self.failure[1]
        client = self.client
        if client is not None and not client.closed.done():
            with contextlib.suppress(Exception):
                out = await asyncio.wait_for(client.status(), HELLO_TIMEOUT_S) | out
        return out

    async def close_document(self, document: str) -> None:
        client = self.client
        if client is not None and not client.closed.done():
            with contextlib.suppress(Exception):
                await client.close_document(document)

    async def aclose(self) -> None:
        """Disconnect; stop the engine started here unless other editors are connected to it."""
        self.closing = True
        if self.connecting is not None and not self.connecting.done():
            self.connecting.cancel()
        client, self.client = self.client, None
        stopped = False
        if client is not None:
            if self.local is not None:
                with contextlib.suppress(Exception):
                    status = await asyncio.wait_for(client.status(), 5)
                    if status.get("connections", 0) <= 1:
                        await asyncio.wait_for(client.shutdown(), 5)
                        stopped = True
            await client.close()
        if self.local is not None and (stopped or client is None):
            self.local.terminate()  # still loading when the editor quit: nobody has used it yet
            await self.local.wait_exit(10)

    # -- connecting, starting, restarting --------------------------------------------------------
    def start(self) -> None:
        """Connect now, starting the engine if none runs, so that the first keystroke finds it ready."""
        with contextlib.suppress(Unavailable):
            self._connecting()

    async def restart(self, settings: Settings) -> None:
        """Stop the engine on the socket and start one with `settings` (another model, device or dtype)."""
        self.state = "restarting"
        if self.connecting is not None and not self.connecting.done():
            self.connecting.cancel()  # a start in progress is for the old settings
            await asyncio.wait({self.connecting})
        old, self.client = self.client, None
        self.settings, self.failure = settings, None
        self.deaths.clear()
        if old is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(old.shutdown(), 10)
            await old.close()
        if self.local is not None:
            if old is None:
                self.local.terminate()  # it was still loading
            await self.local.wait_exit(30)
            self.local = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not lock_free(settings.engine.socket) and loop.time() < deadline:
            await asyncio.sleep(0.1)
        self.start()

    async def _client(self) -> AsyncEngineClient:
        client = self.client
        if client is not None and not client.closed.done():
            return client
        task = self._connecting()
        if not self.loading:
            done, _ = await asyncio.wait({task}, timeout=CONNECT_WAIT_S)
            if task in done and not task.cancelled() and task.exception() is None:
                return task.result()
        raise Unavailable(self.state)

    def _connecting(self) -> asyncio.Task:
        if self.closing:
            raise Unavailable("the language server is shutting down")
        if self.connecting is None or self.connecting.done():
            if self.failure is not None and time.monotonic() - self.failure[0] < RETRY_AFTER_S:
                raise Unavailable(self.failure[1])
            self.connecting = asyncio.create_task(self._connect_or_start())
            self.connecting.add_done_callback(lambda t: t.cancelled() or t.exception())  # failures are reported
        return self.connecting

    async def _connect_or_start(self) -> AsyncEngineClient:
        from engine.client import EngineError
        from engine.errors import AheadError

        try:
            client = await self._connect_or_launch()
        except (Unavailable, StartFailed, EngineError, AheadError, OSError) as exc:
            message = str(exc)
            self.failure = (time.monotonic(), message)
            self.state = f"unavailable: {message}"
            if not self.closing:
                self.reporter.show(message)
            raise Unavailable(message) from exc
        self.failure = None
        self._adopt(client)
        return client

    async def _connect_or_launch(self) -> AsyncEngineClient:
        self.state = "connecting"
        if self.settings.engine.tcp:
            try:
                return await self._connect()
            except OSError as exc:
                raise Unavailable(f"no engine answers on {self.where} ({exc.strerror or exc})") from None
        for _ in range(3):  # a dying engine may still hold the socket for a moment: look again
            with contextlib.suppress(OSError):
                return await self._connect()
            try:
                return await self._launch()
            except StartFailed as exc:
                if not exc.taken:
                    raise
            client = await self._wait_for_other()
            if client is not None:
                return client
        raise Unavailable(f"no engine could be started on {self.where}")

    async def _launch(self) -> AsyncEngineClient:
        """Start an engine on the socket and wait until it is ready; StartFailed if it exits first."""
        self.state, self.loading = "starting the engine", True
        self.local = LocalEngine.launch(self.settings)
        self.log(f"started the engine (pid {self.local.pid}), log: {self.local.log_path}")
        what = f"{self.settings.model or 'the default model'} on {self.settings.device or 'the best device'}"
        await self.reporter.begin("ahead: starting the engine", what)
        outcome = "failed"
        try:
            await self.local.wait_ready(self._progress)
            outcome = "ready"
        except StartFailed as exc:
            if exc.taken:  # another editor started an engine on this socket first: use that one
                self.local, outcome = None, "another editor is starting the engine"
            raise
        finally:
            self.loading = False
            await self.reporter.end(outcome)
        return await self._connect()

    async def _progress(self, stage: Stage) -> None:
        self.log(f"engine: {stage.message}")
        if not stage.error:
            await self.reporter.report(stage.message, stage.percentage)

    async def _wait_for_other(self) -> AsyncEngineClient | None:
        """Wait for the engine another process holds the socket's lock for; None once that one is gone."""
        self.state, self.loading = "waiting for the engine another editor is starting", True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_FOR_OTHER_S
        try:
            while loop.time() < deadline:
                try:
                    return await self._connect()
                except OSError:
                    if lock_free(self.settings.engine.socket):
                        return None
                await asyncio.sleep(0.5)
        finally:
            self.loading = False
        raise Unavailable(f"the engine on {self.where} did not become ready in {WAIT_FOR_OTHER_S:.0f} s")

    async def _connect(self) -> AsyncEngineClient:
        from engine.client import AsyncEngineClient, EngineError
        from engine.listen import default_token_file

        endpoint = self.settings.engine
        if endpoint.tcp:
            host, _, port = endpoint.tcp.rpartition(":")
            token_file = (endpoint.token_file or default_token_file()).expanduser()
            try:
                token = token_file.read_text().strip()
            except OSError as exc:
                raise Unavailable(f"cannot read the engine's token file {token_file}: {exc.strerror or exc}") from None
            connect = AsyncEngineClient.connect(tcp=(host.strip("[]"), int(port)), token=token, name="ahead lsp")
        else:
            connect = AsyncEngineClient.connect(endpoint.socket.expanduser(), name="ahead lsp")
        try:
            return await asyncio.wait_for(connect, HELLO_TIMEOUT_S)
        except EngineError as exc:
            if exc.code == "closed":  # accepted, then closed: an engine dying right now
                raise ConnectionResetError(str(exc)) from exc
            raise

    def _adopt(self, client: AsyncEngineClient) -> None:
        self.client = client
        self.state = "connected"
        info = client.info
        self.log(f"connected to the engine on {self.where}: {info.get('model')}, {info.get('engine')}")
        if self.settings.model and not same_model(self.settings.model, info.get("model")):
            self.reporter.show(f"the engine on {self.where} serves {info.get('model')}, not {self.settings.model}; "
                               "stop it (ahead engine --stop) or set ahead.engine.socket to another path", error=False)
        client.closed.add_done_callback(lambda _: self._lost(client))

    def _lost(self, client: AsyncEngineClient) -> None:
        """The connection closed (the engine stopped or died): reconnect, starting an engine if none answers."""
        if self.closing or client is not self.client:
            return
        self.client = None
        endpoint = self.settings.engine
        if not endpoint.tcp and not endpoint.socket.expanduser().exists():
            # Stopped on purpose (`ahead engine --stop` removes the socket; a crash leaves it): start it again
            # only when a completion is asked for.
            self.state = "stopped; starts again at the next completion request"
            self.log("the engine was stopped")
            return
        now = time.monotonic()
        self.deaths.append(now)
        if len(self.deaths) == DEATHS and now - self.deaths[0] < DEATH_WINDOW_S:
            log = f"; see {self.local.log_path}" if self.local is not None else ""
            message = f"the engine on {self.where} stopped {DEATHS} times in {DEATH_WINDOW_S:.0f} s{log}"
            self.failure = (now, message)
            self.state = f"unavailable: {message}"
            self.reporter.show(message)
            return
        self.log("lost the connection to the engine; reconnecting")
        self.state = "reconnecting"
        self.start()
