"""The OpenAI-compatible endpoint against hostile or broken HTTP clients: malformed and huge bodies, clients
that dribble bytes, wrong tokens, hundreds of connections at once. The server answers each with a clear
status and keeps serving everyone else.

tests/test_openai_api.py covers the happy path and the first bad bodies; these go further. The slow-client
test runs the daemon's own serve() on a thread so that its read deadline can be shortened to a second.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import aiohttp
import pytest
from daemon_helpers import CODE, local_engine, save_tiny_model, serve_in_thread, serve_openai, stop

from engine import openai_api


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_config, tiny_model, tiny_tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), tiny_config, tiny_model, tiny_tokenizer)


@pytest.fixture(scope="module")
def endpoint(model_dir: Path, tmp_path_factory):
    """`ahead engine --openai 127.0.0.1:0`; yields (host, port)."""
    proc, url = serve_openai(model_dir, tmp_path_factory.mktemp("openai"), "127.0.0.1")
    host, port = url.removeprefix("http://").rsplit(":", 1)
    yield host, int(port)
    stop(proc)


def raw_request(address: tuple[str, int], data: bytes, timeout: float = 30) -> tuple[int, bytes]:
    """Send bytes as they are (no client library fixing them up); (status, body) of the reply, read up to its
    Content-Length (after refusing a body, aiohttp keeps the connection a few seconds to drain it)."""
    with socket.create_connection(address, timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass  # the server may answer and close before it has read everything
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < content_length(reply):
            chunk = recv(s)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def content_length(reply: bytes) -> int:
    for line in reply.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 62  # no length: read to the end


def recv(s: socket.socket) -> bytes:
    try:
        return s.recv(65536)
    except (ConnectionResetError, BrokenPipeError):
        return b""


def post_bytes(body: bytes, headers: bytes = b"") -> bytes:
    return (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + headers + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def ok(address: tuple[str, int]) -> bool:
    status, body = raw_request(address, post_bytes(json.dumps({"prompt": CODE, "max_tokens": 2}).encode()))
    return status == 200 and json.loads(body)["object"] == "text_completion"


def test_malformed_bodies_are_400s_and_the_server_lives_on(endpoint) -> None:
    """Each broken body is a 400 with an OpenAI-shaped one-line error, then a valid request is served. Catches
    an unhandled exception (a 500 and a traceback; JSON nested 100 000 deep raised RecursionError) and a wrong
    field type reaching the engine."""
    bodies = [
        b"", b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000, b'{"prompt": "x"', b"null", b'"just a string"',
        b'{"prompt": NaN}', b'{"prompt": ["a", "b"]}', b'{"prompt": "x", "suffix": 3}',
        b'{"prompt": "x", "stop": [1, 2]}', json.dumps({"prompt": "x", "stop": ["s"] * 17}).encode(),
        b'{"prompt": "x", "max_tokens": "5"}', b'{"prompt": "x", "max_tokens": -1}',
        b'{"prompt": "x", "max_tokens": true}',
        b'{"prompt": "x", "stop_rules": {"blockEnd": "maybe"}}', b'{"prompt": "x", "n": 2}',
    ]
    for body in bodies:
        status, reply = raw_request(endpoint, post_bytes(body))
        error = json.loads(reply)["error"]
        assert status == 400 and error["message"] and "\n" not in error["message"], (body[:40], status, reply[:200])
        assert error["type"] == "invalid_request_error"
    assert ok(endpoint)


def test_a_huge_body_is_refused_with_413_before_it_is_read(endpoint) -> None:
    """A declared 1 GiB body is refused from its Content-Length at once (the 4 bytes sent are all there is), and
    a chunked body that grows past the limit is refused while read. Catches a server that waits for, or
    buffers, a body of any size."""
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1073741824\r\n\r\n{\"pr")
    started = time.monotonic()
    status, reply = raw_request(endpoint, head, timeout=5)
    assert status == 413 and json.loads(reply)["error"]["code"] == "too_large"
    assert time.monotonic() - started < 3
    chunk = b"x" * (1 << 20)
    chunks = openai_api.MAX_BODY_BYTES // len(chunk) + 2
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(chunks))
    status, reply = raw_request(endpoint, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                          b"\r\n" + chunked + b"0\r\n\r\n")
    assert status == 413 and json.loads(reply)["error"]["code"] == "too_large"
    assert ok(endpoint)


def test_many_connections_at_once_all_get_an_answer(endpoint) -> None:
    """200 clients post at once while 100 more hold idle connections: every post is answered, 200 or 429
    (`overloaded`: one client's queue is bounded), never a 5xx or a dropped connection, within the time bound;
    afterwards the server still serves. Catches a server that stops accepting, drops or errors under load."""
    host, port = endpoint
    idle = [socket.create_connection(endpoint, timeout=10) for _ in range(100)]

    async def run() -> list[int]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as http:
            async def one(k: int) -> int:
                body = {"prompt": CODE[: 20 + k % 50], "max_tokens": 2, "user": f"many-{k}"}
                async with http.post(f"http://{host}:{port}/v1/completions", json=body) as r:
                    await r.read()
                    return r.status

            return await asyncio.wait_for(asyncio.gather(*(one(k) for k in range(200))), 120)

    try:
        statuses = asyncio.run(run())
    finally:
        for s in idle:
            s.close()
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    assert statuses.count(200) >= 16, statuses.count(200)  # at least a full queue's worth got through
    assert ok(endpoint)


def test_a_wrong_token_is_401_and_compared_in_constant_time(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Off loopback: a token that is missing, wrong, of another length or not even UTF-8 is a 401 (never a 500),
    the right one is served, and every check went through hmac.compare_digest. Catches `==` on tokens (time
    leaks the matching prefix) and a header that crashes the check."""
    calls: list[tuple[bytes, bytes]] = []
    real = openai_api.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(openai_api.hmac, "compare_digest", spy)
    token = tmp_path / "token"
    token.write_text("the-right-token\n")
    token.chmod(0o600)
    with serve_in_thread(lambda: local_engine(model_dir), tmp_path, openai=("0.0.0.0", 0), token_file=token) as (
            _, url, _):
        address = ("127.0.0.1", int(url.rsplit(":", 1)[1].split("/")[0]))
        body = json.dumps({"prompt": CODE, "max_tokens": 2}).encode()
        wrong = (b"", b"Authorization: Bearer the-right-tokeN\r\n", b"Authorization: Bearer short\r\n",
                 b"Authorization: Bearer \xff\xfe\x80\r\n", b"Authorization: the-right-token-and-more\r\n")
        for header in wrong:
            status, reply = raw_request(address, post_bytes(body, header))
            assert status == 401 and json.loads(reply)["error"]["code"] == "unauthorized", (header, status, reply)
        status, _ = raw_request(address, post_bytes(body, b"Authorization: Bearer the-right-token\r\n"))
        assert status == 200
    assert len(calls) == len(wrong) + 1  # every check, the missing header's empty token included
    assert all(expected == b"the-right-token" for _, expected in calls)
    assert b"the-right-token" in [given for given, _ in calls]


def test_slow_clients_are_cut_off_and_others_are_served(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Slowloris: one client dribbles its headers, one its body, one connects and sends nothing. With the read
    deadline at 1 s, the server closes the header and idle ones and answers the body one 408 within a few
    seconds, while a normal request is served meanwhile. Catches aiohttp's default keep-alive (an hour) or a
    body read without a deadline letting a few clients hold connections (and tasks) forever."""
    monkeypatch.setattr(openai_api, "READ_TIMEOUT_S", 1.0)
    with serve_in_thread(lambda: local_engine(model_dir), tmp_path, openai=("127.0.0.1", 0),
                         token_file=tmp_path / "token") as (_, url, _):
        address = ("127.0.0.1", int(url.rsplit(":", 1)[1].split("/")[0]))
        headers, body, idle = (socket.create_connection(address, timeout=10) for _ in range(3))
        headers.sendall(b"POST /v1/completions HTTP/1.1\r\n")
        body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
        started = time.monotonic()
        closed: dict[str, float] = {}
        replies: dict[str, bytes] = {"headers": b"", "body": b"", "idle": b""}
        for s in (headers, body, idle):
            s.setblocking(False)
        while len(closed) < 3 and time.monotonic() - started < 8:
            for name, s in (("headers", headers), ("body", body), ("idle", idle)):
                if name in closed:
                    continue
                try:
                    if name == "headers":
                        s.send(b"X")  # a byte of a header every 0.1 s: never a whole request
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                replies[name] += data
                if not data:
                    closed[name] = time.monotonic() - started
            time.sleep(0.1)
        assert ok(address)  # served while the slow ones were held
        for s in (headers, body, idle):
            s.close()
    assert set(closed) == {"headers", "body", "idle"}, (closed, replies)
    assert max(closed.values()) < 5, closed
    assert replies["body"].startswith(b"HTTP/1.1 408"), replies["body"][:100]
