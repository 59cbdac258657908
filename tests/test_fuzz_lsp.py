"""Fuzzing `ahead lsp` over stdio with raw JSON-RPC: bad positions, odd text, bad JSON, unknown methods.

A real `ahead lsp` subprocess talks to a real `ahead engine` (tiny random model). The test frames the
messages itself, since pygls' client cannot send a malformed one. The promises: the server never exits;
every request gets exactly one answer (a result or a JSON-RPC error, never an internal error) with its
id; every body that is not JSON, or is JSON but not a message, gets one error with `"id": null`; and
after each batch a valid inlineCompletion is answered with the engine's completion.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from budget import fuzz_settings
from daemon_helpers import CODE, local_engine, save_tiny_model, start_engine, stop
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("pygls")

from lsp_helpers import BASE, expected  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARSE_ERROR, INVALID_REQUEST, INTERNAL_ERROR = -32700, -32600, -32603
SERVER_ERRORS = {-32700, -32600, -32601, -32602, -32800, -32802, -32803}  # JSON-RPC's and LSP's, less -32603


# -- a raw JSON-RPC client --------------------------------------------------------------------------
class RawLsp:
    """`ahead lsp` on pipes: frames written by hand, answers collected by a reader thread."""

    def __init__(self, options: dict, env: dict, log_file: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "lsp", "--log-file", str(log_file)],
                                     cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(log_file.with_suffix(".stderr"), "wb"))
        self.ids = itertools.count(1)
        self.answers: dict[str, list[dict]] = {}  # json.dumps(id) -> its answers
        self.nameless: list[dict] = []  # errors with "id": null
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.call("initialize", {"processId": None, "rootUri": None, "capabilities": {},
                                 "initializationOptions": options})
        self.notify("initialized", {})

    def send(self, body: bytes) -> None:
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.proc.stdin.flush()

    def message(self, message: dict) -> None:
        self.send(json.dumps(message).encode())

    def request(self, method: str, params: Any) -> int:
        msg_id = next(self.ids)
        self.message({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
        return msg_id

    def notify(self, method: str, params: Any) -> None:
        self.message({"jsonrpc": "2.0", "method": method, "params": params})

    def wait(self, msg_id: Any, timeout: float = 60) -> dict:
        key = json.dumps(msg_id)
        with self.changed:
            if not self.changed.wait_for(lambda: key in self.answers or self.proc.poll() is not None, timeout):
                raise AssertionError(f"no answer to request {msg_id} in {timeout} s")
        assert self.proc.poll() is None, f"the server exited with {self.proc.returncode}"
        return self.answers[key][0]

    def wait_nameless(self, start: int, count: int, timeout: float = 30) -> list[dict]:
        """The errors with `"id": null` from the `start`-th on, once there are `count` of them."""
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.nameless) >= start + count, timeout), self.nameless
            return self.nameless[start:]

    def call(self, method: str, params: Any, timeout: float = 60) -> Any:
        answer = self.wait(self.request(method, params), timeout)
        assert "result" in answer, answer
        return answer["result"]

    def _read(self) -> None:
        out = self.proc.stdout
        while True:
            length = None
            while (line := out.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if not line or length is None:
                break
            message = json.loads(out.read(length))
            if "method" in message:  # a server request or notification (showMessage, progress)
                if "id" in message:
                    self.message({"jsonrpc": "2.0", "id": message["id"], "result": None})
                continue
            with self.changed:
                if message.get("id") is None:
                    self.nameless.append(message)
                else:
                    self.answers.setdefault(json.dumps(message["id"]), []).append(message)
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("shutdown", None, 30)
                self.notify("exit", None)
                self.proc.wait(30)
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()


# -- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_config, tiny_model, tiny_tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), tiny_config, tiny_model, tiny_tokenizer)


@pytest.fixture(scope="module")
def local(model_dir: Path):
    return local_engine(model_dir)


@pytest.fixture(scope="module")
def lsp(model_dir: Path, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    engine = start_engine(model_dir, run / "e.sock")
    threading.Thread(target=engine.stderr.read, daemon=True).start()  # keep its stderr pipe from filling
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AHEAD_HOME": str(run / "home")}
    server = RawLsp({**BASE, "model": str(model_dir), "engine": {"socket": str(run / "e.sock")}}, env,
                    run / "lsp.log")
    deadline = time.monotonic() + 30
    while server.call("ahead/status", {})["backend"]["state"] != "connected":
        assert time.monotonic() < deadline, "the server never connected to the engine"
        time.sleep(0.1)
    yield server
    server.close()
    stop(engine)


# -- strategies ------------------------------------------------------------------------------------------
URIS = ["file:///fuzz/a.py", "file:///fuzz/b%20c.py", "untitled:Untitled-1", "file:///never/opened.py", "", "x"]
uris = st.sampled_from(URIS) | st.text(max_size=20)
PIECES = ["a", " ", "\t", "\u00e9", "\u4e2d", "\U0001f600", "\ud800", "\udfff", "\n", "\r\n", "\r", "\f", "\u2028",
          "\x00", "def f(x):\n    return x\n", "<|endoftext|>", "<|fim_middle|>"]
texts = (st.lists(st.sampled_from(PIECES), max_size=40).map("".join) | st.text(max_size=60)
         | st.sampled_from(["", CODE, CODE.replace("\n", "\r\n"), "x" * 300_000, "\U0001f600" * 20_000]))
numbers = (st.integers(0, 12) | st.integers(0, 2**31 - 1) | st.integers(-(2**31), -1) | st.sampled_from([2**53, 1.5])
           | st.none())
positions = st.fixed_dictionaries({"line": numbers, "character": numbers}) | st.just({})
ranges = st.fixed_dictionaries({"start": positions, "end": positions})
json_values = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False)
                           | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=4), max_leaves=16)


def document(uri: Any) -> dict:
    return {"uri": uri}


def lsp_messages() -> st.SearchStrategy[tuple[str, dict]]:
    """(kind, message): well-formed LSP methods with fuzzed values, unknown methods, cancels."""
    did_open = st.builds(lambda u, t, v: ("notify", {"method": "textDocument/didOpen", "params": {
        "textDocument": {"uri": u, "languageId": "python", "version": v, "text": t}}}), uris, texts, numbers)
    change = st.fixed_dictionaries({"text": texts}, optional={"range": ranges, "rangeLength": numbers})
    did_change = st.builds(lambda u, v, c: ("notify", {"method": "textDocument/didChange", "params": {
        "textDocument": {"uri": u, "version": v}, "contentChanges": c}}), uris, numbers, st.lists(change, max_size=3))
    did_close = st.builds(lambda u: ("notify", {"method": "textDocument/didClose",
                                                "params": {"textDocument": {"uri": u}}}), uris)
    inline = st.builds(lambda u, p, k: ("request", {"method": "textDocument/inlineCompletion", "params": {
        "textDocument": document(u), "position": p, "context": {"triggerKind": k}}}),
        uris, positions, st.sampled_from([1, 2, 0, 7]))
    completion = st.builds(lambda u, p: ("request", {"method": "textDocument/completion", "params": {
        "textDocument": document(u), "position": p}}), uris, positions)
    status = st.just(("request", {"method": "ahead/status", "params": {}}))
    unknown = st.builds(lambda m, p, kind: (kind, {"method": m, "params": p}),
                        st.text(max_size=20).filter(lambda m: m not in ("shutdown", "exit", "initialize")),
                        json_values, st.sampled_from(["request", "notify"]))
    cancel = st.builds(lambda i: ("notify", {"method": "$/cancelRequest", "params": {"id": i}}), json_values)
    params = st.builds(lambda m, p: ("request", {"method": m, "params": p}),
                       st.sampled_from(["textDocument/inlineCompletion", "textDocument/completion", "ahead/status"]),
                       json_values)
    return st.one_of(did_open, did_change, did_close, inline, completion, status, unknown, cancel, params)


def not_a_message(value: Any) -> bool:
    return not (isinstance(value, dict) and ("id" in value or "method" in value))


bodies = st.one_of(
    st.tuples(st.just("unparsable"), st.binary(min_size=1, max_size=40).filter(lambda b: not parses(b))),
    st.tuples(st.just("unparsable"), st.sampled_from([b"{", b'{"jsonrpc": "2.0", "id": 1', b"\xff\xfe", b"nul"])),
    st.tuples(st.just("invalid"), json_values.filter(not_a_message).map(lambda v: json.dumps(v).encode())),
)


def parses(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


# -- the tests -------------------------------------------------------------------------------------------
def still_completes(lsp: RawLsp, local, n: int) -> None:
    """A valid document and inlineCompletion get the engine's text: the server still serves."""
    uri, text = f"file:///fuzz/check-{n}.py", CODE + f"def check_{n}(x):\n    "
    lsp.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1,
                                                         "text": text}})
    lines = text.split("\n")
    result = lsp.call("textDocument/inlineCompletion", {
        "textDocument": {"uri": uri}, "position": {"line": len(lines) - 1, "character": len(lines[-1])},
        "context": {"triggerKind": 2}})
    want = expected(local, text, "")
    assert [item["insertText"] for item in result["items"]] == ([want] if want else [])
    lsp.notify("textDocument/didClose", {"textDocument": {"uri": uri}})


checks = itertools.count()


@given(batch=st.lists(lsp_messages() | bodies, min_size=1, max_size=8))
@fuzz_settings(ci=100, long=3000)
def test_every_request_is_answered_and_the_server_keeps_serving(lsp: RawLsp, local, batch: list) -> None:
    """Catches: a request never answered (malformed params, an unknown method), a handler that crashes on
    an out-of-range or mid-surrogate position, odd text or an unknown or closed document (an internal
    error), a bad body that is dropped silently or stops the read loop, and damage that breaks the next
    valid completion."""
    ids, nameless = [], len(lsp.nameless)
    expected_nameless = 0
    for kind, message in batch:
        if kind == "request":
            ids.append(lsp.request(message["method"], message["params"]))
        elif kind == "notify":
            lsp.notify(message["method"], message["params"])
        else:
            lsp.send(message)
            expected_nameless += 1
    ids.append(lsp.request("ahead/status", {}))
    for msg_id in ids:
        answer = lsp.wait(msg_id)
        assert len(lsp.answers[json.dumps(msg_id)]) == 1, lsp.answers[json.dumps(msg_id)]
        if "error" in answer:
            assert answer["error"]["code"] in SERVER_ERRORS and answer["error"]["message"], answer
        else:
            assert "result" in answer, answer
    errors = lsp.nameless[nameless:]
    assert len(errors) == expected_nameless, errors
    assert all(e["error"]["code"] in (PARSE_ERROR, INVALID_REQUEST) for e in errors), errors
    still_completes(lsp, local, next(checks))


def test_malformed_messages_get_the_json_rpc_error_for_them(lsp: RawLsp, local) -> None:
    """Catches each kind of bad message answered wrongly: a parse error (-32700, id null), a value that is
    not a message (-32600, id null), a request in another JSON-RPC version (-32600, its id), params of the
    wrong type (-32602, its id), an unknown method (-32601, its id)."""
    before = len(lsp.nameless)
    lsp.send(b"{not json")
    lsp.send(b"[1, 2]")
    lsp.message({"jsonrpc": "1.0", "id": "old", "method": "ahead/status"})
    lsp.message({"jsonrpc": "2.0", "id": "typed", "method": "textDocument/inlineCompletion",
                 "params": {"textDocument": {"uri": 5}, "position": {"line": -1, "character": "x"}}})
    lsp.message({"jsonrpc": "2.0", "id": "nobody", "method": "ahead/fly", "params": {}})
    assert [e["error"]["code"] for e in lsp.wait_nameless(before, 2)] == [PARSE_ERROR, INVALID_REQUEST]
    assert lsp.wait("old")["error"]["code"] == INVALID_REQUEST
    assert lsp.wait("typed")["error"]["code"] == -32602
    assert lsp.wait("nobody")["error"]["code"] == -32601
    still_completes(lsp, local, next(checks))


def test_out_of_range_positions_clamp_like_the_spec_says(lsp: RawLsp, local) -> None:
    """Catches a cursor past the end of a line or of the document completing somewhere else than at the
    line's (the document's) end, which is where LSP says such a position lands."""
    uri, text = "file:///fuzz/clamp.py", CODE + "def clamp(x):\n    y = x"
    lsp.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1,
                                                         "text": text}})
    last = len(text.split("\n")) - 1

    def at(line: int, character: int) -> list[str]:
        result = lsp.call("textDocument/inlineCompletion", {"textDocument": {"uri": uri}, "position": {
            "line": line, "character": character}, "context": {"triggerKind": 1}})
        return [item["insertText"] for item in result["items"]]

    want = expected(local, text, "")
    assert at(last, len("    y = x")) == ([want] if want else [])
    assert at(last, 10_000) == ([want] if want else [])  # past the last line's end: its end
    assert at(last + 50, 3) == ([want] if want else [])  # past the last line: the document's end
    line = 1  # "    if n < 2:": past its end is its end, before the line break
    cursor = len("def fibonacci(n):\n    if n < 2:")
    mid = expected(local, text[:cursor], text[cursor:])
    assert at(line, 500) == ([mid] if mid else [])
