"""The VS Code extension end to end: its .vsix installed into a real VS Code (code-server), driven in headless
Chromium (editor-clients/vscode/e2e/drive.mjs) like a user would, against a real `ahead lsp` and `ahead engine`
with a tiny random model.

The tiny model writes garbage, but deterministic garbage: the saved file must end with exactly what the
in-process engine completes for the same text, so the keystrokes reached the server, the ghost text came from
it and Tab inserted it unchanged. `.ci/editors-setup` installs what this needs (Chromium, code-server, the
.vsix); without it the tests skip here and fail in CI.

AHEAD_VSCODE_MODEL=<a .gguf or model dir> runs the same test on a real model (it is slower on a CPU), and
AHEAD_VSCODE_SCREENSHOT=docs/vscode.png keeps the screenshot of its ghost text.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from daemon_helpers import CODE, local_engine, local_text, save_tiny_model, start_engine, stop

from engine.stops import StopRules

REPO = Path(__file__).resolve().parents[1]
EXTENSION = REPO / "editor-clients" / "vscode"
CODE_SERVER_VERSION = "4.100.3"
CHROMIUM = "/usr/bin/chromium"
TYPED = "result"  # one keystroke at a time, each timed from keydown to ghost text
MAX_TOKENS = 48 if os.environ.get("AHEAD_VSCODE_MODEL") else 16  # a real model gets room for a few lines


def code_server() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ahead-ci"
    return cache / f"code-server-{CODE_SERVER_VERSION}" / "node_modules" / ".bin" / "code-server"


def vsix() -> Path:
    version = json.loads((EXTENSION / "package.json").read_text())["version"]
    return EXTENSION / f"ahead-{version}.vsix"


def need(*paths: Path) -> None:
    """Skip without the editor tools (fail in CI, where .ci/editors-setup must have installed them)."""
    missing = [str(p) for p in paths if not p.exists()]
    if shutil.which("node") is None:
        missing.append("node")
    if missing:
        reason = f"run .ci/editors-setup first; missing: {', '.join(missing)}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def test_extension_settings_are_the_servers() -> None:
    """Catches: a setting the extension sends under a name the server does not know, an unset setting that does
    not mean the server's default, or a package.json default (what VS Code's Settings UI shows) that is not the
    server's."""
    from lsp_server.settings import Settings, resolve

    settings_js = EXTENSION / "out" / "src" / "settings.js"
    need(settings_js)
    script = """
const { serverSettings } = require(process.argv[1]);
const properties = require(process.argv[2]).contributes.configuration.properties;
const shown = (key) => properties[`ahead.${key}`]?.default;
const user = { model: "/m", device: "cpu", dtype: "bf16", lookahead: "4,6,8", "engine.tcp": "h:1", "remote.url": "u" };
const unset = () => undefined;
console.log(JSON.stringify([serverSettings(unset), serverSettings(shown), serverSettings((key) => user[key])]));
"""
    done = subprocess.run(["node", "-e", script, str(settings_js), str(EXTENSION / "package.json")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    unset, shown, user = json.loads(done.stdout)
    assert resolve(unset, None) == (Settings(), [])
    assert resolve(shown, None) == (Settings(), [])
    # A value set at the start and removed later (absent from `user`) is reset to the server's default.
    settings, warnings = resolve({"maxTokens": 5, "device": "cuda"}, {"ahead": user})
    assert warnings == []
    assert (settings.model, settings.device, settings.dtype, settings.lookahead) == ("/m", "cpu", "bf16", "4,6,8")
    assert (settings.engine.tcp, settings.remote.url, settings.max_tokens) == ("h:1", "u", 128)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"code-server exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"code-server did not answer on {url}: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_config, tiny_model, tiny_tokenizer) -> Path:
    real = os.environ.get("AHEAD_VSCODE_MODEL")
    if real:
        return Path(real)
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), tiny_config, tiny_model, tiny_tokenizer)


def test_vscode_shows_and_accepts_the_engines_completion(model_dir: Path, tmp_path: Path) -> None:
    """Catches: the .vsix not installing or activating, the server not starting from the extension's settings,
    inline completion not registered with VS Code (no ghost text), text changed between engine and editor,
    Tab or the next-word key not accepting it, the status bar item not showing the engine loading or never
    saying ready, and the commands (show status, toggle completions, restart) not doing what they say."""
    need(code_server(), Path(CHROMIUM), vsix(), EXTENSION / "node_modules" / "playwright-core")
    started = time.monotonic()
    workspace, user_data, extensions = tmp_path / "work", tmp_path / "user-data", tmp_path / "extensions"
    for folder in (workspace, user_data / "User", extensions):
        folder.mkdir(parents=True)
    source = workspace / "demo.py"
    original = CODE + "def main():\n    "
    source.write_text(original)
    sock = tmp_path / "e.sock"
    settings = {
        "ahead.pythonPath": sys.executable, "ahead.engine.socket": str(sock), "ahead.model": str(model_dir),
        "ahead.device": "cpu", "ahead.decoding": "ar", "ahead.maxTokens": MAX_TOKENS,
        # The word-based suggest widget would pop up while typing and hold back the ghost text.
        "editor.quickSuggestions": {"other": "off", "comments": "off", "strings": "off"},
        "editor.suggestOnTriggerCharacters": False, "editor.wordBasedSuggestions": "off",
        "workbench.startupEditor": "none", "workbench.tips.enabled": False, "telemetry.telemetryLevel": "off",
        "extensions.autoCheckUpdates": False, "extensions.autoUpdate": False, "files.autoSave": "off",
    }
    (user_data / "User" / "settings.json").write_text(json.dumps(settings, indent=2))
    # PYTHONPATH: the language server runs from this checkout, whatever ahead the Python has installed.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AHEAD_HOME": str(tmp_path / "home"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
           "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_DATA_HOME": str(tmp_path / "data")}
    dirs = ["--user-data-dir", str(user_data), "--extensions-dir", str(extensions)]

    engine = start_engine(model_dir, sock)
    server = None
    try:
        installed = subprocess.run([str(code_server()), *dirs, "--install-extension", str(vsix())],
                                   capture_output=True, text=True, timeout=180, env=env)
        assert installed.returncode == 0, installed.stdout + installed.stderr
        port = free_port()
        log = tmp_path / "code-server.log"
        with open(log, "wb") as out:
            server = subprocess.Popen(
                [str(code_server()), "--bind-addr", f"127.0.0.1:{port}", "--auth", "none", "--disable-telemetry",
                 "--disable-update-check", "--disable-workspace-trust", "--disable-getting-started-override",
                 *dirs, str(workspace)], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_http(f"http://127.0.0.1:{port}/healthz", server, log)
        options = {"url": f"http://127.0.0.1:{port}/?folder={workspace}", "file": str(source), "keys": list(TYPED),
                   "out": str(tmp_path), "chromium": CHROMIUM, "wordKey": "Control+ArrowRight",
                   "aheadHome": env["AHEAD_HOME"], "timeoutMs": 120_000}
        drive = subprocess.run(["node", str(EXTENSION / "e2e" / "drive.mjs"), json.dumps(options)], cwd=EXTENSION,
                               capture_output=True, text=True, timeout=600, env=env)
        assert drive.returncode == 0, drive.stderr
        report = json.loads(drive.stdout.strip().splitlines()[-1])
        restarted_engine = engine.poll() is not None  # the restart command stopped it; `ahead lsp` started another
    finally:
        if server is not None:
            os.killpg(server.pid, 15)
            server.wait(30)
        stop(engine)
        # The engine the language server started (its own session: it outlives the server).
        subprocess.run([sys.executable, "-m", "engine.cli", "engine", "--stop", "--socket", str(sock)],
                       capture_output=True, timeout=60, env=env)
    assert "error" not in report, f"{report['error']}\nstatus: {report.get('statusAtStart')}\n" \
                                  f"log: {log.read_text()[-2000:]}\nscreenshots in {tmp_path}"

    latencies = report["latenciesMs"]
    print(f"\nkeystroke -> ghost text in VS Code: median {statistics.median(latencies):.0f} ms over {len(latencies)} "
          f"keystrokes ({', '.join(f'{ms:.0f}' for ms in latencies)}; {report['missed']} without ghost text); "
          f"status bar: {report['statusAfterTyping']!r}; whole test {time.monotonic() - started:.1f} s; "
          f"status bar during the restart: {[label.split(chr(10))[0] for label in report['statusesDuringRestart']]}")
    assert len(latencies) >= 5
    assert report["statusAtStart"].startswith("ahead: ready")
    assert "the last completion took" in report["statusAfterTyping"]

    typed = original + TYPED
    assert report["typed"] == typed
    want = local_text(local_engine(model_dir), typed, "", max_tokens=MAX_TOKENS, decoding="ar", stop=StopRules())
    assert want.strip(), "the model completes nothing here: pick another text"
    assert report["afterTab"] == typed + want
    word = report["afterWord"]
    assert word.startswith(typed) and report["afterTab"].startswith(word) and len(typed) < len(word) < len(typed + want)
    assert source.read_text() == typed + want

    assert "requests" in report["statusMessage"] and str(model_dir) in report["statusMessage"]
    assert "are off" in report["statusWhenOff"] and not report["ghostWhenOff"]
    assert len(report["serversBefore"]) == 1 and len(report["serversAfter"]) == 1
    assert report["serversAfter"] != report["serversBefore"] and restarted_engine and report["ghostAfterRestart"]
    assert any(label.startswith("ahead: loading the model") for label in report["statusesDuringRestart"]), \
        report["statusesDuringRestart"]  # the new engine's $/progress reached the status bar
    if os.environ.get("AHEAD_VSCODE_SCREENSHOT"):
        shutil.copyfile(tmp_path / "ghost-text.png", os.environ["AHEAD_VSCODE_SCREENSHOT"])
