"""RemoteBackend against a real `ahead engine --openai` (tiny model) and against a fake vLLM-like server.

Catches: remote text that differs from the engine's for the same request; streamed text that is not
a growing prefix of the answer; stop rules not applied when the server ignores them (or applied
differently from the engine); a stream read to the end after a rule fired; a cancelled request that
keeps the server busy; a wrong key, a refused connection or a silent server that hangs or gives an
unclear error; the wrong prompt layout for servers without `suffix`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import pytest
from aiohttp import web
from conftest import complete
from daemon_helpers import CODE, local_engine, save_tiny_model, stop
from daemon_helpers import serve_openai as serve_helper

from engine.stops import StopRules
from lsp_server.remote import RemoteBackend, RemoteError, qwen_prompt

LONG = 3900  # tokens: with --max-seq-len 4096 the tiny model takes ~2 s, long enough to see a cancel


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_config, tiny_model, tiny_tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), tiny_config, tiny_model, tiny_tokenizer)


def serve_openai(model_dir: Path, run: Path, host: str, *extra: str):
    return serve_helper(model_dir, run, host, "--max-seq-len", "4096", *extra)


@pytest.fixture(scope="module")
def url(model_dir: Path, tmp_path_factory):
    proc, address = serve_openai(model_dir, tmp_path_factory.mktemp("openai"), "127.0.0.1")
    yield address
    stop(proc)


@pytest.fixture(scope="module")
def local(model_dir: Path):
    return local_engine(model_dir)


def remote(url: str, params: dict, on_text=None, **options) -> dict:
    async def run() -> dict:
        backend = RemoteBackend(url, **options)
        try:
            return await backend.complete(params, on_text)
        finally:
            await backend.aclose()

    return asyncio.run(run())


def engine_answer(local, prefix: str, suffix: str, rules: StopRules, max_tokens: int):
    return complete(local, prefix, suffix, type_through=False, reuse_kv=False, stop=rules, max_tokens=max_tokens)


def as_param(rules: StopRules) -> dict | str:
    if not rules.any:
        return "raw"
    return {"block_end": rules.block_end, "suffix_overlap": rules.suffix_overlap, "line_end": rules.line_end,
            "max_lines": rules.max_lines}


CASES = [(CODE[:n], suffix, rules) for n in (2, 12, 25, 60, 87) for suffix in ("", "rest")
         for rules in (StopRules(), StopRules(max_lines=1), StopRules.raw())]


def case(prefix: str, suffix: str) -> tuple[str, str]:
    return prefix, CODE[len(prefix):] if suffix == "rest" else suffix


# -- against ahead's own endpoint ---------------------------------------------------------------
def test_completion_equals_the_engine(url: str, local) -> None:
    for n, suffix, rules in [(60, "rest", StopRules()), (25, "", StopRules()), (len(CODE), "", StopRules.raw())]:
        prefix, suffix = case(CODE[:n], suffix)
        got = remote(url, {"prefix": prefix, "suffix": suffix, "max_tokens": 24, "stop": as_param(rules),
                           "document": f"eq-{n}"})
        want = engine_answer(local, prefix, suffix, rules, 24)
        assert got["text"] == want.text, (n, rules)
        assert got["stop_reason"] in ("stop", "length", want.stop_reason)
        assert got["tokens"] > 0 and got["time_ms"] > 0


def test_streamed_text_grows_to_the_answer(url: str) -> None:
    for prefix, rules in ((CODE, StopRules.raw()), (CODE[:22], StopRules())):  # the latter: whole lines only
        seen: list[str] = []
        got = remote(url, {"prefix": prefix, "max_tokens": 64, "stop": as_param(rules)}, seen.append)
        assert seen, "nothing was streamed"
        for earlier, later in zip(seen, [*seen[1:], got["text"]], strict=True):
            assert later.startswith(earlier) and len(later) >= len(earlier)


def test_the_client_cuts_like_the_engine_when_the_server_does_not(url: str, local) -> None:
    """stop_rules false: the server decodes raw; this client's Stopper must give the engine's text and reason."""
    cut = 0
    for prefix, suffix, rules in CASES:
        prefix, suffix = case(prefix, suffix)
        raw = engine_answer(local, prefix, suffix, StopRules.raw(), 128).text
        want = engine_answer(local, prefix, suffix, rules, 128)
        got = remote(url, {"prefix": prefix, "suffix": suffix, "max_tokens": 128, "stop": as_param(rules)},
                     server_stop_rules=False)
        assert got["text"] == want.text, (prefix, suffix, rules)
        if want.text != raw.rstrip():
            cut += 1
            assert got["stop_reason"] == want.stop_reason
            assert got["received_chars"] < len(raw), "the stream was read past the cut"
    assert cut >= 3, "too few cases where a rule fires: the test proves nothing"


def test_cancelling_the_task_stops_the_servers_job(url: str) -> None:
    """One job at a time on the server: if the cancelled one went on, the next request would wait ~2 s for it."""

    async def run() -> tuple[float, float]:
        backend = RemoteBackend(url)
        params = {"prefix": CODE, "max_tokens": LONG, "stop": "raw", "document": "long"}
        try:
            started = time.perf_counter()
            await backend.complete(params)
            whole = time.perf_counter() - started
            first = asyncio.Event()
            task = asyncio.create_task(backend.complete(params, lambda _: first.set()))
            await asyncio.wait_for(first.wait(), 30)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            started = time.perf_counter()
            await backend.complete({"prefix": "def f():", "max_tokens": 2, "document": "short"})
            return whole, time.perf_counter() - started
        finally:
            await backend.aclose()

    whole, after = asyncio.run(run())
    assert whole > 0.5, "the long request is too quick to tell a cancel from none"
    assert after < whole / 3, f"the next request took {after:.2f} s: the cancelled job kept running"


def test_a_newer_request_for_the_document_replaces_the_older(url: str) -> None:
    async def run() -> tuple[BaseException | dict, dict]:
        backend = RemoteBackend(url)
        try:
            first = asyncio.Event()
            older = asyncio.create_task(backend.complete(
                {"prefix": CODE, "max_tokens": LONG, "stop": "raw", "document": "doc"}, lambda _: first.set()))
            await asyncio.wait_for(first.wait(), 30)
            newer = await backend.complete({"prefix": CODE[:60], "max_tokens": 4, "document": "doc"})
            return (await asyncio.gather(older, return_exceptions=True))[0], newer
        finally:
            await backend.aclose()

    older, newer = asyncio.run(run())
    assert isinstance(older, RemoteError) and older.code == "cancelled"
    assert isinstance(newer, dict) and "text" in newer


def test_a_wrong_key_is_refused_clearly(model_dir: Path, tmp_path: Path, local) -> None:
    """Bound to all interfaces with a token (reached over loopback only)."""
    token = tmp_path / "token"
    token.write_text("the-token\n")
    token.chmod(0o600)
    proc, address = serve_openai(model_dir, tmp_path, "0.0.0.0", "--token-file", str(token))
    try:
        for key in (None, "the-tokeN"):
            with pytest.raises(RemoteError) as refused:
                remote(address, {"prefix": CODE, "max_tokens": 4}, api_key=key)
            assert refused.value.code == "unauthorized" and "401" in str(refused.value)
        got = remote(address, {"prefix": CODE, "max_tokens": 8, "stop": "raw"}, api_key="the-token")
        assert got["text"] == engine_answer(local, CODE, "", StopRules.raw(), 8).text
    finally:
        stop(proc)


def test_a_refused_connection_is_a_clear_error_at_once() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    started = time.perf_counter()
    with pytest.raises(RemoteError) as failed:
        remote(f"http://127.0.0.1:{port}/v1", {"prefix": "x"}, timeout_s=30)
    assert time.perf_counter() - started < 3
    assert failed.value.code == "unreachable" and f"127.0.0.1:{port}" in str(failed.value)


# -- against a fake vLLM-like server ------------------------------------------------------------
class Fake:
    """Serves /v1/models and a scripted /v1/completions; records what it was sent and whether the client left."""

    def __init__(self, chunks: list[str], owned_by: str = "vllm", status: int = 200, delay: float = 0.0,
                 refuse_suffix: bool = False):
        self.chunks, self.owned_by, self.status, self.delay = chunks, owned_by, status, delay
        self.refuse_suffix = refuse_suffix
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.client_left = asyncio.Event()

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "qwen-coder", "owned_by": self.owned_by}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        if self.refuse_suffix and body.get("suffix"):
            return web.json_response({"error": {"message": "suffix is not currently supported"}}, status=400)
        if self.status != 200:
            return web.json_response({"error": {"message": "the GPU caught fire"}}, status=self.status)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for chunk in self.chunks:
                if chunk == "SILENCE":
                    await asyncio.sleep(60)
                event = {"error": {"message": "boom", "code": "internal"}} if chunk == "ERROR" else \
                    {"choices": [{"text": chunk, "index": 0, "finish_reason": None}]}
                await response.write(f"data: {json.dumps(event)}\n\n".encode())
                await asyncio.sleep(self.delay)
                if request.transport is None or request.transport.is_closing():
                    self.client_left.set()
                    return response
            await response.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.client_left.set()
            raise
        return response

    async def __aenter__(self) -> str:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        return f"http://{host}:{port}/v1"

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


BODY = ["x = 1\n", "    ", "return", " x\n", "\n", "def other():\n", "    pass\n", "\n", "def more():\n", "    pass\n"]


def test_other_servers_get_qwens_layout_and_ahead_cuts_the_stream() -> None:
    fake = Fake(BODY * 3, delay=0.05)
    context = [{"path": "util.py", "text": "def add(a, b):\n    return a + b\n"}]
    params = {"prefix": "def f():\n    ", "suffix": "\n", "context": context, "path": "main.py", "max_tokens": 64,
              "document": "main.py"}

    async def run() -> dict:
        async with fake as address:
            backend = RemoteBackend(address, api_key="k", timeout_s=5)
            try:
                got = await backend.complete(params)
                await asyncio.wait_for(fake.client_left.wait(), 5)
                return got
            finally:
                await backend.aclose()

    got = asyncio.run(run())
    body = fake.bodies[0]
    assert body["prompt"] == ("<|file_sep|>util.py\ndef add(a, b):\n    return a + b\n\n<|file_sep|>main.py\n"
                              "<|fim_prefix|>def f():\n    <|fim_suffix|>\n<|fim_middle|>")
    assert body["prompt"] == qwen_prompt(params["prefix"], "\n", (("util.py", context[0]["text"]),), "main.py")
    assert "suffix" not in body and "stop_rules" not in body and "document" not in body
    assert body["model"] == "qwen-coder" and body["stream"] is True and "<|file_sep|>" in body["stop"]
    assert fake.headers[0]["Authorization"] == "Bearer k"
    assert got["text"] == "x = 1\n    return x" and got["stop_reason"] == "block-end"
    assert got["received_chars"] < len("".join(BODY)), "the stream was read past the cut"


def test_without_qwen_layout_the_prompt_is_the_prefix_and_context_is_dropped() -> None:
    fake = Fake(["a", "b"])

    async def run() -> dict:
        async with fake as address:
            backend = RemoteBackend(address, model="m", qwen_layout=False)
            try:
                return await backend.complete({"prefix": "p", "suffix": "s", "stop": "raw",
                                               "context": [{"path": "o.py", "text": "t"}]})
            finally:
                await backend.aclose()

    got = asyncio.run(run())
    assert fake.bodies[0]["prompt"] == "p" and fake.bodies[0]["suffix"] == "s" and fake.bodies[0]["model"] == "m"
    assert "Authorization" not in fake.headers[0]
    assert got["text"] == "ab" and got["stop_reason"] == "stop"


def test_a_server_refusing_suffix_is_asked_again_without_it() -> None:
    fake = Fake(["a"], refuse_suffix=True)

    async def run() -> list[dict]:
        async with fake as address:
            backend = RemoteBackend(address, qwen_layout=False)
            try:
                return [await backend.complete({"prefix": "p", "suffix": "s", "stop": "raw"}) for _ in range(2)]
            finally:
                await backend.aclose()

    answers = asyncio.run(run())
    assert [a["text"] for a in answers] == ["a", "a"]
    assert ["suffix" in b for b in fake.bodies] == [True, False, False]


def test_only_text_no_rule_can_take_back_is_streamed() -> None:
    """`    return total` repeats the code after the cursor only once its line ends: it must not be shown before."""
    fake = Fake(["total += 1\n", "    return total", "\n", "x"])
    seen: list[str] = []

    async def run() -> dict:
        async with fake as address:
            backend = RemoteBackend(address)
            try:
                return await backend.complete({"prefix": "def f(total):\n    ", "suffix": "\n    return total\n"},
                                              seen.append)
            finally:
                await backend.aclose()

    got = asyncio.run(run())
    assert got["text"] == "total += 1" and got["stop_reason"] == "suffix-overlap"
    assert seen == ["total += 1"]


def test_control_tokens_in_the_text_end_the_completion() -> None:
    fake = Fake(["abc", "<|file_", "sep|>junk", "more"])

    async def run() -> dict:
        async with fake as address:
            backend = RemoteBackend(address)
            try:
                return await backend.complete({"prefix": "x = ", "stop": "raw"})
            finally:
                await backend.aclose()

    got = asyncio.run(run())
    assert got["text"] == "abc" and got["stop_reason"] == "stop"


@pytest.mark.parametrize(("fake", "code"), [
    (lambda: Fake(["a"], status=500), "server_error"),
    (lambda: Fake(["a"], status=429), "overloaded"),
    (lambda: Fake(["a", "ERROR"]), "server_error"),
    (lambda: Fake(["a", "SILENCE"]), "timeout"),
])
def test_server_failures_are_clear_errors_in_time(fake, code: str) -> None:
    server = fake()

    async def run() -> None:
        async with server as address:
            backend = RemoteBackend(address, timeout_s=0.5)
            try:
                await backend.complete({"prefix": "x", "stop": "raw"})
            finally:
                await backend.aclose()

    started = time.perf_counter()
    with pytest.raises(RemoteError) as failed:
        asyncio.run(run())
    assert failed.value.code == code and str(failed.value)
    assert time.perf_counter() - started < 5
