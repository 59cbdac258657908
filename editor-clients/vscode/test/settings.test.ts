import * as assert from "node:assert/strict";
import * as fs from "node:fs";
import * as path from "node:path";
import { test } from "node:test";

import { CLIENT_KEYS, needsRestart, SERVER_KEYS, serverSettings } from "../src/settings";

const manifest = JSON.parse(fs.readFileSync(path.join(__dirname, "..", "..", "package.json"), "utf8"));
const properties: Record<string, { default: unknown }> = manifest.contributes.configuration.properties;
const defaults = new Map(Object.entries(properties).map(([key, spec]) => [key.replace(/^ahead\./, ""), spec.default]));

test("every contributed setting is either sent to the server or read by the extension", () => {
  // Catches: a setting added to package.json that never reaches the server (or a mapped key with no setting).
  const known = new Set<string>([...SERVER_KEYS, ...CLIENT_KEYS]);
  assert.deepEqual([...defaults.keys()].filter((key) => !known.has(key)), []);
  assert.deepEqual([...known].filter((key) => !defaults.has(key)), []);
});

test("defaults map to the server's defaults: unset strings become null, dotted keys nest", () => {
  // Catches: "" or "auto" sent as a value (the server would reject device "" and warn), or flat dotted keys.
  const sent = serverSettings((key) => defaults.get(key));
  assert.equal(sent.model, null);
  assert.equal(sent.device, null);
  assert.equal(sent.dtype, null);
  assert.equal(sent.lookahead, "auto");
  assert.equal(sent.maxTokens, 128);
  assert.deepEqual(sent.engine, { socket: null, tcp: null, tokenFile: null });
  assert.deepEqual(sent.stop, { blockEnd: true, suffixOverlap: true, lineEnd: true });
  assert.equal((sent.remote as Record<string, unknown>).timeoutS, 30);
  for (const key of CLIENT_KEYS) {
    assert.ok(!(key.split(".")[0] in sent), `${key} is the extension's own setting`);
  }
});

test("user values pass through unchanged", () => {
  // Catches: values dropped, renamed or coerced on the way (the server validates them itself).
  const user: Record<string, unknown> = {
    model: "~/models/qwen.gguf", device: "cuda", dtype: "bf16", decoding: "ar", maxLines: 3,
    "engine.socket": "/tmp/e.sock", "remote.url": "http://127.0.0.1:8000", "remote.apiKey": "k",
  };
  const sent = serverSettings((key) => (key in user ? user[key] : defaults.get(key)));
  assert.equal(sent.model, "~/models/qwen.gguf");
  assert.equal(sent.device, "cuda");
  assert.equal(sent.dtype, "bf16");
  assert.equal(sent.decoding, "ar");
  assert.equal(sent.maxLines, 3);
  assert.equal((sent.engine as Record<string, unknown>).socket, "/tmp/e.sock");
  assert.deepEqual(sent.remote, { url: "http://127.0.0.1:8000", apiKey: "k", model: null, timeoutS: 30, qwenLayout: true });
});

test("a setting the user did not set goes as null: the server's own default", () => {
  // Catches: package.json's defaults overriding the server's, or a removed value staying in effect there.
  const sent = serverSettings((key) => (key === "maxTokens" ? 7 : undefined));
  assert.equal(sent.maxTokens, 7);
  assert.equal(sent.decoding, null);
  assert.equal(sent.repoContext, null);
  assert.deepEqual(sent.stop, { blockEnd: null, suffixOverlap: null, lineEnd: null });
  assert.ok(!("undefined" in sent) && Object.values(sent).every((value) => value !== undefined));
});

test("only the server's command line needs a new server process", () => {
  // Catches: restarting the server (and its engine) on every settings change, or not on a new serverPath.
  assert.equal(needsRestart((key) => key === "pythonPath"), true);
  assert.equal(needsRestart((key) => key === "serverPath"), true);
  assert.equal(needsRestart((key) => key === "maxTokens" || key === "model"), false);
});
