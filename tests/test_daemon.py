"""The real daemon (`ahead engine`) as a subprocess with a tiny model: protocol, scheduling, lifecycle.

Each test knows the breakage it catches: answers that differ from the in-process engine,
cancellation that does not stop decoding, superseded requests still running, frames that
crash or hang the server, a dead engine's socket that blocks a restart, loose permissions.
"""

from __future__ import annotations

import asyncio
import json
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
from daemon_helpers import CODE, READY, local_engine, local_text, save_tiny_model, start_engine, stop

from engine.client import AsyncEngineClient, EngineClient, EngineError
from engine.protocol import PROTOCOL_VERSION


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_config, tiny_model, tiny_tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), tiny_config, tiny_model, tiny_tokenizer)


@pytest.fixture(scope="module")
def daemon(model_dir: Path, tmp_path_factory):
    sock = tmp_path_factory.mktemp("run") / "e.sock"
    proc = start_engine(model_dir, sock)
    yield sock
    stop(proc)


@pytest.fixture(scope="module")
def local(model_dir: Path):
    return local_engine(model_dir)


def test_answers_equal_the_in_process_engine(daemon: Path, local) -> None:
    with EngineClient(daemon) as client:
        assert client.info["protocol"] == PROTOCOL_VERSION and client.info["device"] == "cpu"
        assert client.info["tokenizer"] == local.codec.fingerprint
        for k, prefix in enumerate([CODE, CODE[:40], CODE[:-10]]):
            got = client.complete(document=f"eq-{k}", prefix=prefix, suffix="\n", max_tokens=12, stop="raw",
                                  decoding="ar")
            assert got["text"] == local_text(local, prefix, "\n", max_tokens=12, decoding="ar")
            assert got["tokens"] > 0 and got["stop_reason"] in ("length", "stop")


def test_streaming_sends_growing_prefixes_of_the_answer(daemon: Path) -> None:
    seen: list[str] = []
    with EngineClient(daemon) as client:
        got = client.complete(on_text=seen.append, prefix=CODE, max_tokens=40, stop="raw", document="stream")
    assert seen, "nothing was streamed"
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:], strict=False))
    assert got["text"].startswith(seen[-1])


def test_two_clients_at_once_get_their_own_answers(daemon: Path, local) -> None:
    prompts = [CODE[: 30 + 7 * k] for k in range(8)]
    expected = [local_text(local, p, max_tokens=10, decoding="lookahead") for p in prompts]

    async def run() -> list[str]:
        a = await AsyncEngineClient.connect(daemon, name="a")
        b = await AsyncEngineClient.connect(daemon, name="b")
        try:
            calls = [(a if k % 2 else b).complete(prefix=p, max_tokens=10, stop="raw", document=f"two-{k}")
                     for k, p in enumerate(prompts)]
            return [r["text"] for r in await asyncio.gather(*calls)]
        finally:
            await a.close()
            await b.close()

    assert asyncio.run(run()) == expected


def test_cancel_stops_decoding_within_a_step(daemon: Path) -> None:
    """Cancel after the first streamed text: the answer is `cancelled`, with far fewer tokens than asked."""

    async def run() -> EngineError:
        client = await AsyncEngineClient.connect(daemon)
        first = asyncio.Event()
        task = asyncio.create_task(client.complete(on_text=lambda _: first.set(), prefix=CODE, max_tokens=400,
                                                   stop="raw", document="cancel", decoding="ar"))
        await asyncio.wait_for(first.wait(), 30)
        await client.request("cancel", {"id": 2})  # hello was 1, the complete 2
        try:
            await task
        except EngineError as exc:
            return exc
        finally:
            await client.close()
        raise AssertionError("a cancelled completion returned a result")

    error = asyncio.run(run())
    assert error.code == "cancelled"
    assert 0 < error.data["tokens"] < 100  # 400 asked; stopped within a step or so of the cancel


def test_newer_request_for_a_document_supersedes_the_older(daemon: Path, local) -> None:
    async def run():
        client = await AsyncEngineClient.connect(daemon)
        try:
            old = asyncio.create_task(client.complete(prefix=CODE, max_tokens=400, stop="raw", document="typing",
                                                      decoding="ar"))
            await asyncio.sleep(0.05)
            new = await client.complete(prefix=CODE + "x", max_tokens=8, stop="raw", document="typing", decoding="ar")
            return await asyncio.gather(old, return_exceptions=True), new
        finally:
            await client.close()

    (old,), new = asyncio.run(run())
    assert isinstance(old, EngineError) and old.code == "cancelled" and old.data.get("superseded") is True
    assert new["text"] == local_text(local, CODE + "x", max_tokens=8, decoding="ar")


def raw_connection(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    return s


def read_frame(s: socket.socket) -> dict | None:
    unpacker = msgpack.Unpacker(raw=False)
    while True:
        for frame in unpacker:
            return frame
        data = s.recv(65536)
        if not data:
            return None
        unpacker.feed(data)


def hello(s: socket.socket) -> None:
    s.sendall(msgpack.packb({"id": 1, "method": "hello", "params": {"protocol": PROTOCOL_VERSION}}))
    assert "result" in read_frame(s)


def test_malformed_frames_get_error_replies_and_the_server_lives_on(daemon: Path) -> None:
    with raw_connection(daemon) as s:  # requests before hello are refused, then the connection closes
        s.sendall(msgpack.packb({"id": 1, "method": "status"}))
        assert read_frame(s)["error"]["code"] == "hello_first"
        assert read_frame(s) is None
    with raw_connection(daemon) as s:
        s.sendall(msgpack.packb({"id": 1, "method": "hello", "params": {"protocol": 999}}))
        assert read_frame(s)["error"]["code"] == "protocol_mismatch"
    with raw_connection(daemon) as s:
        hello(s)
        cases = [
            ([1, 2, 3], "bad_frame"),
            ({"id": 2, "method": "fly"}, "unknown_method"),
            ({"id": 3, "method": "complete", "params": {"prefix": 5}}, "bad_request"),
            ({"id": 4, "method": "complete", "params": {"prefix": "x", "max_tokens": -1}}, "bad_request"),
            ({"id": 5, "method": "complete", "params": {"prefix": "x", "stop": {"nope": 1}}}, "bad_request"),
            ({"id": 6, "method": "complete", "params": {"prefix": "x", "lookahead": "abc"}}, "bad_request"),
            ({"id": 7, "method": "complete", "params": {"prefix": CODE, "max_tokens": 10_000}}, "does_not_fit"),
            ({"id": 8, "method": "complete", "params": {"prefix": ""}}, "bad_request"),  # tiny model: no BOS
            ({"id": 9, "method": "complete", "params": {"prefix": "x", "type_through": "no"}}, "bad_request"),
        ]
        for frame, code in cases:
            s.sendall(msgpack.packb(frame))
            reply = read_frame(s)
            assert reply["error"]["code"] == code, (frame, reply)
            assert reply["error"]["message"] and "\n" not in reply["error"]["message"]
        s.sendall(b"\xc1\xc1garbage")  # 0xc1 is never valid msgpack: the stream cannot go on
        assert read_frame(s)["error"]["code"] == "bad_frame"
        assert read_frame(s) is None
    with EngineClient(daemon) as client:  # and the daemon still serves
        assert client.status()["connections"] >= 1


def test_status_reports_the_engine(daemon: Path) -> None:
    with EngineClient(daemon) as client:
        client.complete(prefix=CODE, max_tokens=4, document="status-doc")
        status = client.status()
    for key in ("model", "device", "dtype", "memory", "sessions", "lookahead", "latency_ms", "queue", "requests"):
        assert key in status, key
    assert status["latency_ms"]["count"] >= 1 and status["latency_ms"]["p50"] > 0
    assert status["sessions"] >= 1 and status["queue"] == 0
    assert status["decoding"].startswith("tree ")  # the CPU default: what the completion above ran


def test_socket_is_private(daemon: Path) -> None:
    assert stat.S_IMODE(daemon.stat().st_mode) == 0o600
    assert stat.S_IMODE(daemon.parent.stat().st_mode) & 0o077 == 0


def test_sigterm_removes_the_socket_and_kill_9_leaves_a_stale_one_that_a_restart_replaces(
    model_dir: Path, tmp_path: Path
) -> None:
    sock = tmp_path / "life.sock"
    proc = start_engine(model_dir, sock)
    second = start_engine(model_dir, sock, wait=False)  # one engine per socket
    assert second.wait(60) == 2 and "another engine" in second.stderr.read()
    proc.kill()
    proc.wait(10)
    assert sock.exists()  # stale: nobody listens
    proc = start_engine(model_dir, sock)
    with EngineClient(sock) as client:
        assert client.complete(prefix=CODE, max_tokens=3, stop="raw")["tokens"] > 0
    assert stop(proc) == 0
    assert not sock.exists()


def test_refuses_a_token_file_others_can_read(model_dir: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("secret\n")
    token.chmod(0o644)
    proc = start_engine(model_dir, tmp_path / "t.sock", "--tcp", "127.0.0.1:0", "--token-file", str(token), wait=False)
    assert proc.wait(60) == 2
    assert "readable by others" in proc.stderr.read()


def test_tcp_needs_the_token(model_dir: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("right-token\n")
    token.chmod(0o600)
    proc = start_engine(model_dir, tmp_path / "tcp.sock", "--tcp", "127.0.0.1:0", "--token-file", str(token),
                        wait=False)
    try:
        port = None
        deadline = time.monotonic() + 120
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if READY in line:
                port = int(line.split("tcp:127.0.0.1:")[1].split()[0])
        assert port, "no TCP listener"
        with pytest.raises(EngineError) as refused:
            EngineClient(tcp=("127.0.0.1", port), token="wrong-token", timeout=10)
        assert refused.value.code == "unauthorized"
        with pytest.raises(EngineError):
            EngineClient(tcp=("127.0.0.1", port), timeout=10)
        with EngineClient(tcp=("127.0.0.1", port), token="right-token", timeout=10) as client:
            assert client.complete(prefix=CODE, max_tokens=3, stop="raw")["tokens"] > 0
    finally:
        stop(proc)


def test_complete_command_uses_the_running_engine(daemon: Path, local, tmp_path: Path) -> None:
    source = tmp_path / "fib.py"
    source.write_text(CODE + "def main():\n")
    cmd = [sys.executable, "-m", "engine.cli", "complete", str(source), "--line", "6", "--col", "0", "--json",
           "--max-tokens", "8", "--no-stop-rules", "--decoding", "ar"]
    done = subprocess.run([*cmd, "--socket", str(daemon)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["served_by"] == "engine"
    from conftest import complete

    assert out["text"] == complete(local, CODE + "def main():\n", "", max_tokens=8, decoding="ar", reuse_kv=False).text
    missing = subprocess.run([*cmd, "--socket", str(tmp_path / "none.sock")], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and "no engine answers" in missing.stderr


def test_a_superseded_request_still_queued_is_answered_without_running(daemon: Path, local) -> None:
    """Queued behind a long completion, then replaced: its caller hears `cancelled` (it must not hang)."""

    async def run():
        client = await AsyncEngineClient.connect(daemon)
        try:
            long = asyncio.create_task(client.complete(prefix=CODE, max_tokens=300, stop="raw", document="busy",
                                                       decoding="ar"))
            await asyncio.sleep(0.05)
            queued = asyncio.create_task(client.complete(prefix=CODE, max_tokens=8, stop="raw", document="q"))
            await asyncio.sleep(0.02)
            newest = await asyncio.wait_for(
                client.complete(prefix=CODE + "y", max_tokens=8, stop="raw", document="q", decoding="ar"), 60)
            return await asyncio.wait_for(asyncio.gather(queued, long, return_exceptions=True), 60), newest
        finally:
            await client.close()

    (queued, long), newest = asyncio.run(run())
    assert isinstance(queued, EngineError) and queued.code == "cancelled" and queued.data.get("superseded") is True
    assert queued.data.get("tokens") == 0  # it never ran
    assert not isinstance(long, Exception) and long["tokens"] > 0
    assert newest["text"] == local_text(local, CODE + "y", max_tokens=8, decoding="ar")


def test_an_oversized_frame_is_refused_and_the_daemon_lives_on(daemon: Path) -> None:
    from engine.protocol import MAX_FRAME_BYTES

    with raw_connection(daemon) as s:
        hello(s)
        huge = msgpack.packb({"id": 2, "method": "complete", "params": {"prefix": "x" * (MAX_FRAME_BYTES + 1)}})
        try:
            s.sendall(huge)
        except OSError:
            pass  # the server may close before it has read everything
        reply = read_frame(s)
        assert reply is not None and reply["error"]["code"] == "bad_frame"
    with EngineClient(daemon) as client:
        assert client.complete(prefix=CODE, max_tokens=2, stop="raw")["tokens"] > 0
