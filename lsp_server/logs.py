"""The language server's log: stderr or a file, never stdout, and no source code unless --debug.

In stdio mode stdout is the LSP channel, so one stray print would corrupt it. pygls logs whole
messages (documents, completions) at INFO and the params of failed requests at ERROR; a user's
log file must not become a copy of their code, so without --debug pygls' records keep their
text but lose their arguments.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Redact(logging.Filter):
    """Drops a record's arguments (message params, document text), keeping what happened."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.msg = str(record.msg).replace("%r", "%s").replace("%s", "(...)")
            record.args = None
        return True


class LogFile(logging.FileHandler):
    """A log file that may stop taking writes (a full disk): says so once on stderr, then drops records.

    logging's own handler prints a traceback to stderr for every record it fails to write; the
    server must keep serving either way, and one line is enough to tell the user why the log stops."""

    def __init__(self, path: Path):
        super().__init__(path, encoding="utf-8")
        self.failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if self.failed:
            return
        self.failed = True
        error = sys.exc_info()[1]
        reason = getattr(error, "strerror", None) or error
        try:
            print(f"ahead: cannot write the log file {self.baseFilename} ({reason}); log lines are dropped",
                  file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass


def configure(log_file: Path | None, debug: bool) -> None:
    """Log to `log_file` (appended) or stderr; pygls at WARNING and redacted unless `debug`."""
    handler: logging.Handler = LogFile(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    if not debug:
        handler.addFilter(Redact())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("pygls").setLevel(logging.DEBUG if debug else logging.WARNING)
