"""`ahead engine`: one resident engine per GPU machine, shared by every editor over a socket.

Loading and warming a model takes seconds to minutes, so it happens once, here; editors
(the language server, `ahead complete`, other backends through the OpenAI-compatible
endpoint) connect and send requests. Everything that touches the engine goes through one
EngineWorker thread with a FairScheduler; this module only speaks the protocol (protocol.py,
docs/PROTOCOL.md), on asyncio: a task per connection, a task per request, so a `cancel`
is read while its completion runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import os
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgpack
import torch

from . import protocol
from .engine import Completion, Engine
from .errors import AheadError, Cancelled
from .flags import version
from .listen import SocketLock, read_token, serve_unix_path
from .protocol import PROTOCOL_VERSION, ProtocolError, error_reply, pack
from .scheduler import FairScheduler
from .worker import EngineWorker, Job

Log = Callable[[str], None]


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class ServeOptions:
    socket: Path
    tcp: tuple[str, int] | None = None  # msgpack over TCP: needs the token
    openai: tuple[str, int] | None = None  # OpenAI-compatible HTTP: needs the token off loopback
    token_file: Path | None = None
    per_client: int = 16  # queued requests per client before it gets `overloaded`


def completion_result(c: Completion, total_ms: float) -> dict:
    return {
        "text": c.text, "stop_reason": c.stop_reason, "tokens": len(c.tokens), "steps": c.steps,
        "prompt_tokens": c.prompt_tokens, "reused_tokens": c.reused_tokens, "prefill_tokens": c.prefill_tokens,
        "prefill_ms": c.prefill_ms, "time_ms": c.time_ms, "total_ms": total_ms, "type_through": c.type_through,
        "decoding": c.decoding, "lookahead": c.lookahead,
    }


def error_of(exc: BaseException, log: Log) -> tuple[str, str, dict]:
    """(code, one-line message, extra fields) for an exception a request raised."""
    if isinstance(exc, Cancelled):
        return exc.code, str(exc), {"text": exc.text, "tokens": exc.tokens}
    if isinstance(exc, AheadError):
        return exc.code, str(exc).splitlines()[0], {}
    log("ahead: internal error:\n" + "".join(traceback.format_exception(exc)).rstrip())
    first = str(exc).splitlines()[0] if str(exc) else ""
    return protocol.INTERNAL, f"internal error: {type(exc).__name__}: {first}", {}


class Daemon:
    """The protocol side: connections, handshakes, methods; the engine side is `worker`."""

    def __init__(self, worker: EngineWorker, scheduler: FairScheduler, token: str | None, log: Log = stderr_log):
        self.worker = worker
        self.scheduler = scheduler
        self.token = token
        self.log = log
        self.engine: Engine = worker.engine
        self.started = time.monotonic()
        self.latencies: deque[float] = deque(maxlen=512)  # ms, request received -> answer sent
        self.requests = 0
        self.cancelled = 0  # completions answered `cancelled` (by `cancel`, a newer request, a closed connection)
        self.connections = 0
        self.clients = itertools.count(1)
        self.stopping = asyncio.Event()

    # -- what `hello` and `status` say ----------------------------------------------------------
    def info(self) -> dict:
        engine = self.engine
        return {
            "protocol": PROTOCOL_VERSION,
            "server": f"ahead {version()}",
            "model": engine.model_name,
            "engine": engine.describe(),
            "device": engine.device_name(),
            "dtype": str(engine.dtype).removeprefix("torch."),
            "tokenizer": engine.codec.fingerprint,
            "fim": engine.codec.fim_ids is not None,
            "max_seq_len": engine.runner.capacity,
        }

    def status(self) -> dict:
        engine = self.engine
        ordered = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None

        memory = {"kv_parked_bytes": engine.sessions.parked_bytes(), "kv_budget_bytes": engine.sessions.budget_bytes}
        if engine.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(engine.device)
            memory |= {"device_allocated_bytes": torch.cuda.memory_allocated(engine.device),
                       "device_total_bytes": total, "device_free_bytes": free}
        return {
            **self.info(),
            "memory": memory,
            "sessions": len(engine.sessions.sessions),
            "decoding": engine.default_decoding(),  # what a request without W,N,G runs
            "lookahead": str(engine.default_lookahead()),  # v1's config, for requests that name lookahead's W,N,G
            "latency_ms": {"p50": pct(0.5), "p95": pct(0.95), "count": len(ordered)},
            "requests": self.requests,
            "cancelled": self.cancelled,
            "queue": self.worker.pending(),
            "connections": self.connections,
            "uptime_s": time.monotonic() - self.started,
        }

    # -- connections ------------------------------------------------------------------------------
    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               needs_token: bool) -> None:
        client = f"client-{next(self.clients)}"
        self.connections += 1
        jobs: dict[int, Job] = {}
        tasks: set[asyncio.Task] = set()
        unpacker = protocol.unpacker()
        greeted = False

        def send(message: dict) -> None:
            if not writer.is_closing():
                writer.write(pack(message))

        try:
            while not self.stopping.is_set():
                data = await reader.read(1 << 16)
                if not data:
                    break
                try:
                    unpacker.feed(data)
                    frames = list(unpacker)
                except (msgpack.UnpackException, ValueError, TypeError) as exc:  # TypeError: a list as a map key
                    # A msgpack stream cannot be resynchronised after garbage: say why, then close.
                    send(error_reply(None, protocol.BAD_FRAME, f"unreadable msgpack frame ({type(exc).__name__})"))
                    break
                for frame in frames:
                    request_id = frame.get("id") if isinstance(frame, dict) else None
                    try:
                        request_id, method, params = protocol.check_request(frame)
                        if not greeted:
                            self.hello(method, params, needs_token)
                            greeted = True
                            send({"id": request_id, "result": self.info()})
                            continue
                        if method == "complete":
                            task = asyncio.create_task(self.complete(request_id, params, client, jobs, send))
                            tasks.add(task)
                            task.add_done_callback(tasks.discard)
                        else:
                            send({"id": request_id, "result": await self.call(method, params, jobs)})
                    except ProtocolError as exc:
                        send(error_reply(request_id, exc.code, str(exc)))
                        if exc.code in (protocol.PROTOCOL_MISMATCH, protocol.UNAUTHORIZED, protocol.HELLO_FIRST):
                            raise ConnectionAbortedError from None
                    except Exception as exc:
                        code, message, extra = error_of(exc, self.log)
                        send(error_reply(request_id, code, message, **extra))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            for job in jobs.values():
                job.cancel()  # nobody is left to read the answer
            for task in tasks:
                task.cancel()
            self.connections -= 1
            with contextlib.suppress(Exception):
                await writer.drain()
            writer.close()

    def hello(self, method: str, params: dict, needs_token: bool) -> None:
        if method != "hello":
            raise ProtocolError(protocol.HELLO_FIRST, "the first request on a connection must be 'hello'")
        version = params.get("protocol")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(protocol.PROTOCOL_MISMATCH,
                                f"this engine speaks protocol {PROTOCOL_VERSION}, the client {version!r}")
        if needs_token:
            given = params.get("token")
            if not isinstance(given, str) or self.token is None or not hmac.compare_digest(given, self.token):
                raise ProtocolError(protocol.UNAUTHORIZED, "wrong or missing token")

    async def call(self, method: str, params: dict, jobs: dict[int, Job]) -> dict:
        if method == "hello":
            return self.info()
        if method == "status":
            return self.status()
        if method == "cancel":
            target = params.get("id")
            job = jobs.get(target) if isinstance(target, int) else None
            if job is not None and not job.done():
                job.cancel()
                return {"cancelled": True}
            return {"cancelled": False}
        if method == "close_document":
            document = params.get("document")
            if not isinstance(document, str):
                raise protocol.BadRequest("'document' must be a string")
            self.scheduler.forget(document)
            await asyncio.wrap_future(self.worker.call(lambda e: e.close_document(document)))
            return {"closed": True}
        if method == "shutdown":
            self.stopping.set()
            return {"stopping": True}
        raise ProtocolError(protocol.UNKNOWN_METHOD, f"unknown method '{method}'")

    async def complete(self, request_id: int, params: dict, client: str, jobs: dict[int, Job],
                       send: Callable[[dict], None]) -> None:
        received = time.perf_counter()
        loop = asyncio.get_running_loop()
        job: Job | None = None
        try:
            request, switches = protocol.completion_request(params), protocol.completion_switches(params)
            on_text = None
            if params.get("stream"):
                def on_text(text: str) -> None:  # called on the engine thread
                    loop.call_soon_threadsafe(send, {"id": request_id, "partial": {"text": text}})
            job = self.worker.submit(request, switches=switches, on_text=on_text, client=client)
            jobs[request_id] = job
            completion = await asyncio.wrap_future(job.future)
            total_ms = (time.perf_counter() - received) * 1e3
            self.requests += 1
            self.latencies.append(total_ms)
            send({"id": request_id, "result": completion_result(completion, total_ms)})
        except Exception as exc:
            code, message, extra = error_of(exc, self.log)
            self.cancelled += isinstance(exc, Cancelled)
            if job is not None and job.superseded:
                message, extra = "superseded by a newer request for the same document", {**extra, "superseded": True}
            send(error_reply(request_id, code, message, **extra))
        finally:
            jobs.pop(request_id, None)


async def serve(options: ServeOptions, build_engine: Callable[[], Engine], log: Log = stderr_log,
                handle_signals: bool = True) -> int:
    """Load the engine, listen until SIGTERM/SIGINT or `shutdown`, then clean up; returns an exit code.

    `handle_signals=False` when not on the main thread (a benchmark serving in the background)."""
    path = serve_unix_path(options.socket)
    token = read_token(options.token_file) if (options.tcp or options.openai) else None
    with SocketLock(path):
        scheduler = FairScheduler(per_client=options.per_client)
        worker = EngineWorker(build_engine, scheduler)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: worker.engine)  # load and warm up, off the event loop
        daemon = Daemon(worker, scheduler, token, log)
        servers = [await asyncio.start_unix_server(lambda r, w: daemon.serve_connection(r, w, False), path=str(path))]
        os.chmod(path, 0o600)
        where = [f"unix:{path}"]
        if options.tcp:
            host, port = options.tcp
            servers.append(await asyncio.start_server(lambda r, w: daemon.serve_connection(r, w, True), host, port))
            where.append(f"tcp:{host}:{servers[-1].sockets[0].getsockname()[1]}")
        http = None
        if options.openai:
            from .openai_api import start_openai

            http, bound = await start_openai(daemon, *options.openai)
            where.append(f"openai:http://{bound}/v1")
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, daemon.stopping.set)
        log(f"ahead: engine ready ({daemon.engine.describe()}) on {' '.join(where)}")
        await daemon.stopping.wait()
        log("ahead: engine shutting down")
        for server in servers:
            server.close()
        if http is not None:
            await http.cleanup()
        scheduler.close()
        worker.close(timeout=10)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return 0
