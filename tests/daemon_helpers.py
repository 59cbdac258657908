"""What the daemon tests share: a tiny model on disk, starting and stopping `ahead engine`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

CODE = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
READY = "engine ready"


def save_tiny_model(path: Path, tiny_config, tiny_model, tokenizer) -> Path:
    """A tiny random Qwen2 saved as a model directory (config.json, safetensors, tokenizer.json)."""
    model, _ = tiny_model(tiny_config("qwen2"))
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def start_engine(model_dir: Path, sock: Path, *extra: str, wait: bool = True) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AHEAD_HOME": str(sock.parent / "home")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "engine", "--model", str(model_dir), "--device", "cpu",
         "--max-seq-len", "512", "--socket", str(sock), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    if wait:
        wait_ready(proc)
    return proc


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()


def wait_ready(proc: subprocess.Popen, timeout: float = 120) -> str:
    """The engine's ready line (it names its listeners); fails with its stderr if it exits first."""
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if READY in line:
            return line
    proc.kill()
    raise AssertionError("the engine did not become ready:\n" + "".join(lines))


def local_engine(model_dir: Path, device: str = "cpu"):
    """The same model in-process: what the daemon's answers must equal."""
    from engine.engine import Engine, EngineOptions

    return Engine(EngineOptions(model=str(model_dir), device=device, dtype="fp32", max_seq_len=512), log=lambda _: None)


def local_text(engine, prefix: str, suffix: str = "", **kw) -> str:
    from conftest import complete

    return complete(engine, prefix, suffix, type_through=False, reuse_kv=False, **kw).text


def serve_openai(model_dir: Path, run: Path, host: str, *extra: str) -> tuple[subprocess.Popen, str]:
    """`ahead engine --openai HOST:0` with the tiny model; (process, http://127.0.0.1:PORT) once ready."""
    proc = start_engine(model_dir, run / "o.sock", "--openai", f"{host}:0", *extra, wait=False)
    ready = wait_ready(proc)
    port = ready.split("openai:http://")[1].split("/")[0].rsplit(":", 1)[1]
    return proc, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def serve_in_thread(build_engine, run: Path, **options) -> Iterator[tuple[Path, str | None, list[str]]]:
    """The daemon's own `serve()` on a thread of this process, for tests that reach inside it (a fault
    injected into the model, a shortened timeout); yields (socket, OpenAI base url or None, log lines)."""
    from engine.client import EngineClient
    from engine.server import ServeOptions, serve

    sock, lines, ended = run / "e.sock", [], {}
    ready = threading.Event()

    def log(message: str) -> None:
        lines.append(message)
        if READY in message:
            ready.set()

    def main() -> None:
        try:
            ended["code"] = asyncio.run(serve(ServeOptions(socket=sock, **options), build_engine, log,
                                              handle_signals=False))
        except BaseException as exc:  # reported by the caller, not lost on the thread
            ended["error"] = exc
        ready.set()

    thread = threading.Thread(target=main, name="ahead-daemon", daemon=True)
    thread.start()
    assert ready.wait(120) and not ended, f"the daemon did not start: {ended} {lines}"
    where = next(line for line in lines if READY in line)
    url = where.split("openai:")[1].split()[0] if "openai:" in where else None
    try:
        yield sock, url, lines
    finally:
        with contextlib.suppress(Exception), EngineClient(sock, timeout=10) as client:
            client.shutdown()
        thread.join(30)
