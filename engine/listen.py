"""Where the daemon listens and who may connect: a private socket, one engine per socket, a token for TCP.

The socket gives whoever can open it the user's source code and GPU, so it lives in a
directory only the user can enter and has mode 0600. A lock file next to it stops a second
engine from taking the socket over; a socket whose engine died leaves the lock free, so it
is detected as stale and replaced. TCP listeners reach beyond the user, so they require a
token kept in a file only the user can read.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import socket
import tempfile
from pathlib import Path

from .errors import AheadError

MAX_UNIX_PATH = 107  # sun_path is 108 bytes on Linux, NUL included


def runtime_dir() -> Path:
    """$XDG_RUNTIME_DIR/ahead, or a private folder in the temp dir when there is no runtime dir."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "ahead"
    return Path(tempfile.gettempdir()) / f"ahead-{os.getuid()}"


def default_socket() -> Path:
    return runtime_dir() / "engine.sock"


def default_token_file() -> Path:
    return runtime_dir() / "token"


def private_dir(path: Path) -> None:
    """Create `path` with mode 0700, or refuse an existing one that is not ours or others can write to."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise AheadError(f"{path} belongs to another user; refusing to put the engine's socket there")
    if st.st_mode & 0o022:
        raise AheadError(
            f"{path} is writable by others (mode {oct(st.st_mode & 0o777)}); chmod 700 it or pass --socket elsewhere"
        )


def serve_unix_path(path: Path) -> Path:
    """Check (and create) the socket's directory before the model loads, so a bad path fails in a second."""
    path = path.expanduser().absolute()
    if len(str(path)) > MAX_UNIX_PATH:
        raise AheadError(f"socket path {path} is longer than {MAX_UNIX_PATH} bytes; pass a shorter --socket")
    private_dir(path.parent)
    return path


def reachable(path: Path) -> bool:
    """An engine answers on this socket (connect succeeds)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


class SocketLock:
    """Held for the engine's life: PATH.lock, flock'ed, with the owner's pid inside."""

    def __init__(self, socket_path: Path):
        self.socket_path = socket_path
        self.path = socket_path.with_name(socket_path.name + ".lock")
        self.fd: int | None = None

    def __enter__(self) -> SocketLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AheadError(
                f"another engine (pid {pid}) is serving on {self.socket_path}; stop it (ahead engine --stop) "
                "or pass another --socket"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        if self.socket_path.exists() or self.socket_path.is_symlink():
            self.socket_path.unlink()  # stale: its engine died without cleaning up (the lock was free)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            os.close(self.fd)
            self.fd = None


def read_token(path: Path | None) -> str:
    """The shared secret for TCP clients: created (mode 0600) on first use; refused if others can read it
    or it is another user's. Every failure is one line (AheadError)."""
    path = (path or default_token_file()).expanduser()
    try:
        if not path.exists():
            private_dir(path.parent)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
        st = path.stat()
        if st.st_uid != os.getuid():  # its owner chose the token, and may hand it out
            raise AheadError(f"token file {path} belongs to another user; refusing to use it")
        mode = st.st_mode & 0o777
        if mode & 0o077:
            raise AheadError(f"token file {path} is readable by others (mode {oct(mode)}); chmod 600 it")
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AheadError(f"cannot read the token file {path} ({getattr(exc, 'strerror', None) or exc})") from None
    if not token:
        raise AheadError(f"token file {path} is empty")
    return token
