"""Typed, user-facing failures: each message is one line that says what to do, each type has a code.

The daemon turns them into error replies by `code`; the CLI prints the message and exits 2.
"""


class AheadError(Exception):
    """A failure the user can act on (bad input, missing model, no GPU)."""

    code = "error"


class BadRequest(AheadError):
    """The request itself is wrong (unknown decoding, negative token cap, ...)."""

    code = "bad_request"


class DoesNotFit(AheadError):
    """Prompt + completion do not fit the KV cache."""

    code = "does_not_fit"


class Cancelled(AheadError):
    """The caller cancelled the request; `text` is what had been committed by then."""

    code = "cancelled"

    def __init__(self, text: str = "", tokens: int = 0):
        super().__init__("the request was cancelled")
        self.text = text
        self.tokens = tokens


class EngineBusy(AheadError):
    """A second thread tried to drive the engine: it has one KV cache and must have one owner."""

    code = "busy"


class OutOfMemory(AheadError):
    """The device ran out of memory for this request; parked sessions were dropped to make room."""

    code = "out_of_memory"


class Overloaded(AheadError):
    """Too many requests queued for one client; the newest is refused rather than queued unbounded."""

    code = "overloaded"
