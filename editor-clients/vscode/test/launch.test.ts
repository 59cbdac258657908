import * as assert from "node:assert/strict";
import { test } from "node:test";

import { engineStop, findOnPath, logLevel, MODULE_ARGS, serverLaunch, startFailure } from "../src/launch";

const onPath = (found: Record<string, string>) => (name: string) => found[name];

test("serverPath wins, then pythonPath, then ahead on PATH, then python3 -m engine.cli", () => {
  // Catches: a configured path ignored, or the module form used when `ahead` is installed.
  const all = onPath({ ahead: "/venv/bin/ahead", python3: "/usr/bin/python3" });
  assert.deepEqual(serverLaunch("/opt/ahead", "/venv/bin/python", all), { command: "/opt/ahead", args: ["lsp"] });
  assert.deepEqual(serverLaunch(" ", "/venv/bin/python", all), { command: "/venv/bin/python", args: MODULE_ARGS });
  assert.deepEqual(serverLaunch("", "", all), { command: "/venv/bin/ahead", args: ["lsp"] });
  assert.deepEqual(serverLaunch("", "", onPath({ python3: "/usr/bin/python3" })),
                   { command: "/usr/bin/python3", args: MODULE_ARGS });
  assert.deepEqual(serverLaunch("", "", onPath({})), { command: "python3", args: MODULE_ARGS });
});

test("PATH is searched in order for an executable file", () => {
  // Catches: a later folder winning over an earlier one, or empty entries read as the current folder.
  const executables = new Set(["/b/ahead", "/c/ahead"]);
  assert.equal(findOnPath("ahead", "/a::/b:/c", (f) => executables.has(f), ":"), "/b/ahead");
  assert.equal(findOnPath("ahead", "", (f) => executables.has(f), ":"), undefined);
});

test("a missing command says how to install ahead", () => {
  // Catches: the bare spawn error (ENOENT) reaching the user without the install command.
  const message = startFailure({ command: "ahead", args: ["lsp"] }, "spawn ahead ENOENT", []);
  assert.match(message, /ahead was not found/);
  assert.match(message, /pip install 'ahead\[lsp\]'/);
  assert.match(message, /ahead\.serverPath/);
});

test("a Python without ahead says which Python and how to install it there", () => {
  // Catches: "No module named engine" shown as a generic crash.
  const python = { command: "/usr/bin/python3", args: MODULE_ARGS };
  const message = startFailure(python, "Pending response rejected since connection got disposed",
                               ["/usr/bin/python3: Error while finding module specification for 'engine.cli' "
                                + "(ModuleNotFoundError: No module named 'engine')"]);
  assert.match(message, /not installed for \/usr\/bin\/python3/);
  assert.match(message, /\/usr\/bin\/python3 -m pip install 'ahead\[lsp\]'/);
});

test("the server's own last error line is shown as it is", () => {
  // Catches: the lsp extra's message ("needs the lsp extra: pip install ...") replaced by a generic one.
  const lines = ["something", "ahead: error: ahead lsp needs the lsp extra: pip install 'ahead[lsp]'"];
  assert.equal(startFailure({ command: "ahead", args: ["lsp"] }, "connection closed", lines),
               "ahead: ahead lsp needs the lsp extra: pip install 'ahead[lsp]'");
  assert.match(startFailure({ command: "ahead", args: ["lsp"] }, "connection closed", []), /Show Log/);
});

test("log lines keep their level", () => {
  // Catches: every stderr line shown as an error (languageclient's default) or errors hidden as info.
  assert.equal(logLevel("2026-11-27 00:01:02,003 INFO ahead.lsp: ahead lsp 0.1.0 on stdio"), "info");
  assert.equal(logLevel("2026-11-27 00:01:02,003 WARNING ahead.lsp: settings: ahead.x: unknown"), "warn");
  assert.equal(logLevel("2026-11-27 00:01:02,003 ERROR ahead.lsp: the engine failed"), "error");
  assert.equal(logLevel("Traceback (most recent call last):"), "error");
});

test("the engine is stopped with the server's own command, on the configured socket, and only a local one", () => {
  // Catches: a restart that stops a remote or TCP engine, another socket's engine, or runs another ahead.
  const python = { command: "/venv/bin/python", args: MODULE_ARGS };
  assert.deepEqual(engineStop(python, "/run/e.sock", "", ""),
                   { command: "/venv/bin/python", args: ["-m", "engine.cli", "engine", "--stop", "--socket", "/run/e.sock"] });
  assert.deepEqual(engineStop({ command: "/bin/ahead", args: ["lsp"] }, "", "", ""),
                   { command: "/bin/ahead", args: ["engine", "--stop"] });
  assert.equal(engineStop(python, "", "gpu-box:7777", ""), undefined);
  assert.equal(engineStop(python, "", "", "http://127.0.0.1:8000"), undefined);
});
