"""The engine daemon's log is its stderr (a file, when an editor started it): a full disk must not stop it.

`print(..., file=sys.stderr)` raises OSError once that file takes no more writes, wherever the
engine logs (loading, serving, reporting an error), so a daemon would die of its own log.
`LossyStderr` writes whole lines straight to the descriptor (nothing stays buffered to fail again
at exit), drops what cannot be written, and says how many lines were lost, once, as soon as
writing works again.
"""

from __future__ import annotations

import io
import os
import sys


class LossyStderr(io.TextIOBase):
    def __init__(self, fd: int):
        self.fd = fd
        self.pending = ""  # the current line, written when it ends (or on flush)
        self.lost = 0
        self.reason = ""

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def isatty(self) -> bool:
        return os.isatty(self.fd)

    def write(self, text: str) -> int:
        self.pending += text
        if "\n" in self.pending:
            lines, _, self.pending = self.pending.rpartition("\n")
            self._emit(lines + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending:
            text, self.pending = self.pending, ""
            self._emit(text)

    def _emit(self, text: str) -> None:
        try:
            if self.lost:
                self._write_all(f"ahead: {self.lost} log line(s) could not be written ({self.reason})\n")
                self.lost = 0
            self._write_all(text)
        except OSError as exc:
            self.lost += max(1, text.count("\n"))
            self.reason = exc.strerror or str(exc)

    def _write_all(self, text: str) -> None:
        data = text.encode("utf-8", "replace")
        while data:
            data = data[os.write(self.fd, data) :]


def protect_stderr() -> None:
    """Route this process's stderr through LossyStderr (the daemon calls it before anything logs)."""
    sys.stderr.flush()
    sys.stderr = LossyStderr(sys.stderr.fileno())
