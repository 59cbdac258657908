"""Repository context for Qwen2.5-Coder's repo-level prompt: which other files to show, and their text.

The engine puts these files before the document in Qwen's `<|file_sep|>` layout, so they sit at
the front of the KV cache: if their bytes change, every token after them is recomputed. So the
choice and order only change on events that are not keystrokes in the current file: a file
noted for the first time, a save, a file appearing or changing on disk. A file's text is a
snapshot taken when first needed and refreshed only when it is saved or modified on disk
(unsaved edits elsewhere are not shown). Noting a file again does not move it, except a save:
its text changes anyway, so moving it to the most relevant place costs no more KV than
changing it where it is.

Which files: inside the workspace folders (symlinks resolved; escaping ones refused), not
ignored by git (`git ls-files` / `git check-ignore`, or a simple .gitignore reader without
git), not in .git or vendor/build folders, text (no NUL in the first 8 KB), at most 256 KB.
Relevance, most relevant last: files noted this session (most recent last), then same folder and
language, then same language by path closeness, then the same folder's other files.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Callable, Iterable
from functools import cached_property
from pathlib import Path

MAX_FILE_BYTES = 256 * 1024
SNIFF_BYTES = 8192
MAX_FILES = 50_000  # candidates kept per session; a bigger tree is cut, not walked forever
MIN_PIECE_CHARS = 1024  # a file cut to fit the budget keeps at least this much, else it is left out
SKIP_DIRS = frozenset({
    ".git", ".hg", ".svn", "node_modules", "__pycache__", ".venv", "venv", ".tox", ".nox", ".mypy_cache",
    ".pytest_cache", ".ruff_cache", ".idea", ".vscode", "build", "dist", "target", "out", ".next", ".gradle",
    "vendor", "third_party", "site-packages", ".eggs", ".cache", "bazel-out", "coverage", ".terraform",
})
LANGUAGES = {
    ext: lang
    for lang, exts in {
        "python": (".py", ".pyi"), "js": (".js", ".jsx", ".mjs", ".cjs", ".ts", ".tsx", ".mts", ".cts"),
        "c": (".c", ".h", ".cc", ".cpp", ".cxx", ".hh", ".hpp", ".hxx", ".ipp"), "shell": (".sh", ".bash", ".zsh"),
        "kotlin": (".kt", ".kts"), "objc": (".m", ".mm"), "yaml": (".yaml", ".yml"),
    }.items()
    for ext in exts
}


def language(path: Path) -> str:
    suffix = path.suffix.lower()
    return LANGUAGES.get(suffix, suffix or path.name)


def _quiet(_: str) -> None:
    pass


class GitIgnore:
    """Whether a path is ignored, by git when the folder is in a repository, else by .gitignore files."""

    def __init__(self, root: Path):
        self.root = root
        self.git = shutil.which("git")
        self.patterns: dict[Path, list[str]] = {}  # the fallback's .gitignore lines, per directory

    @cached_property
    def in_repo(self) -> bool:
        return bool(self.git) and self._run(["rev-parse", "--is-inside-work-tree"]).stdout.strip() == b"true"

    def _run(self, args: list[str], data: bytes | None = None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([self.git or "git", *args], cwd=self.root, input=data, capture_output=True,
                                  timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return subprocess.CompletedProcess(args, 1, b"", b"")

    def listed(self) -> list[Path] | None:
        """Tracked and untracked-but-not-ignored files, or None when git cannot say."""
        if not self.in_repo:
            return None
        done = self._run(["ls-files", "-z", "--cached", "--others", "--exclude-standard"])
        if done.returncode != 0:
            return None
        return [self.root / os.fsdecode(p) for p in done.stdout.split(b"\0") if p]

    def ignored(self, path: Path) -> bool:
        rel = path.relative_to(self.root)
        if self.in_repo:
            return self._run(["check-ignore", "-q", "--", str(rel)]).returncode == 0
        directory, is_dir = self.root, path.is_dir()
        for part in rel.parts:  # a pattern in a .gitignore applies to paths below its folder
            sub = path.relative_to(directory).as_posix()
            if any(_matches(pattern, sub, is_dir) for pattern in self._patterns(directory)):
                return True
            directory = directory / part
        return False

    def _patterns(self, directory: Path) -> list[str]:
        if directory not in self.patterns:
            try:
                lines = (directory / ".gitignore").read_text(errors="replace").splitlines()
            except OSError:
                lines = []
            # Negations are not supported: leaving them out only ignores more, never shows an ignored file.
            self.patterns[directory] = [s for s in (line.strip() for line in lines) if s and s[0] not in "#!"]
        return self.patterns[directory]


def _matches(pattern: str, rel: str, is_dir: bool) -> bool:
    """A simple .gitignore pattern against a path relative to the .gitignore's folder.

    `rel` names the path; any of its leading folders matching also ignores it. Without a slash
    inside, the pattern matches a name at any depth; with one, it is anchored to the folder.
    """
    dir_only = pattern.endswith("/")
    pattern = pattern.rstrip("/")
    anchored = "/" in pattern
    pattern = pattern.lstrip("/")
    parts = rel.split("/")
    for i in range(len(parts)):
        if dir_only and not (i < len(parts) - 1 or is_dir):
            continue
        target = "/".join(parts[: i + 1]) if anchored else parts[i]
        if fnmatch.fnmatchcase(target, pattern) or (anchored and pattern.startswith("**/")
                                                    and fnmatch.fnmatchcase(parts[i], pattern[3:])):
            return True
    return False


def read_text(path: Path) -> str | None:
    """The file's text, or None for a binary, huge, non-UTF-8 or unreadable file, or one that is no longer
    where it was admitted: `path` is resolved, so a symlink anywhere on it now means that the file or a
    folder above it was swapped for a link since (one that may point outside the workspace). O_NOFOLLOW
    closes the race for the file itself between that check and the open; O_NONBLOCK keeps a file swapped
    for a FIFO from blocking the open."""
    try:
        if Path(os.path.realpath(path)) != path:
            return None
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE_BYTES:
                return None
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_FILE_BYTES or b"\0" in data[:SNIFF_BYTES]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class RepoContext:
    """Other files of the workspace for the prompt, kept current by watchdog, stable between keystrokes."""

    def __init__(self, folders: list[Path], log: Callable[[str], None] = _quiet):
        self.folders = [Path(f).resolve() for f in folders]
        self.log = log
        self._lock = threading.RLock()
        self._files: set[Path] = set()  # candidates (resolved paths) that passed the filters
        self._refused: set[Path] = set()  # paths checked and refused (ignored, outside, skipped folder)
        self._recent: list[Path] = []  # files noted this session, most relevant last
        self._texts: dict[Path, str | None] = {}  # snapshots, taken when first needed
        self._ignores = {folder: GitIgnore(folder) for folder in self.folders}
        self._version = 0  # bumped by any change that may change `pieces`
        self._memo: tuple[tuple, list[tuple[str, str]]] | None = None
        self._observer = None
        self._scanner: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start watching and scanning on a thread: a big repository does not hold up the caller."""
        self._scanner = threading.Thread(target=self._start_thread, name="ahead-repo-scan", daemon=True)
        self._scanner.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._scanner is not None:
            self._scanner.join()
        with self._lock:
            observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join()

    def _start_thread(self) -> None:
        # Watch first, then scan: a file created during the scan is caught by one or the other.
        try:
            from watchdog import events
            from watchdog.observers import Observer

            kinds = [events.FileCreatedEvent, events.FileModifiedEvent, events.FileDeletedEvent,
                     events.FileMovedEvent, events.DirDeletedEvent, events.DirMovedEvent]
            observer = Observer()
            handler = _Handler(self)
            for folder in self.folders:
                observer.schedule(handler, str(folder), recursive=True, event_filter=kinds)
            observer.start()
            with self._lock:
                self._observer = observer
        except Exception as exc:  # inotify watch limits, a missing folder: context still works, unwatched
            self.log(f"ahead: not watching the workspace for changes ({type(exc).__name__}: {exc})")
        for folder in self.folders:
            if self._stopping.is_set():
                return
            try:
                self._scan(folder)
            except Exception as exc:
                self.log(f"ahead: scanning {folder} for repository context failed ({type(exc).__name__}: {exc})")

    def _scan(self, folder: Path) -> None:
        listed = self._ignores[folder].listed()
        paths: Iterable[Path] = listed if listed is not None else self._walk(folder)
        found = []
        for path in paths:
            if self._stopping.is_set() or len(found) >= MAX_FILES:
                break
            if not any(part in SKIP_DIRS for part in path.relative_to(folder).parts[:-1]):
                found.append(path)
        admitted = [p for p in (self._admissible(path, folder, check_ignore=False) for path in found) if p]
        with self._lock:
            self._files.update(admitted)
            self._version += 1
        self.log(f"ahead: repository context: {len(admitted)} files in {folder}")

    def _walk(self, folder: Path) -> Iterable[Path]:
        ignore = self._ignores[folder]
        for top, dirs, files in os.walk(folder):
            here = Path(top)
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not ignore.ignored(here / d))
            for name in sorted(files):
                if not ignore.ignored(here / name):
                    yield here / name

    # -- which files ----------------------------------------------------------------------------
    def _folder_of(self, path: Path) -> Path | None:
        for folder in self.folders:
            if path.is_relative_to(folder):
                return folder
        return None

    def _admissible(self, path: Path, folder: Path | None = None, check_ignore: bool = True) -> Path | None:
        """The resolved path if it may be shown: a regular file inside a workspace folder, not skipped or ignored."""
        try:
            resolved = Path(path).resolve()
        except (OSError, RuntimeError):
            return None
        inside = self._folder_of(resolved)
        if inside is None or (folder is not None and inside != folder):
            return None  # outside every folder, or a symlink escaping its own
        if any(part in SKIP_DIRS for part in resolved.relative_to(inside).parts[:-1]):
            return None
        try:
            if not resolved.is_file() or resolved.stat().st_size > MAX_FILE_BYTES:
                return None
        except OSError:
            return None
        linked = resolved != Path(os.path.abspath(path))  # git listed the link, not what it points to
        if (check_ignore or linked) and self._ignores[inside].ignored(resolved):
            return None
        return resolved

    def _admit(self, path: Path) -> Path | None:
        """A noted or newly seen file as a candidate (checked once), or None."""
        resolved = Path(path).resolve()
        with self._lock:
            if resolved in self._files:
                return resolved
            if resolved in self._refused:
                return None
        admitted = self._admissible(resolved)
        with self._lock:
            if admitted is None:
                self._refused.add(resolved)
                return None
            if admitted not in self._files:
                self._files.add(admitted)
                self._version += 1
        return admitted

    # -- what the editor tells us ---------------------------------------------------------------
    def note_opened(self, path: Path) -> None:
        self._note(path)

    def note_edited(self, path: Path) -> None:
        """Typing: the file counts as recent, but its place and its snapshot stay as they are."""
        self._note(path)

    def note_saved(self, path: Path) -> None:
        """Saved: a fresh snapshot, and the file moves to the most relevant place."""
        resolved = self._admit(path)
        if resolved is None:
            return
        with self._lock:
            self._texts.pop(resolved, None)
            if resolved in self._recent:
                self._recent.remove(resolved)
            self._recent.append(resolved)
            self._version += 1

    def _note(self, path: Path) -> None:
        resolved = self._admit(path)
        if resolved is None:
            return
        with self._lock:
            if resolved not in self._recent:
                self._recent.append(resolved)
                self._version += 1

    # -- what watchdog tells us -----------------------------------------------------------------
    def skipped(self, path: Path) -> bool:
        """Outside the folders, or inside .git or a vendor/build folder: no need to look further."""
        folder = self._folder_of(path)
        return folder is None or any(part in SKIP_DIRS for part in path.relative_to(folder).parts[:-1])

    def _changed(self, path: Path, created: bool) -> None:
        """Created or modified on disk: considered (a new path) and its snapshot refreshed where it stands."""
        resolved = Path(path).resolve()
        with self._lock:
            if created:
                self._refused.discard(resolved)  # a new file at a refused path is checked again
            had = self._texts.pop(resolved, False) is not False
        self._admit(resolved)
        if had:
            with self._lock:
                self._version += 1

    def _removed(self, path: Path, directory: bool) -> None:
        """Gone from disk. Its place among the recent files is kept: editors that save by renaming come back."""
        gone = Path(os.path.abspath(path))
        with self._lock:
            drop = {p for p in self._files if p.is_relative_to(gone)} if directory else {gone} & self._files
            self._refused = {p for p in self._refused if not p.is_relative_to(gone)}
            if drop:
                self._files -= drop
                for p in drop:
                    self._texts.pop(p, None)
                self._version += 1

    # -- the context ----------------------------------------------------------------------------
    def pieces(self, current: Path, budget_chars: int) -> list[tuple[str, str]]:
        """(path relative to its workspace folder, text) of other files, most relevant last, within the budget.

        The same state gives the same answer: repeated calls while the user types are a lookup.
        """
        current = Path(current).resolve()
        with self._lock:
            key = (current, budget_chars, self._version)
            if self._memo is not None and self._memo[0] == key:
                return list(self._memo[1])
            ranked = self._ranked(current)
        chosen: list[tuple[str, str]] = []
        left = budget_chars
        for path in ranked:
            text = self._snapshot(path)
            if not text or not text.strip():
                continue
            folder = self._folder_of(path)
            rel = path.relative_to(folder).as_posix() if folder else path.name
            cost = len(rel) + len(text) + 2  # `path\n` + text + `\n` in the prompt
            if cost > left:
                room = left - len(rel) - 2
                cut = text[:room].rfind("\n") + 1 if room >= MIN_PIECE_CHARS else 0
                if cut >= MIN_PIECE_CHARS:
                    chosen.append((rel, text[:cut]))
                break
            chosen.append((rel, text))
            left -= cost
        chosen.reverse()
        with self._lock:
            if self._version == key[2]:
                self._memo = (key, chosen)
        return list(chosen)

    def _snapshot(self, path: Path) -> str | None:
        with self._lock:
            if path in self._texts:
                return self._texts[path]
            version = self._version
        text = read_text(path)
        with self._lock:
            if self._version == version:  # else it may have changed while read: read again next time
                self._texts[path] = text
        return text

    def _ranked(self, current: Path) -> list[Path]:
        """Candidates other than `current`, most relevant first (called with the lock held)."""
        recent = [p for p in reversed(self._recent) if p != current and p in self._files]
        seen = set(recent)
        lang, here = language(current), current.parent

        def key(path: Path) -> tuple:
            same_lang, same_dir = language(path) == lang, path.parent == here
            tier = 0 if same_lang and same_dir else 1 if same_lang else 2
            return tier, -common_parts(path.parent, here), str(path)

        rest = sorted((p for p in self._files if p != current and p not in seen
                       and (p.parent == here or language(p) == lang)), key=key)
        return recent + rest


def common_parts(a: Path, b: Path) -> int:
    n = 0
    for x, y in zip(a.parts, b.parts, strict=False):
        if x != y:
            break
        n += 1
    return n


class _Handler:
    """watchdog's events -> RepoContext updates (on the observer's thread)."""

    def __init__(self, context: RepoContext):
        self.context = context

    def dispatch(self, event) -> None:
        kind, context = event.event_type, self.context
        src = Path(os.path.abspath(os.fsdecode(event.src_path)))
        try:
            if kind == "moved":
                if not context.skipped(src):
                    context._removed(src, event.is_directory)
                dest = Path(os.path.abspath(os.fsdecode(event.dest_path)))
                if not event.is_directory and not context.skipped(dest):
                    context._changed(dest, created=True)
            elif context.skipped(src):
                return
            elif kind in ("created", "modified") and not event.is_directory:
                context._changed(src, created=kind == "created")
            elif kind == "deleted":
                context._removed(src, event.is_directory)
        except Exception as exc:  # an event must never kill the observer thread
            self.context.log(f"ahead: repository context: {kind} {src}: {type(exc).__name__}: {exc}")
