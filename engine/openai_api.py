"""An OpenAI-compatible `POST /v1/completions` on the daemon (aiohttp), for editor backends that speak it.

Continue, Tabby, llm-ls and llama.vscode-style clients send `prompt` + `suffix` (fill in the
middle), `max_tokens`, `stop` and `stream`; they get greedy completions from the same engine
and queue as the native protocol. Sampling parameters are accepted and ignored (ahead decodes
greedily). Extensions: `document` (the KV session to reuse; default: `user`, else one shared
session) and `stop_rules` (true, or a map as in the native protocol, to apply ahead's own
stop rules on top of `stop`). Off loopback every request needs `Authorization: Bearer TOKEN`.

Whoever can reach the port can send anything, so the edges are bounded: a body over
MAX_BODY_BYTES is refused (413) from its declared length, before it is read; a request must
arrive whole within READ_TIMEOUT_S (headers: aiohttp's keep-alive timer, which runs from the
connection's start; body: a deadline here, then 408 and at most as long again to drain it), so
clients that dribble bytes (slowloris) hold a connection for seconds, not forever; and a body
that is not a JSON object is a 400, however deeply it nests.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import protocol
from .errors import AheadError, BadRequest
from .request import CompletionRequest
from .stops import StopRules

if TYPE_CHECKING:
    from .server import Daemon

MAX_BODY_BYTES = 8 << 20  # a whole large file plus context, as JSON, fits many times over
READ_TIMEOUT_S = 10.0  # to receive a request's headers, and then its body
STATUS = {"bad_request": 400, "does_not_fit": 400, "unauthorized": 401, "cancelled": 409, "overloaded": 429,
          "out_of_memory": 503, "shutting_down": 503}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def error_response(status: int, message: str, code: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error" if status < 500
                                        else "server_error", "code": code}}, status=status)


def openai_request(body: Any) -> CompletionRequest:
    """A CompletionRequest from an OpenAI completions body, or BadRequest saying what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string (or a list of one string)")
    suffix = body.get("suffix") or ""
    if not isinstance(suffix, str):
        raise BadRequest("'suffix' must be a string")
    if body.get("n", 1) not in (1, None):
        raise BadRequest("only n=1 is supported (completions are greedy)")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 16:
        raise BadRequest("'stop' must be a string or a list of at most 16 strings")
    sequences = tuple(s for s in stop if s)
    rules = body.get("stop_rules")
    if rules is True:
        stop_rules = StopRules(sequences=sequences)
    elif isinstance(rules, dict):
        base = protocol.stop_rules(rules)
        stop_rules = StopRules(base.block_end, base.suffix_overlap, base.line_end, base.max_lines, sequences)
    else:
        stop_rules = StopRules.raw(sequences)
    max_tokens = body.get("max_tokens", 128)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise BadRequest("'max_tokens' must be an integer")
    document = body.get("document") or body.get("user")
    request = CompletionRequest(prompt, suffix, document=document if isinstance(document, str) else None,
                                max_tokens=max_tokens, stop=stop_rules)
    request.validate()
    return request


def choice_body(daemon: Daemon, text: str, finish: str | None, usage: dict | None = None) -> dict:
    body = {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
        "model": daemon.engine.model_name,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def token_matches(header: str, token: str | None) -> bool:
    """`Authorization: Bearer TOKEN` against the daemon's token, in constant time (hmac.compare_digest).

    Header bytes that are not UTF-8 arrive as surrogate escapes; they are compared, never an error."""
    given = header.removeprefix("Bearer ").strip().encode("utf-8", "surrogateescape")
    return bool(token) and hmac.compare_digest(given, token.encode())


async def read_json(request: web.Request) -> Any:
    """The body parsed, or an HTTPException (413, 408, 400) that says what was wrong with it."""
    too_large = f"the body is larger than {MAX_BODY_BYTES} bytes"
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=request.content_length,
                                            text=too_large)
    try:
        data = await asyncio.wait_for(request.read(), READ_TIMEOUT_S)
    except web.HTTPRequestEntityTooLarge:  # no declared length (chunked): counted while read
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=MAX_BODY_BYTES + 1,
                                            text=too_large) from None
    except TimeoutError:
        raise web.HTTPRequestTimeout(text=f"the body did not arrive within {READ_TIMEOUT_S:.0f} s") from None
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise web.HTTPBadRequest(text=f"the body is not JSON ({str(exc)[:200]})") from None


def make_app(daemon: Daemon, needs_token: bool) -> web.Application:
    @web.middleware
    async def authorize(request: web.Request, handler):
        if needs_token and not token_matches(request.headers.get("Authorization", ""), daemon.token):
            return error_response(401, "wrong or missing token (Authorization: Bearer TOKEN)", "unauthorized")
        return await handler(request)

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": daemon.engine.model_name, "object": "model", "created": int(daemon.started), "owned_by": "ahead"}]})

    async def completions(request: web.Request) -> web.StreamResponse:
        try:
            body = await read_json(request)
        except web.HTTPException as exc:
            codes = {413: "too_large", 408: "timeout"}
            response = error_response(exc.status, exc.text or exc.reason, codes.get(exc.status, "bad_request"))
            response.force_close()  # an unread or half-read body leaves the connection unusable
            return response
        try:
            completion_request = openai_request(body)
        except AheadError as exc:
            return error_response(400, str(exc), exc.code)
        loop = asyncio.get_running_loop()
        texts: asyncio.Queue[str] = asyncio.Queue()
        stream = bool(body.get("stream"))
        on_text = (lambda t: loop.call_soon_threadsafe(texts.put_nowait, t)) if stream else None
        try:
            job = daemon.worker.submit(completion_request, on_text=on_text, client=f"openai:{request.remote}")
        except AheadError as exc:
            return error_response(STATUS.get(exc.code, 500), str(exc), exc.code)
        if not stream:
            try:
                done = await asyncio.wrap_future(job.future)
            except AheadError as exc:
                return error_response(STATUS.get(exc.code, 500), str(exc), exc.code)
            except asyncio.CancelledError:
                job.cancel()  # the client went away
                raise
            usage = {"prompt_tokens": done.prompt_tokens, "completion_tokens": len(done.tokens),
                     "total_tokens": done.prompt_tokens + len(done.tokens)}
            return web.json_response(choice_body(daemon, done.text, finish_reason(done.stop_reason), usage))

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        sent = ""
        finished = asyncio.ensure_future(asyncio.wrap_future(job.future))

        async def send(text: str, finish: str | None) -> None:
            nonlocal sent
            await response.write(f"data: {json.dumps(choice_body(daemon, text[len(sent):], finish))}\n\n".encode())
            sent = text

        try:
            while not finished.done():
                getter = asyncio.ensure_future(texts.get())
                await asyncio.wait({getter, finished}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    await send(getter.result(), None)
                else:
                    getter.cancel()
            try:
                done = finished.result()
                await send(done.text if done.text.startswith(sent) else sent, finish_reason(done.stop_reason))
            except AheadError as exc:
                await response.write(f"data: {json.dumps({'error': {'message': str(exc), 'code': exc.code}})}\n\n"
                                     .encode())
            await response.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            job.cancel()
            raise
        return response

    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[authorize])
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    return app


def finish_reason(stop_reason: str) -> str:
    return "length" if stop_reason == "length" else "stop"


async def start_openai(daemon: Daemon, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Serve the endpoint on the daemon's event loop; returns the runner (to clean up) and host:port."""
    # lingering_time: how long aiohttp drains a refused body before it closes; a dribbling client could
    # otherwise keep the connection after its 408/413 for aiohttp's default 10 s, whatever READ_TIMEOUT_S is.
    runner = web.AppRunner(make_app(daemon, needs_token=not is_loopback(host)), access_log=None,
                           keepalive_timeout=READ_TIMEOUT_S, lingering_time=READ_TIMEOUT_S)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    return runner, f"{bound[0]}:{bound[1]}"
