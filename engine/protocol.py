"""The daemon's wire protocol: msgpack maps over a stream socket, checked at the edge.

Every message is one msgpack map; msgpack objects delimit themselves, so the stream needs no
length prefix, and the streaming Unpacker caps how much a peer may make us buffer. Requests
are `{"id", "method", "params"}`; the answer to one is `{"id", "result"}` or `{"id", "error":
{"code", "message"}}`, optionally preceded by `{"id", "partial": {"text"}}` for a streamed
completion. docs/PROTOCOL.md is the reference; this module turns frames into typed values
and says precisely what was wrong with those it refuses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgpack
from msgpack import fallback

from .errors import AheadError, BadRequest
from .stops import StopRules

if TYPE_CHECKING:
    from .request import CompletionRequest, Switches

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 16 << 20  # a frame holding a whole large file plus context stays far below this
METHODS = ("hello", "complete", "cancel", "status", "close_document", "shutdown")

# Error codes (docs/PROTOCOL.md): AheadError subclasses carry theirs (bad_request, does_not_fit,
# cancelled, busy); these are the protocol's own.
BAD_FRAME = "bad_frame"
UNKNOWN_METHOD = "unknown_method"
PROTOCOL_MISMATCH = "protocol_mismatch"
HELLO_FIRST = "hello_first"
UNAUTHORIZED = "unauthorized"
OVERLOADED = "overloaded"
OUT_OF_MEMORY = "out_of_memory"
SHUTTING_DOWN = "shutting_down"
INTERNAL = "internal"


class ProtocolError(AheadError):
    """A frame or handshake the server refuses; `code` is one of the constants above."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def pack(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpacker() -> fallback.Unpacker:
    """A streaming decoder that refuses to buffer more than one maximal frame.

    msgpack's pure-Python decoder, not its C one: it refuses a string, array or map whose declared length
    exceeds the limit as soon as it reads the header, where the C one first waits for (and buffers) up to
    16 MiB of a frame it will refuse anyway. It costs ~40 us per 20 kB frame (a shared 2-core CPU)."""
    return fallback.Unpacker(raw=False, max_buffer_size=MAX_FRAME_BYTES, strict_map_key=False)


def error_reply(request_id: Any, code: str, message: str, **extra: Any) -> dict:
    return {"id": request_id, "error": {"code": code, "message": message, **extra}}


def check_request(frame: Any) -> tuple[int, str, dict]:
    """(id, method, params) of a request frame, or ProtocolError saying what is wrong."""
    if not isinstance(frame, dict):
        raise ProtocolError(BAD_FRAME, f"a request must be a map, got {type(frame).__name__}")
    request_id = frame.get("id")
    if not isinstance(request_id, int) or isinstance(request_id, bool):
        raise ProtocolError(BAD_FRAME, "a request needs an integer 'id'")
    method = frame.get("method")
    if not isinstance(method, str):
        raise ProtocolError(BAD_FRAME, "a request needs a string 'method'")
    if method not in METHODS:
        # repr: a name holding a line break must not break the one-line message
        raise ProtocolError(UNKNOWN_METHOD, f"unknown method {method!r} (known: {', '.join(METHODS)})")
    params = frame.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ProtocolError(BAD_FRAME, "'params' must be a map")
    return request_id, method, params


def _get(params: dict, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = params.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BadRequest(f"'{key}' must be {names}, got {type(value).__name__}")
    return value


def stop_rules(value: Any) -> StopRules:
    """`stop`: a map of StopRules fields (missing ones default), or "raw" for none."""
    if value is None:
        return StopRules()
    if value == "raw":
        return StopRules.raw()
    if not isinstance(value, dict):
        raise BadRequest("'stop' must be a map of stop rules or \"raw\"")
    known = {"block_end", "suffix_overlap", "line_end", "max_lines"}
    unknown = set(value) - known
    if unknown:
        names = ", ".join(sorted(map(str, unknown)))
        raise BadRequest(f"unknown stop rule(s) {names} (known: {', '.join(sorted(known))})")
    flags = {k: _get(value, k, bool, True) for k in ("block_end", "suffix_overlap", "line_end")}
    return StopRules(**flags, max_lines=_get(value, "max_lines", int, 0))


def context_pieces(value: Any) -> tuple[tuple[str, str], ...]:
    """`context`: other files to show the model, as [{"path", "text"}], most relevant last."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise BadRequest("'context' must be a list of {path, text} maps")
    pieces = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("path"), str) or not isinstance(item.get("text"), str):
            raise BadRequest("each 'context' item must be a map with string 'path' and 'text'")
        pieces.append((item["path"], item["text"]))
    return tuple(pieces)


def completion_request(params: dict) -> CompletionRequest:
    """The `complete` method's params as a validated CompletionRequest (server side: imports torch, which
    the clients of this module never need)."""
    from .lookahead import LookaheadConfig
    from .request import DECODINGS, CompletionRequest

    lookahead = _get(params, "lookahead", str, None)
    try:
        cfg = LookaheadConfig.parse(lookahead) if lookahead else None
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    decoding = _get(params, "decoding", str, "lookahead")
    if decoding not in DECODINGS:
        raise BadRequest(f"unknown decoding '{decoding}' (use {' or '.join(DECODINGS)})")
    request = CompletionRequest(
        prefix=_get(params, "prefix", str, ""),
        suffix=_get(params, "suffix", str, ""),
        document=_get(params, "document", str, None),
        max_tokens=_get(params, "max_tokens", int, 128),
        stop=stop_rules(params.get("stop")),
        decoding=decoding,
        lookahead=cfg,
        heal=_get(params, "heal", bool, True),
        context=context_pieces(params.get("context")),
        path=_get(params, "path", str, None),
    )
    request.validate()
    return request


def completion_switches(params: dict) -> Switches:
    """The `complete` method's `type_through`: a client that knows which suggestions the editor showed (the
    language server) serves the typed-through rest itself and turns the engine's own off, which would also
    answer from a suggestion the client dropped unseen (superseded after the engine had finished it)."""
    from .request import Switches

    return Switches(type_through=_get(params, "type_through", bool, True))
