"""Fuzzing the engine daemon's socket: random msgpack, wrong types, truncated frames, huge declared lengths.

A real `ahead engine` (tiny random model) on a Unix socket. The promises (docs/PROTOCOL.md): every frame
that is a msgpack value gets exactly one answer, a result or an error with a known code and a one-line
message, and never `internal` (that code means a bug); bytes that cannot be framed get one `bad_frame`
error, then the connection closes; a client that leaves mid-frame costs nothing; after all of it the
daemon answers the next client, and its log holds no traceback.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import msgpack
import pytest
from budget import fuzz_settings
from daemon_helpers import CODE, save_tiny_model, start_engine, stop
from hypothesis import given
from hypothesis import strategies as st

from engine.protocol import MAX_FRAME_BYTES, METHODS, PROTOCOL_VERSION, unpacker

CODES = {"bad_frame", "hello_first", "protocol_mismatch", "unauthorized", "unknown_method", "bad_request",
         "does_not_fit", "cancelled", "overloaded", "out_of_memory"}  # docs/PROTOCOL.md's, less `internal`
SAFE_METHODS = [m for m in METHODS if m != "shutdown"]  # a fuzzed `shutdown` would end the test's daemon
PARAMS = ["prefix", "suffix", "document", "path", "context", "max_tokens", "stop", "decoding", "lookahead", "heal",
          "stream", "id", "protocol", "client", "token"]
SENTINEL = 1 << 40  # the id of the `status` request that closes each batch; fuzzed ids stay below it


# -- strategies --------------------------------------------------------------------------------------
scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
           | st.text(max_size=40) | st.binary(max_size=40))
keys = st.text(max_size=8) | st.integers(-(2**63), 2**63 - 1)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                      max_leaves=20)
param_values = (values | st.sampled_from(["ar", "lookahead", "raw", "4,3,4", "0,0,0", CODE])
                | st.integers(-3, 300) | st.fixed_dictionaries({}, optional={
                    "block_end": values, "suffix_overlap": st.booleans(), "max_lines": st.integers(-2, 5)})
                | st.lists(st.fixed_dictionaries({"path": values, "text": values}), max_size=2))
requests = st.fixed_dictionaries(
    {"id": st.integers(0, SENTINEL - 1) | values,
     "method": st.sampled_from(SAFE_METHODS) | st.text(max_size=10).filter(lambda m: m != "shutdown")},
    optional={"params": st.dictionaries(st.sampled_from(PARAMS) | st.text(max_size=6), param_values, max_size=6)
              | values})
frames = st.one_of(requests, values.filter(lambda v: not (isinstance(v, dict) and v.get("method") == "shutdown")))


# -- a daemon whose log is kept ---------------------------------------------------------------------
class Daemon:
    def __init__(self, proc: subprocess.Popen, sock: Path):
        self.proc, self.sock, self.log = proc, sock, []
        threading.Thread(target=self._drain, daemon=True).start()  # a full stderr pipe would stall the engine

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_config, tiny_model, tiny_tokenizer):
    model_dir = save_tiny_model(tmp_path_factory.mktemp("tiny-model"), tiny_config, tiny_model, tiny_tokenizer)
    sock = tmp_path_factory.mktemp("run") / "e.sock"
    proc = start_engine(model_dir, sock)
    daemon = Daemon(proc, sock)
    yield daemon
    stop(proc)
    assert not any("Traceback" in line for line in daemon.log), "".join(daemon.log)


class Connection:
    """A raw socket to the daemon, reading frames with a persistent decoder."""

    def __init__(self, sock: Path, timeout: float = 30):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(str(sock))
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)

    def send(self, data: bytes) -> None:
        try:
            self.s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed first: what it said before is still to be read

    def read(self) -> dict | None:
        """The next frame; None once the server closed the connection."""
        while True:
            for frame in self.unpacker:
                return frame
            try:
                data = self.s.recv(1 << 16)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.unpacker.feed(data)

    def hello(self) -> None:
        self.send(msgpack.packb({"id": 0, "method": "hello", "params": {"protocol": PROTOCOL_VERSION}}))
        assert "result" in self.read()

    def close(self) -> None:
        self.s.close()


def check_error(reply: dict) -> str:
    error = reply["error"]
    assert error["code"] in CODES, reply
    assert isinstance(error["message"], str) and error["message"] and "\n" not in error["message"], reply
    return error["code"]


def serves(daemon: Daemon) -> dict:
    """A fresh client's `status` and a completion: the daemon still works."""
    from engine.client import EngineClient

    with EngineClient(daemon.sock) as client:
        assert client.complete(prefix=CODE, max_tokens=2, stop="raw")["tokens"] > 0
        return client.status()


# -- the tests -------------------------------------------------------------------------------------------
@given(batch=st.lists(frames, min_size=1, max_size=5))
@fuzz_settings(ci=300, long=5000)
def test_every_msgpack_frame_gets_one_answer_and_never_an_internal_error(daemon: Daemon, batch: list) -> None:
    """Catches: a frame of the wrong shape or with wrong-typed params that crashes the connection, is
    answered twice or never, or reaches the engine unchecked (an `internal` error, a traceback in the log)."""
    conn = Connection(daemon.sock)
    try:
        conn.hello()
        for frame in batch:
            conn.send(msgpack.packb(frame))
        conn.send(msgpack.packb({"id": SENTINEL, "method": "status"}))
        answers, status = 0, None
        while answers < len(batch) or status is None:
            reply = conn.read()
            assert reply is not None, f"the connection closed after {answers} of {len(batch)} answers"
            if "partial" in reply:
                continue
            if reply.get("id") == SENTINEL and "result" in reply:
                status = reply["result"]
                continue
            answers += 1
            assert ("result" in reply) != ("error" in reply), reply
            if "error" in reply:
                check_error(reply)
        assert answers == len(batch)
    finally:
        conn.close()


def undecodable(data: bytes) -> bool:
    """Whether a msgpack decoder fails on `data` (rather than decoding it or waiting for more)."""
    reference = unpacker()  # the server's own decoder
    try:
        reference.feed(data)
        list(reference)
    except (msgpack.UnpackException, ValueError, TypeError):
        return True
    return False


@given(garbage=st.binary(min_size=1, max_size=64))
@fuzz_settings(ci=100, long=2000)
def test_unframeable_bytes_get_one_bad_frame_then_the_connection_closes(daemon: Daemon, garbage: bytes) -> None:
    """Catches: a decoder error that kills the connection silently, escapes as an unhandled exception, or
    lets the server read on in a stream it cannot resynchronise; and a server that keeps a connection whose
    peer stopped sending halfway through a frame."""
    data = garbage + b"\xc1"  # 0xc1 is never valid msgpack, unless a string's length swallows it
    conn = Connection(daemon.sock, timeout=10)
    try:
        conn.hello()
        conn.send(data)
        conn.s.shutdown(socket.SHUT_WR)
        replies = []
        while (reply := conn.read()) is not None:
            replies.append(reply)
        if undecodable(data):
            assert replies and replies[-1]["id"] is None and check_error(replies[-1]) == "bad_frame", replies
            replies.pop()
        for reply in replies:  # frames the garbage happened to hold: answered like any other
            assert "result" in reply or "partial" in reply or check_error(reply)
    finally:
        conn.close()


@given(frame=requests, cut=st.floats(0, 1, exclude_max=True))
@fuzz_settings(ci=60, long=1000)
def test_a_client_that_leaves_mid_frame_costs_nothing(daemon: Daemon, frame: dict, cut: float) -> None:
    """Catches: a handler left waiting (a connection counted forever) or a crash when the peer closes halfway
    through a frame."""
    data = msgpack.packb(frame)
    conn = Connection(daemon.sock)
    conn.hello()
    conn.send(data[: int(len(data) * cut)])
    conn.close()
    deadline = time.monotonic() + 10
    while (status := serves(daemon))["connections"] > 1:  # only the client asking
        assert time.monotonic() < deadline, f"{status['connections']} connections left open"
        time.sleep(0.05)


HUGE = MAX_FRAME_BYTES + 1
HEADERS = {  # msgpack type headers that declare more than a frame may hold
    "str32": b"\xdb" + HUGE.to_bytes(4, "big"),
    "bin32": b"\xc6" + HUGE.to_bytes(4, "big"),
    "array32": b"\xdd" + (2**32 - 1).to_bytes(4, "big"),
    "map32": b"\xdf" + (2**32 - 1).to_bytes(4, "big"),
    "ext32": b"\xc9" + HUGE.to_bytes(4, "big") + b"\x01",
}


@pytest.mark.parametrize("nested", [False, True], ids=["alone", "in-a-request"])
@pytest.mark.parametrize("header", list(HEADERS), ids=list(HEADERS))
def test_a_declared_length_over_the_limit_is_refused_at_once(daemon: Daemon, header: str, nested: bool) -> None:
    """Catches a server that waits for (and buffers) megabytes it will refuse anyway: the header alone must
    get `bad_frame` and the connection closed, even inside a request's params."""
    pack = msgpack.packb
    request = b"\x83" + pack("id") + pack(5) + pack("method") + pack("complete") + pack("params") + b"\x81"
    data = request + pack("prefix") + HEADERS[header] if nested else HEADERS[header]  # \x83, \x81: fixmaps
    conn = Connection(daemon.sock, timeout=5)
    try:
        conn.hello()
        started = time.monotonic()
        conn.send(data)
        reply = conn.read()
        assert reply is not None and reply["id"] is None and check_error(reply) == "bad_frame", reply
        assert conn.read() is None and time.monotonic() - started < 5
    finally:
        conn.close()
    serves(daemon)


def test_the_daemon_serves_after_the_fuzzing(daemon: Daemon) -> None:
    """Catches damage that outlives the connection that did it (a wedged engine thread, a leaked queue)."""
    status = serves(daemon)
    assert status["queue"] == 0 and status["connections"] == 1
    assert daemon.proc.poll() is None
