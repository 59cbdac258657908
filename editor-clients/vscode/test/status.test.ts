import * as assert from "node:assert/strict";
import { test } from "node:test";

import { onCompletion, onProgress, onStatus, type State, statusSummary, view } from "../src/status";

test("the engine's start shows its percentage, then ready", () => {
  // Catches: progress reports dropped, a lost percentage, or a status that never leaves "loading".
  let state: State = { kind: "starting" };
  state = onProgress(state, { kind: "begin", title: "ahead: starting the engine", message: "the default model on cpu" });
  assert.equal(view(state, true).text, "$(loading~spin) ahead");
  state = onProgress(state, { kind: "report", message: "capturing CUDA graphs (32/79)", percentage: 40 });
  assert.equal(view(state, true).text, "$(loading~spin) ahead 40%");
  assert.match(view(state, true).tooltip, /capturing CUDA graphs/);
  state = onProgress(state, { kind: "end", message: "ready" });
  assert.deepEqual(state, { kind: "ready" });
  assert.equal(view(state, true).text, "$(check) ahead");
});

test("a failed start stays an error when the error arrives before the progress ends", () => {
  // Catches: the end of a failed start's progress hiding the error.
  const error: State = { kind: "error", message: "ahead: model path /x does not exist" };
  assert.deepEqual(onProgress(error, { kind: "end", message: "failed" }), error);
  assert.equal(view(error, true).error, true);
  assert.match(view(error, true).tooltip, /does not exist/);
});

test("a completion shows its latency and clears an old error", () => {
  // Catches: the latency not shown, or an error that stays after the engine works again.
  const after = onCompletion({ kind: "error", message: "engine died" }, 57.4);
  assert.deepEqual(after, { kind: "ready", latencyMs: 57.4 });
  assert.equal(view(after, true).text, "$(check) ahead 57 ms");
  assert.equal(view(onCompletion(after, 1530), true).text, "$(check) ahead 1.5 s");
  // While the model loads, the server answers with nothing at once: that is no sign of readiness.
  const loading: State = { kind: "loading", message: "loading weights", percentage: 10 };
  assert.deepEqual(onCompletion(loading, 2), loading);
});

test("completions turned off show in the status bar", () => {
  // Catches: the toggle having no visible effect.
  assert.equal(view({ kind: "ready", latencyMs: 12 }, false).text, "$(circle-slash) ahead 12 ms (off)");
  assert.match(view({ kind: "ready" }, false).tooltip, /Toggle Completions/);
});

test("the status summary names the model, backend state and counts", () => {
  // Catches: a summary that breaks on the remote backend's shape or hides the backend's error.
  const engine = statusSummary({
    server: { requests: 9, type_through_hits: 4, errors: 0, settings: { model: null } },
    backend: { backend: "engine", endpoint: "/run/e.sock", state: "connected", model: "qwen", device: "cuda:0" },
  });
  assert.equal(engine, "ahead: qwen on cuda:0; engine on /run/e.sock: connected; 9 requests; "
                       + "4 answered by type-through; 0 errors");
  const remote = statusSummary({ server: {}, backend: { url: "http://127.0.0.1:8000", model: "m", device: "remote" } });
  assert.match(remote, /remote http:\/\/127\.0\.0\.1:8000: remote/);
  const failed = statusSummary({ server: {}, backend: { backend: "engine", state: "unavailable: x", error: "boom" } });
  assert.match(failed, /last error: boom/);
});

test("while starting, the server's status tells connected, still loading or failed", () => {
  // Catches: "ready" before the backend exists ({state: "not started"}), a remote backend never ready, an
  // engine that cannot start shown as loading forever, or a poll overwriting the progress percentage.
  const starting: State = { kind: "starting" };
  assert.deepEqual(onStatus(starting, { state: "not started" }), starting);
  assert.deepEqual(onStatus(starting, { backend: "engine", state: "connecting" }), { kind: "loading", message: "connecting" });
  assert.deepEqual(onStatus(starting, { backend: "engine", state: "connected" }), { kind: "ready" });
  assert.deepEqual(onStatus(starting, { url: "http://127.0.0.1:8000", model: "m" }), { kind: "ready" });
  assert.deepEqual(onStatus(starting, { backend: "engine", state: "unavailable: x", error: "no model" }),
                   { kind: "error", message: "ahead: no model" });
  const loading: State = { kind: "loading", message: "loading weights", percentage: 30 };
  assert.deepEqual(onStatus(loading, { backend: "engine", state: "starting the engine" }), loading);
  const ready: State = { kind: "ready", latencyMs: 9 };
  assert.deepEqual(onStatus(ready, { state: "reconnecting" }), ready);
});
