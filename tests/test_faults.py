"""Faults the daemon and the language server must survive: a killed engine, broken model files, a device
out of memory, a disk that is full under the logs and the tuned configs.

Real parts throughout: `ahead engine` and `ahead lsp` subprocesses, or the daemon's own `serve()` on a
thread where a fault has to be injected into the model (an OutOfMemoryError from its forward on a CPU).
The engine killed mid-request through the language server is tests/test_lsp.py's
test_engine_killed_gives_no_items_then_a_new_engine; here it is the client library every caller uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from daemon_helpers import CODE, local_engine, local_text, save_tiny_model, serve_in_thread, start_engine, stop
from test_warm_start import tiny_gguf  # noqa: F401  (a fixture: a tiny Llama written as llama.cpp would)

from engine.client import AsyncEngineClient, EngineClient, EngineError
from engine.errors import AheadError
from engine.loading import load_checkpoint

pytest.importorskip("pygls")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_config, tiny_model, tiny_tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), tiny_config, tiny_model, tiny_tokenizer)


@pytest.fixture(scope="module")
def local(model_dir: Path):
    return local_engine(model_dir)


def engine_command(model: Path, sock: Path) -> list[str]:
    return [sys.executable, "-m", "engine.cli", "engine", "--model", str(model), "--device", "cpu",
            "--max-seq-len", "512", "--socket", str(sock)]


def wait_for_socket(sock: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """For an engine whose log cannot be read: ready once it answers on its socket."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the engine exited with status {proc.returncode}"
        with contextlib.suppress(OSError, EngineError), EngineClient(sock, timeout=5):
            return
        time.sleep(0.2)
    raise AssertionError("the engine never answered on its socket")


# -- the engine killed mid-request ----------------------------------------------------------------------
def test_engine_killed_mid_request_fails_every_call_at_once(model_dir: Path, tmp_path: Path) -> None:
    """kill -9 while a long completion streams: the asyncio client's call and the blocking client's call both
    end at once with the `closed` error, and a new connection is refused, not left waiting. Catches clients
    that wait forever on a dead socket (the editor's request would hang)."""
    sock = tmp_path / "k.sock"
    proc = start_engine(model_dir, sock, "--max-seq-len", "4096")
    blocking = EngineClient(sock, timeout=30)

    async def run() -> tuple[BaseException | None, float]:
        client = await AsyncEngineClient.connect(sock)
        first = asyncio.Event()
        task = asyncio.create_task(client.complete(on_text=lambda _: first.set(), prefix=CODE, max_tokens=3000,
                                                   stop="raw", document="killed", decoding="ar"))
        other = asyncio.create_task(asyncio.to_thread(blocking.complete, prefix=CODE, max_tokens=3000,
                                                      stop="raw", document="killed-too", decoding="ar"))
        await asyncio.wait_for(first.wait(), 60)
        proc.kill()
        killed = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(task, other, return_exceptions=True), 10)
        await client.close()
        assert all(isinstance(r, EngineError) and r.code == "closed" for r in results), results
        return None, time.monotonic() - killed

    try:
        _, waited = asyncio.run(run())
        assert waited < 5
        with pytest.raises(OSError):  # nobody listens: refused at once (the test's timeout would catch a hang)
            EngineClient(sock, timeout=5)
    finally:
        blocking.close()
        stop(proc)


# -- broken model files ------------------------------------------------------------------------------
def load_message(spec: Path) -> str:
    with pytest.raises(AheadError) as raised:
        load_checkpoint(str(spec), log=lambda _: None)
    return str(raised.value)


def test_truncated_or_garbled_model_files_are_one_clear_error(model_dir: Path, tiny_gguf, tmp_path: Path,  # noqa: F811
                                                               monkeypatch) -> None:
    """A GGUF cut anywhere (header, metadata, tensor data) or with garbage over its header, and a safetensors
    shard whose header is garbage: AheadError with one line naming the file. Catches a raw struct, numpy,
    safetensors or transformers exception escaping the loader (a traceback instead of a message) and a
    damaged file that loads anyway."""
    import shutil

    monkeypatch.setenv("AHEAD_HOME", str(tmp_path / "home"))
    _, path = tiny_gguf
    data = path.read_bytes()
    broken = {f"cut-{frac}": data[: int(len(data) * frac)] for frac in (0.0002, 0.05, 0.5, 0.999)}
    for offset in (8, 1000):
        garbled = bytearray(data)
        garbled[offset : offset + 4] = b"\xff\xff\xff\x7f"
        broken[f"garbled-{offset}"] = bytes(garbled)
    for name, content in broken.items():
        bad = tmp_path / f"{name}.gguf"
        bad.write_bytes(content)
        message = load_message(bad)
        assert "\n" not in message and str(bad) in message, (name, message)
    shards = tmp_path / "garbled-header"
    shutil.copytree(model_dir, shards)
    weights = shards / "model.safetensors"
    weights.write_bytes(b"\x40" + b"\0" * 7 + b"{not json" + b"\xff" * 55 + weights.read_bytes()[72:])
    message = load_message(shards)
    assert "\n" not in message and "corrupt or truncated" in message and str(weights) in message


def test_a_truncated_model_stops_the_engine_with_one_line(model_dir: Path, tmp_path: Path) -> None:
    """`ahead engine` on a safetensors shard cut short (an interrupted download): exit status 2, stderr ends in
    one `ahead: error:` line naming the shard, no traceback, no socket left. Catches a load error that escapes
    as an exception (a traceback, status 1) or a daemon that half-starts on a broken model."""
    import shutil

    cut = tmp_path / "cut-model"
    shutil.copytree(model_dir, cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AHEAD_HOME": str(tmp_path / "home")}
    done = subprocess.run(engine_command(cut, tmp_path / "cut.sock"), capture_output=True, text=True, env=env,
                          timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert lines[-1].startswith("ahead: error: ") and str(weights) in lines[-1], done.stderr
    assert all(line.startswith("ahead: ") for line in lines), done.stderr  # its progress lines, then the error
    assert not (tmp_path / "cut.sock").exists()


# -- out of device memory ---------------------------------------------------------------------------
def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_out_of_memory_is_an_error_reply_and_the_daemon_keeps_serving(model_dir: Path, local, tmp_path: Path
                                                                      ) -> None:
    """The model's forward raises torch.OutOfMemoryError (as CUDA does) in a prefill, then in a decode step:
    each request gets an `out_of_memory` error reply (HTTP 503 on the OpenAI endpoint) with a one-line
    message, and the same document's next request is answered exactly as a fresh engine answers it. Catches
    an OOM that kills the worker or the connection, comes back as `internal` with a traceback, or leaves the
    document's KV cache claiming tokens the failed request never wrote."""
    fault = {"in": None}  # forward calls to go before the injected OutOfMemoryError

    def build():
        engine = local_engine(model_dir)
        forward = engine.model.forward

        def forward_or_oom(*args, **kwargs):
            if fault["in"] is not None:
                fault["in"] -= 1
                if fault["in"] <= 0:
                    fault["in"] = None
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
            return forward(*args, **kwargs)

        engine.model.forward = forward_or_oom
        return engine

    params = dict(prefix=CODE, suffix="\n", document="oom", max_tokens=12, stop="raw", decoding="ar")
    with serve_in_thread(build, tmp_path, openai=("127.0.0.1", 0), token_file=tmp_path / "token") as (sock, url,
                                                                                                        log):
        with EngineClient(sock, timeout=60) as client:
            for calls in (1, 4):  # the prefill's first forward; the third decode step
                fault["in"] = calls
                with pytest.raises(EngineError) as raised:
                    client.complete(**params)
                assert raised.value.code == "out_of_memory" and "\n" not in str(raised.value)
                assert fault["in"] is None, "the fault was never reached"
            assert client.complete(**params)["text"] == local_text(local, CODE, "\n", max_tokens=12, decoding="ar")
            fault["in"] = 2
            status, body = post(url, {"prompt": CODE, "max_tokens": 4, "user": "oom-http"})
            assert status == 503 and body["error"]["code"] == "out_of_memory"
            assert post(url, {"prompt": CODE, "max_tokens": 4, "user": "oom-http"})[0] == 200
            assert client.status()["queue"] == 0
    assert not any("Traceback" in line for line in log), log


# -- a full disk -------------------------------------------------------------------------------------
def test_engine_keeps_serving_when_its_log_cannot_be_written(model_dir: Path, local, tmp_path: Path) -> None:
    """The engine's stderr (its log file when an editor starts it) is /dev/full: every write fails with ENOSPC.
    It still starts, answers exactly, and exits cleanly on SIGTERM. Catches print() to a full log raising out
    of loading or serving (the engine then died before it was ready, status 1)."""
    sock = tmp_path / "full.sock"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AHEAD_HOME": str(tmp_path / "home")}
    with open("/dev/full", "w") as full:
        proc = subprocess.Popen(engine_command(model_dir, sock), stdout=subprocess.DEVNULL, stderr=full, env=env)
    try:
        wait_for_socket(sock, proc)
        with EngineClient(sock, timeout=60) as client:
            got = client.complete(prefix=CODE, max_tokens=8, stop="raw", decoding="ar", document="full")
            with pytest.raises(EngineError):
                client.complete(prefix="x", max_tokens=-1)  # an error reply: the daemon logs nothing, lives on
            assert got["text"] == local_text(local, CODE, max_tokens=8, decoding="ar")
            assert client.status()["requests"] >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        stop(proc)


def test_lsp_keeps_working_when_its_log_file_is_full_and_says_so_once(model_dir: Path, local, tmp_path: Path
                                                                      ) -> None:
    """`ahead lsp --log-file /dev/full`: completions still come, and its stderr carries one line saying the log
    cannot be written, not a traceback per record. Catches logging's default handler, whose per-record
    tracebacks fill a stderr pipe nobody reads until the server blocks, and a log failure that stops the server."""
    from lsp_helpers import BASE, Session, expected, item_text

    sock = tmp_path / "lsp.sock"
    proc = start_engine(model_dir, sock)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AHEAD_HOME": str(tmp_path / "home")}
    session = Session({**BASE, "model": str(model_dir), "engine": {"socket": str(sock)}}, env, Path("/dev/full"))
    try:
        uri = "file:///work/full-log.py"
        text = CODE + "def main():\n    "
        session.open(uri, text)
        got = session.wait_for(lambda: item_text(session.inline(uri, len(text))), 30, 0.25)
        assert got == expected(local, text, "")
        session.configure({"bogusKey": 1})  # one more record (a warning) the log cannot take
        session.wait_for(lambda: any("bogusKey" in m.message for m in session.messages), 10)
        assert item_text(session.inline(uri, len(text))) == got

        async def stderr_after_exit() -> str:
            await asyncio.wait_for(session.client.shutdown_async(None), 30)
            session.client.exit(None)
            out = await asyncio.wait_for(session.client._server.stderr.read(), 30)
            await asyncio.wait_for(session.client.stop(), 30)
            return out.decode()

        err = session.call(stderr_after_exit(), 90)
    finally:
        session.loop.call_soon_threadsafe(session.loop.stop)
        session.thread.join(10)
        stop(proc)
    said = [line for line in err.splitlines() if "cannot write the log file /dev/full" in line]
    assert len(said) == 1 and "No space left on device" in said[0], err
    assert "Traceback" not in err and "Logging error" not in err, err


@pytest.fixture
def full_disk(tmp_path: Path) -> Path:
    """A 64 KiB tmpfs filled to the last block: writes there fail with ENOSPC, as on a full disk."""
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,nr_inodes=64", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> None:
    with open(directory / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    with pytest.raises(OSError) as raised:
        (directory / "probe").write_bytes(b"\0" * 8192)
    assert raised.value.errno == errno.ENOSPC


def test_tuned_config_on_a_full_disk_is_one_error_and_keeps_the_old_one(tiny_engine, full_disk: Path,
                                                                         monkeypatch) -> None:
    """`ahead tune` storing its result on a full disk: one-line AheadError naming the disk's complaint; the
    configs stored before are intact and still picked up, and no temp file is left. Catches write_text's
    truncate-then-write (a full disk emptied tuned.json, losing every tuned model) and a raw OSError."""
    from engine.lookahead import LookaheadConfig
    from engine.tuning_store import lookup_tuned, store_path, store_tuned

    monkeypatch.setenv("AHEAD_HOME", str(full_disk / "home"))
    engine = tiny_engine("qwen2")
    store_tuned(engine, LookaheadConfig(5, 3, 2), {"tok_s": 1.0})
    before = store_path().read_text()
    fill(full_disk)
    with pytest.raises(AheadError) as raised:
        store_tuned(engine, LookaheadConfig(7, 4, 6), {"tok_s": 2.0, "note": "x" * 100_000})
    assert "No space left on device" in str(raised.value) and "\n" not in str(raised.value)
    assert store_path().read_text() == before
    assert lookup_tuned(engine) == LookaheadConfig(5, 3, 2)
    assert sorted(p.name for p in store_path().parent.iterdir()) == ["tuned.json"]


def test_a_failed_atomic_replace_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    """The one helper behind tuned.json and the weights cache: a writer that dies halfway must leave the old
    file as it was and no temporary beside it. Catches a write in place or a leaked .tmp."""
    from engine.atomic import replace_atomically

    target = tmp_path / "tuned.json"
    target.write_text("old")

    def half(tmp: str) -> None:
        Path(tmp).write_text("ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        replace_atomically(target, half)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["tuned.json"]
    replace_atomically(target, lambda tmp: Path(tmp).write_text("new"))
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["tuned.json"]
