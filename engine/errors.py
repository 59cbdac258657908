"""One exception type for everything a user can fix: its message is one line that says what to do."""


class AheadError(Exception):
    """A user-facing failure (bad input, missing model, no GPU). The CLI prints it and exits 2."""
