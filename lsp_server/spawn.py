"""Starting a local engine: its command line, a private log file, and that log read as progress.

The engine outlives this server (every editor on the machine shares it), so it gets no pipes
that would break when the server exits: its stderr goes to a file next to its socket, which
is tailed while the model loads and warms up. Its lines become progress messages, and the
last `ahead: error:` line is what the user is shown if it exits instead of becoming ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from engine.errors import AheadError
from engine.listen import private_dir

from .settings import Settings

READY = "engine ready"
CAPTURED = re.compile(r"captured (\d+)/(\d+) CUDA graphs")
PERCENT = re.compile(r"(\d{1,3})%\|")  # a tqdm bar (a download from the Hugging Face hub)


@dataclass(frozen=True)
class Stage:
    """One line of the engine's log, as the user should see it."""

    message: str
    percentage: int | None = None
    ready: bool = False
    error: bool = False


class StartFailed(Exception):
    """The engine exited before it was ready; `taken`: another engine holds the socket (it is starting too)."""

    def __init__(self, message: str, taken: bool = False):
        super().__init__(message)
        self.taken = taken


def read_line(line: str) -> Stage | None:
    """What a log line says about the start: progress, an error, readiness, or nothing."""
    line = line.strip()
    if not line.startswith("ahead: "):
        bar = PERCENT.search(line)
        return Stage("downloading the model", min(100, int(bar[1]))) if bar else None
    body = line.removeprefix("ahead: ")
    if body.startswith("error: "):
        return Stage(body.removeprefix("error: "), error=True)
    if body.startswith(READY):
        return Stage("ready", ready=True)
    if graphs := CAPTURED.match(body):
        done, total = int(graphs[1]), int(graphs[2])
        return Stage(f"capturing CUDA graphs ({done}/{total})", percentage=100 * done // max(total, 1))
    return Stage(body)


def engine_command(settings: Settings) -> list[str]:
    """`ahead engine` on the configured socket with the configured model, device and dtype."""
    command = [sys.executable, "-m", "engine.cli", "engine", "--socket", str(settings.engine.socket)]
    for flag, value in (("--model", settings.model), ("--device", settings.device), ("--dtype", settings.dtype)):
        if value:
            command += [flag, os.path.expanduser(value) if flag == "--model" else value]
    return command


def lock_free(socket: Path) -> bool:
    """No engine holds the socket's lock (engine/listen.py's SocketLock): none runs or starts there."""
    try:
        fd = os.open(socket.with_name(socket.name + ".lock"), os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


class LocalEngine:
    """An engine process this server started."""

    def __init__(self, process: subprocess.Popen, log_path: Path):
        self.process = process
        self.log_path = log_path

    @classmethod
    def launch(cls, settings: Settings) -> LocalEngine:
        socket = settings.engine.socket.expanduser().absolute()
        try:
            private_dir(socket.parent)
        except AheadError as exc:
            raise StartFailed(str(exc)) from None
        log_path = socket.with_name(socket.stem + ".log")
        root = str(Path(__file__).resolve().parents[1])  # run the engine from this server's own checkout
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            process = subprocess.Popen(engine_command(settings), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=fd, env=env, start_new_session=True)
        finally:
            os.close(fd)
        return cls(process, log_path)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    async def wait_ready(self, on_stage: Callable[[Stage], Awaitable[None]], poll_s: float = 0.1) -> None:
        """Follow the log until the engine says it is ready; StartFailed if it exits first."""
        error: str | None = None
        pending = ""
        with open(self.log_path, "rb") as log:
            while True:
                exited = self.process.poll() is not None
                chunk = log.read()
                if chunk:
                    pending += chunk.decode("utf-8", errors="replace")
                    *lines, pending = re.split(r"[\r\n]", pending)
                    for line in lines:
                        stage = read_line(line)
                        if stage is None:
                            continue
                        if stage.ready:
                            return
                        if stage.error:
                            error = stage.message
                        await on_stage(stage)
                    continue
                if exited:
                    code = self.process.returncode
                    message = error or f"the engine exited with status {code} before it was ready; see {self.log_path}"
                    raise StartFailed(message, taken=bool(error and error.startswith("another engine")))
                await asyncio.sleep(poll_s)

    async def wait_exit(self, timeout: float) -> None:
        """Wait for the process to end; kill it if it takes longer than `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.alive() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.alive():
            self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)

    def terminate(self) -> None:
        if self.alive():
            self.process.terminate()
