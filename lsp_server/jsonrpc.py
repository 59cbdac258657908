"""An answer for every request, malformed ones included (JSON-RPC 2.0 section 5).

pygls 2.1 logs and drops what it cannot read: a body that is not JSON (no -32700 Parse error), a JSON
value that is not a message (no -32600 Invalid Request), a request whose params do not fit its method's
type or that names another JSON-RPC version (no error for its id: the editor waits for an answer that
never comes). This protocol answers them; well-formed messages go through pygls unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

from pygls.exceptions import JsonRpcException, JsonRpcInternalError, JsonRpcInvalidRequest, JsonRpcParseError
from pygls.protocol import LanguageServerProtocol

log = logging.getLogger("ahead.lsp")
VERSION = "2.0"


def request_id(data: Any) -> int | str | None:
    """The id of something shaped like a request (an int or string id and a string method), else None."""
    if isinstance(data, dict) and isinstance(data.get("method"), str):
        found = data.get("id")
        if isinstance(found, int | str) and not isinstance(found, bool):
            return found
    return None


class MalformedRequest(JsonRpcException):
    """A request pygls could not turn into its method's params, with the id to answer."""

    def __init__(self, msg_id: int | str, error: JsonRpcException):
        super().__init__(code=error.code, message=error.message)
        self.msg_id = msg_id


class AnsweringProtocol(LanguageServerProtocol):
    def structure_message(self, data: dict[str, Any]) -> Any:
        if "jsonrpc" in data and data["jsonrpc"] != VERSION:
            return data  # handle_message answers it
        try:
            return super().structure_message(data)
        except JsonRpcException as exc:  # pygls raises it out of json.loads: keep the id to answer
            if (msg_id := request_id(data)) is not None:
                # What pygls calls an internal error here is a message it could not read: the client's.
                error = exc if exc.code != JsonRpcInternalError.CODE else JsonRpcInvalidRequest(
                    message=f"unreadable {data['method']} request")
                raise MalformedRequest(msg_id, error) from exc
            raise

    def handle_message(self, message: Any) -> None:
        if getattr(message, "jsonrpc", None) == VERSION:
            super().handle_message(message)
            return
        # A bare JSON value or another JSON-RPC version. One with an id and no method is a response, which
        # is never answered; anything else is an invalid request.
        fields = message if isinstance(message, dict) else {k: getattr(message, k) for k in ("id", "method")
                                                            if hasattr(message, k)}
        if fields.get("id") is not None and "method" not in fields:
            log.info("dropped a response that is not JSON-RPC 2.0")
            return
        self.answer_error(request_id(fields), JsonRpcInvalidRequest(message="not a JSON-RPC 2.0 message"))

    def answer_unreadable(self, error: Exception) -> None:
        """pygls' read loop lost a message to `error`: tell the client (the id when one could be read)."""
        if isinstance(error, MalformedRequest):
            self.answer_error(error.msg_id, error)
        elif isinstance(error, ValueError):  # json.loads: not JSON, or not UTF-8
            self.answer_error(None, JsonRpcParseError(message=f"unreadable message: {type(error).__name__}"))
        else:  # a notification pygls failed on ($/cancelRequest with a list as id): nothing to answer
            log.warning(f"dropped a notification pygls could not handle: {type(error).__name__}")

    def answer_error(self, msg_id: int | str | None, error: JsonRpcException) -> None:
        log.info(f"answered a malformed message with error {error.code}")
        # A plain map: pygls' converter would drop `"id": null`, which JSON-RPC requires when no id is known.
        self._send_data({"jsonrpc": VERSION, "id": msg_id, "error": {"code": error.code, "message": error.message}})
