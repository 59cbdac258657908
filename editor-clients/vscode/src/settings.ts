/**
 * VS Code's `ahead.*` settings as the language server's settings object (lsp_server/settings.py).
 *
 * Pure: the extension passes the values the user set, the tests a plain map. Only those are sent; every
 * other key goes as null, which the server reads as "my default": its defaults stay the only ones (the
 * defaults in package.json are what the Settings UI shows), and a value the user removes is reset there.
 * The server takes VS Code's camelCase names as they are and validates the values itself (a bad one is
 * reported back and ignored), so this module only chooses the keys and maps "unset" to null.
 */

/** The value the user set for a key under `ahead.` (e.g. `engine.socket`); undefined when none is set. */
export type Read = (key: string) => unknown;

/** The settings the server reads, by their key under `ahead.`: dotted keys become nested objects. */
export const SERVER_KEYS = [
  "model", "device", "dtype", "decoding", "lookahead", "maxTokens", "maxLines", "debounceMs",
  "stop.blockEnd", "stop.suffixOverlap", "stop.lineEnd", "prefetch", "repoContext", "contextTokens",
  "engine.socket", "engine.tcp", "engine.tokenFile",
  "remote.url", "remote.apiKey", "remote.model", "remote.timeoutS", "remote.qwenLayout",
] as const;

/** The settings only the extension reads. */
export const CLIENT_KEYS = ["enable", "serverPath", "pythonPath", "trace.server"] as const;

/** A VS Code string setting cannot be null: these values mean "the server's default" (JSON null there). */
const UNSET: Record<string, readonly string[]> = { device: ["", "auto"], dtype: ["", "auto"] };

function unset(key: string, value: unknown): boolean {
  return typeof value === "string" && (UNSET[key] ?? [""]).includes(value.trim());
}

/** The object sent as initializationOptions, answered to workspace/configuration and sent on a change. */
export function serverSettings(read: Read): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const key of SERVER_KEYS) {
    const value = read(key);
    const path = key.split(".");
    let node = out;
    for (const part of path.slice(0, -1)) {
      node = (node[part] ??= {}) as Record<string, unknown>;
    }
    node[path[path.length - 1]] = value === undefined || unset(key, value) ? null : value;
  }
  return out;
}

/** Whether a change of these settings needs a new server process (the others reach the running one). */
export function needsRestart(changed: (key: string) => boolean): boolean {
  return changed("serverPath") || changed("pythonPath");
}
