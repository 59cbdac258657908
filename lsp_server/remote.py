"""Completions from a remote OpenAI-compatible server (vLLM, TensorRT-LLM serve, llama-server, `ahead engine --openai`).

Same interface as the engine backend, so the language server does not care where the model runs.
Other servers do not know ahead's stop rules, so they are applied here, with the engine's own
`Stopper`, on the streamed text; once a rule fires the response is closed, which makes the server
stop generating (ahead's cancels its job when the client goes away; vLLM aborts the request).

What is sent depends on the server, asked once through `GET /v1/models`:
- `ahead engine --openai` (`owned_by: ahead`): `prompt` = prefix, `suffix`, plus ahead's extensions
  `document` (KV session reuse) and `stop_rules` (the server cuts too and stops sooner). Repository
  context is dropped: that endpoint encodes control tokens in the prompt as plain text; the native
  protocol carries context properly.
- another server with a Qwen-family model (`qwen_layout`): the whole Qwen2.5-Coder prompt as text,
  `<|file_sep|>path\\ntext\\n`... then `<|fim_prefix|>prefix<|fim_suffix|>suffix<|fim_middle|>`, since vLLM
  and TensorRT-LLM refuse or ignore `suffix`; these servers parse control tokens in the prompt.
- otherwise: `prompt` = prefix, `suffix` (dropped after a server refuses it); no context.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from engine import protocol
from engine.client import EngineError
from engine.errors import BadRequest
from engine.stops import Stopper, StopRules, finish

OnText = Callable[[str], None]
QWEN_CONTROL = ("<|endoftext|>", "<|file_sep|>", "<|fim_prefix|>", "<|repo_name|>", "<|fim_middle|>",
                "<|fim_suffix|>", "<|im_end|>", "<|fim_pad|>")
QWEN_STOP = QWEN_CONTROL[:4]  # OpenAI's limit is four stop strings; the rest are cut here


class RemoteError(EngineError):
    """The remote server failed or could not be reached; `code` says how (unreachable, unauthorized, timeout,
    bad_request, cancelled, overloaded, server_error, bad_response)."""


@dataclass(frozen=True)
class Server:
    ahead: bool  # `ahead engine --openai`: knows `suffix`, `document` and `stop_rules`
    model: str | None  # the first model the server lists
    owned_by: str


def qwen_prompt(prefix: str, suffix: str, context: tuple[tuple[str, str], ...], path: str | None) -> str:
    """Qwen2.5-Coder's repo-level FIM prompt as text, the layout engine/prompt.py builds from ids."""
    head = "".join(f"<|file_sep|>{other}\n{text}\n" for other, text in context)
    if context:
        head += f"<|file_sep|>{path or 'current'}\n"
    return f"{head}<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"


def rules_map(rules: StopRules) -> dict | bool:
    """StopRules as the `stop_rules` extension, or False for none."""
    if not rules.any:
        return False
    return {"block_end": rules.block_end, "suffix_overlap": rules.suffix_overlap, "line_end": rules.line_end,
            "max_lines": rules.max_lines}


class _Flight:
    """One request in flight, so that a newer one for its document can close it."""

    def __init__(self) -> None:
        self.response: aiohttp.ClientResponse | None = None
        self.superseded = False

    def supersede(self) -> None:
        self.superseded = True
        if self.response is not None:
            self.response.close()


class RemoteBackend:
    """`complete`, `status`, `close_document`, `aclose` against `POST {url}/v1/completions`, streamed."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, timeout_s: float = 30.0,
                 qwen_layout: bool = True, *, server_stop_rules: bool = True):
        base = url.rstrip("/")
        self.base = base.removesuffix("/v1")
        self.api_key = api_key
        self.model = model
        self.timeout_s = timeout_s
        self.qwen_layout = qwen_layout
        self.server_stop_rules = server_stop_rules  # False: leave ahead's rules to this client (tests)
        self._session: aiohttp.ClientSession | None = None
        self._server: Server | None = None
        self._no_suffix = False  # the server refused `suffix` once
        self._flights: dict[str, _Flight] = {}
        self._latencies: deque[float] = deque(maxlen=512)
        self._requests = 0

    # -- HTTP -----------------------------------------------------------------------------------
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=self.timeout_s)
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._session = aiohttp.ClientSession(timeout=timeout, headers=headers)
        return self._session

    def _failure(self, exc: BaseException) -> RemoteError:
        """A clear one-line error for a transport failure."""
        if isinstance(exc, TimeoutError):
            return RemoteError("timeout", f"{self.base} did not answer within {self.timeout_s:g} s")
        if isinstance(exc, aiohttp.ClientConnectorError):
            reason = (exc.os_error.strerror or str(exc.os_error)) if exc.os_error else str(exc)
            return RemoteError("unreachable", f"cannot connect to {self.base}: {reason}")
        if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
            return RemoteError("bad_response", f"{self.base} closed the connection mid-answer ({exc})")
        return RemoteError("unreachable", f"{self.base}: {type(exc).__name__}: {exc}")

    async def _refused(self, response: aiohttp.ClientResponse) -> RemoteError:
        """An HTTP error status as a RemoteError carrying the server's own message."""
        try:
            body = await response.json(content_type=None)
            message = str(body["error"]["message"] if isinstance(body.get("error"), dict) else body["error"])
        except Exception:
            message = (await response.text(errors="replace"))[:200].strip() or response.reason or ""
        status = response.status
        if status in (401, 403):
            return RemoteError("unauthorized", f"{self.base} refused the API key (HTTP {status}): {message}")
        code = {400: "bad_request", 404: "bad_request", 409: "cancelled", 413: "bad_request", 422: "bad_request",
                429: "overloaded"}.get(status, "server_error")
        return RemoteError(code, f"{self.base} answered HTTP {status}: {message}", {"status": status})

    async def _describe(self) -> Server:
        """What kind of server this is and its model, from `GET /v1/models` (asked once)."""
        if self._server is not None:
            return self._server
        try:
            async with self._http().get(f"{self.base}/v1/models") as response:
                if response.status in (401, 403):
                    raise await self._refused(response)
                data = await response.json(content_type=None) if response.status == 200 else {}
        except RemoteError:
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._failure(exc) from None
        except ValueError:
            data = {}
        models = data.get("data") if isinstance(data, dict) else None
        first = models[0] if isinstance(models, list) and models and isinstance(models[0], dict) else {}
        owned_by = str(first.get("owned_by", ""))
        self._server = Server(ahead=owned_by == "ahead", model=first.get("id"), owned_by=owned_by)
        return self._server

    # -- the backend interface ------------------------------------------------------------------
    async def complete(self, params: dict, on_text: OnText | None = None) -> dict:
        """The engine protocol's `complete` params (prefix, suffix, document, path, context, max_tokens, stop)."""
        started = time.perf_counter()
        prefix, suffix = params.get("prefix") or "", params.get("suffix") or ""
        rules = protocol.stop_rules(params.get("stop"))
        context = protocol.context_pieces(params.get("context"))
        max_tokens = 128 if params.get("max_tokens") is None else params["max_tokens"]
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            raise BadRequest(f"max tokens must be an integer >= 0 (got {max_tokens!r})")
        document = params.get("document")
        server = await self._describe()
        body = self._body(server, prefix, suffix, rules, context, params.get("path"), max_tokens, document)
        flight = _Flight()
        if isinstance(document, str):
            older = self._flights.get(document)
            if older is not None:
                older.supersede()
            self._flights[document] = flight
        try:
            result = await self._stream(body, flight, Stopper(rules, prefix, suffix) if rules.any else None, on_text)
            if result is None and "suffix" in body:  # the server refused `suffix`: once more without it
                self._no_suffix = True
                body.pop("suffix")
                result = await self._stream(body, flight, Stopper(rules, prefix, suffix) if rules.any else None,
                                            on_text)
        finally:
            if isinstance(document, str) and self._flights.get(document) is flight:
                del self._flights[document]
        elapsed = (time.perf_counter() - started) * 1e3
        self._latencies.append(elapsed)
        self._requests += 1
        return {**result, "time_ms": elapsed, "total_ms": elapsed, "type_through": False, "served_by": "remote"}

    def _body(self, server: Server, prefix: str, suffix: str, rules: StopRules, context: tuple[tuple[str, str], ...],
              path: Any, max_tokens: Any, document: Any) -> dict:
        body: dict[str, Any] = {"max_tokens": max_tokens, "stream": True, "temperature": 0}
        model = self.model or server.model
        if model:
            body["model"] = model
        if server.ahead:
            body |= {"prompt": prefix, "suffix": suffix}
            body["stop_rules"] = rules_map(rules) if self.server_stop_rules else False
            if isinstance(document, str):
                body["document"] = document
        elif self.qwen_layout:
            body |= {"prompt": qwen_prompt(prefix, suffix, context, path if isinstance(path, str) else None),
                     "stop": list(QWEN_STOP)}
        else:
            body["prompt"] = prefix
            if suffix and not self._no_suffix:
                body["suffix"] = suffix
        return body

    async def _stream(self, body: dict, flight: _Flight, stopper: Stopper | None, on_text: OnText | None
                      ) -> dict | None:
        """POST and read the server-sent events, cutting with the stop rules; None when `suffix` was refused."""
        raw, streamed, chunks, finish_reason, usage = "", "", 0, None, None
        cut, control = None, False
        ended = False  # the server finished the answer: the connection may be reused
        try:
            async with self._http().post(f"{self.base}/v1/completions", json=body) as response:
                flight.response = response
                if response.status != 200:
                    error = await self._refused(response)
                    if error.code == "bad_request" and "suffix" in body and "suffix" in str(error).lower():
                        return None
                    raise error
                buffer = b""
                done = False
                async for data in response.content.iter_any():
                    buffer += data
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        line = line.strip()
                        if not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            ended = done = True
                            break
                        event = self._event(payload)
                        choice = (event.get("choices") or [{}])[0]
                        delta = choice.get("text") or ""
                        chunks += bool(delta)
                        raw += delta
                        finish_reason = choice.get("finish_reason") or finish_reason
                        usage = event.get("usage") or usage
                        marks = [i for i in (raw.find(c) for c in QWEN_CONTROL) if i >= 0]
                        if marks:  # a control token rendered as text: the model's own stop
                            raw, control, done = raw[: min(marks)], True, True
                        if stopper is not None:
                            cut = stopper.check(raw, final=control)
                            if cut is not None:
                                done = True
                                break
                        if on_text is not None:
                            stable = stopper.stable(raw) if stopper is not None else raw.rstrip()
                            if len(stable) > len(streamed):
                                streamed = stable
                                on_text(stable)
                        if done:
                            break
                    if done:
                        break
                else:
                    ended = True
        except RemoteError:
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            if flight.superseded:
                raise RemoteError("cancelled", "a newer request for the document replaced this one",
                                  {"superseded": True, "text": streamed}) from None
            raise self._failure(exc) from None
        finally:
            if not ended and flight.response is not None:
                flight.response.close()  # cancelled or cut early: the server sees the client go and stops
        if flight.superseded:
            raise RemoteError("cancelled", "a newer request for the document replaced this one",
                              {"superseded": True, "text": streamed})
        if cut is None and stopper is not None and not control:
            cut = stopper.check(raw, final=True)
        if cut is not None:
            text, reason = raw[: cut.end], cut.reason
        else:
            text, reason = raw, "length" if finish_reason == "length" and not control else "stop"
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        return {"text": finish(text), "stop_reason": reason, "tokens": tokens if isinstance(tokens, int) else chunks,
                "received_chars": len(raw)}

    def _event(self, payload: bytes) -> dict:
        try:
            event = json.loads(payload)
        except ValueError:
            raise RemoteError("bad_response", f"{self.base} sent an event that is not JSON: {payload[:80]!r}") from None
        if not isinstance(event, dict):
            raise RemoteError("bad_response", f"{self.base} sent an event that is not an object")
        error = event.get("error")
        if error:
            error = error if isinstance(error, dict) else {"message": str(error)}
            code = str(error.get("code") or "server_error")
            raise RemoteError(code if code in ("cancelled", "overloaded", "out_of_memory") else "server_error",
                              f"{self.base}: {error.get('message', 'error')}", error)
        return event

    async def status(self) -> dict:
        """The server's kind and model, asked again, and this client's latencies."""
        self._server = None
        server = await self._describe()
        ordered = sorted(self._latencies)
        return {
            "server": f"remote ({server.owned_by or 'OpenAI-compatible'})", "model": self.model or server.model,
            "url": self.base, "device": "remote", "fim": server.ahead or self.qwen_layout,
            "context": self.qwen_layout and not server.ahead,
            "latency_ms": {"p50": statistics.median(ordered) if ordered else None,
                           "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else None,
                           "count": len(ordered)},
            "requests": self._requests,
        }

    async def close_document(self, document: str) -> None:
        """Nothing is kept for a document here; a request still running for it is closed."""
        flight = self._flights.pop(document, None)
        if flight is not None:
            flight.supersede()

    async def aclose(self) -> None:
        for flight in list(self._flights.values()):
            flight.supersede()
        self._flights.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
