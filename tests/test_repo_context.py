"""RepoContext: which workspace files go into the repo-level prompt, in what order, and when that changes.

Catches: ignored, binary, huge or escaping files leaking into the prompt; a budget overrun; the most
relevant file not last; context bytes that change while the user only types (KV cache thrown away on
every keystroke); a saved file shown stale; watchdog events not reaching the context; a start() that
scans on the caller's thread; a stop() that leaves threads running.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lsp_server.context import MAX_FILE_BYTES, GitIgnore, RepoContext


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def names(pieces: list[tuple[str, str]]) -> list[str]:
    return [p for p, _ in pieces]


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A small Python package plus files that must never be shown."""
    ws = tmp_path / "ws"
    write(ws / "pkg" / "main.py", "import util\n\nprint(util.add(1, 2))\n")
    write(ws / "pkg" / "util.py", "def add(a, b):\n    return a + b\n")
    write(ws / "pkg" / "models.py", "class User:\n    name: str\n")
    write(ws / "lib" / "far.py", "FAR = 1\n")
    write(ws / "web" / "app.js", "console.log(1)\n")
    write(ws / "pkg" / "blob.bin", b"\x00\x01binary" * 10)
    write(ws / "pkg" / "huge.py", "x = 1\n" * (MAX_FILE_BYTES // 6 + 10))
    write(ws / "node_modules" / "dep" / "index.js", "module.exports = 1\n")
    write(ws / ".git-like" / "ok.py", "OK = 1\n")
    return ws


@pytest.fixture
def context(repo: Path) -> Iterator[RepoContext]:
    ctx = RepoContext([repo])
    yield ctx
    ctx.stop()


def scanned(ctx: RepoContext, repo: Path) -> RepoContext:
    """Start it and wait until the scan has seen the package (pieces are empty until then for unnoted files)."""
    ctx.start()
    assert wait_for(lambda: "pkg/util.py" in names(ctx.pieces(repo / "pkg" / "main.py", 100_000)))
    return ctx


def test_only_text_files_of_the_workspace_small_enough_are_shown(context: RepoContext, repo: Path, tmp_path: Path
                                                                 ) -> None:
    outside = write(tmp_path / "outside" / "secret.py", "SECRET = 'do not send'\n")
    (repo / "pkg" / "link.py").symlink_to(outside)
    (repo / "pkg" / "linkdir").symlink_to(outside.parent, target_is_directory=True)
    scanned(context, repo)
    for path in ("pkg/link.py", "pkg/linkdir/secret.py", "pkg/blob.bin", "pkg/huge.py"):
        context.note_opened(repo / path)  # noting does not let a refused file in either
    context.note_opened(outside)
    shown = context.pieces(repo / "pkg" / "main.py", 1_000_000)
    assert "pkg/util.py" in names(shown) and "pkg/models.py" in names(shown)
    assert not any("SECRET" in text for _, text in shown), "a symlink escaped the workspace"
    assert not {"pkg/blob.bin", "pkg/huge.py", "node_modules/dep/index.js"} & set(names(shown))
    assert "pkg/main.py" not in names(shown), "the current file is the document, not context"


def test_gitignored_files_are_left_out_without_git(context: RepoContext, repo: Path) -> None:
    """Not a git repository: the .gitignore files are read (root and nested, dir-only patterns)."""
    write(repo / ".gitignore", "# comment\nsecret_*.py\n/lib/\ngen/\n")
    write(repo / "pkg" / ".gitignore", "local.py\n")
    write(repo / "pkg" / "secret_keys.py", "KEY = 1\n")
    write(repo / "pkg" / "local.py", "LOCAL = 1\n")
    write(repo / "pkg" / "gen" / "out.py", "GEN = 1\n")
    write(repo / "pkg" / "lib" / "kept.py", "KEPT = 1\n")  # `/lib/` is anchored to the root
    assert not GitIgnore(repo).in_repo
    scanned(context, repo)
    shown = names(context.pieces(repo / "pkg" / "main.py", 1_000_000))
    assert "pkg/lib/kept.py" in shown
    assert not {"pkg/secret_keys.py", "pkg/local.py", "pkg/gen/out.py", "lib/far.py"} & set(shown)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_gitignored_files_are_left_out_by_git(context: RepoContext, repo: Path) -> None:
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    write(repo / ".gitignore", "secret_*.py\n")
    write(repo / "pkg" / "secret_keys.py", "KEY = 1\n")
    assert GitIgnore(repo).in_repo
    scanned(context, repo)
    context.note_opened(repo / "pkg" / "secret_keys.py")
    write(repo / "pkg" / "secret_new.py", "NEW = 1\n")
    context.note_opened(repo / "pkg" / "secret_new.py")  # after the scan: `git check-ignore`
    shown = names(context.pieces(repo / "pkg" / "main.py", 1_000_000))
    assert "pkg/util.py" in shown
    assert "pkg/secret_keys.py" not in shown and "pkg/secret_new.py" not in shown


def test_budget_is_respected_and_the_most_relevant_file_is_last(context: RepoContext, repo: Path) -> None:
    scanned(context, repo)
    context.note_opened(repo / "lib" / "far.py")
    context.note_opened(repo / "pkg" / "models.py")
    everything = context.pieces(repo / "pkg" / "main.py", 1_000_000)
    # Noted files (most recent last) after the same folder's, then the same language elsewhere, first.
    assert names(everything)[-2:] == ["lib/far.py", "pkg/models.py"]
    assert names(everything).index("pkg/util.py") > names(everything).index(".git-like/ok.py")
    assert "web/app.js" not in names(everything), "another language in another folder is noise"
    small = 60
    few = context.pieces(repo / "pkg" / "main.py", small)
    assert sum(len(p) + len(t) + 2 for p, t in few) <= small
    assert few and names(few) == names(everything)[-len(few):], "the budget must drop the least relevant first"
    assert len(few) < len(everything)


def test_context_is_stable_while_typing_and_refreshed_on_save(context: RepoContext, repo: Path) -> None:
    current = repo / "pkg" / "main.py"
    scanned(context, repo)
    context.note_opened(repo / "pkg" / "util.py")
    context.note_opened(repo / "pkg" / "models.py")
    context.note_opened(current)
    before = context.pieces(current, 10_000)
    for _ in range(3):  # typing in the document, and in another open buffer, saves nothing
        context.note_edited(current)
        write(current, current.read_text() + "# more\n")
        context.note_edited(repo / "pkg" / "util.py")
        context.note_opened(repo / "pkg" / "util.py")
        context.note_saved(current)
        assert context.pieces(current, 10_000) == before, "context bytes changed while only the document changed"
    write(repo / "pkg" / "util.py", "def add(a, b):\n    return b + a\n")
    context.note_saved(repo / "pkg" / "util.py")
    after = context.pieces(current, 10_000)
    assert after != before
    assert after[-1] == ("pkg/util.py", "def add(a, b):\n    return b + a\n"), "a saved file is most relevant"


def test_a_files_text_is_a_snapshot_until_saved(repo: Path) -> None:
    """Unwatched (not started): a change on disk shows only once the editor says the file was saved."""
    ctx = RepoContext([repo])
    current = repo / "pkg" / "main.py"
    for name in ("util.py", "models.py"):
        ctx.note_opened(repo / "pkg" / name)
    before = ctx.pieces(current, 10_000)
    assert names(before) == ["pkg/util.py", "pkg/models.py"]
    write(repo / "pkg" / "util.py", "def add(a, b):\n    return b + a\n")
    ctx.note_opened(repo / "lib" / "far.py")  # the choice changes: util.py's text must not be re-read
    assert ctx.pieces(current, 10_000) == [*before, ("lib/far.py", "FAR = 1\n")], "a snapshot was re-read"
    ctx.note_saved(repo / "pkg" / "util.py")
    assert ctx.pieces(current, 10_000) == [("pkg/models.py", before[1][1]), ("lib/far.py", "FAR = 1\n"),
                                           ("pkg/util.py", "def add(a, b):\n    return b + a\n")]


def test_watchdog_picks_up_new_and_modified_files(context: RepoContext, repo: Path) -> None:
    current = repo / "pkg" / "main.py"
    scanned(context, repo)
    write(repo / "pkg" / "fresh.py", "FRESH = 1\n")
    assert wait_for(lambda: ("pkg/fresh.py", "FRESH = 1\n") in context.pieces(current, 100_000))
    write(repo / "pkg" / "models.py", "class User:\n    email: str\n")
    assert wait_for(lambda: ("pkg/models.py", "class User:\n    email: str\n") in context.pieces(current, 100_000))
    (repo / "pkg" / "fresh.py").unlink()
    assert wait_for(lambda: "pkg/fresh.py" not in names(context.pieces(current, 100_000)))


def test_start_does_not_scan_on_the_callers_thread_and_stop_joins_the_threads(repo: Path, monkeypatch) -> None:
    ctx = RepoContext([repo])
    scan = ctx._scan
    monkeypatch.setattr(ctx, "_scan", lambda folder: (time.sleep(0.5), scan(folder)))
    before = set(threading.enumerate())
    started = time.monotonic()
    ctx.start()
    assert time.monotonic() - started < 0.3, "start() waited for the scan"
    assert wait_for(lambda: ctx._observer is not None, 5)
    observer = ctx._observer
    assert observer.is_alive()
    ctx.stop()
    assert not observer.is_alive() and not ctx._scanner.is_alive()
    assert wait_for(lambda: set(threading.enumerate()) <= before, 5), "stop() left threads running"
