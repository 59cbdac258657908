/**
 * What the status bar item says: starting, the model loading (with the percentage the server's
 * `$/progress` gives), ready with the last completion's latency, off, or an error.
 *
 * Pure: the extension feeds it events and renders `view(...)`; the tests check the transitions.
 */

export type State =
  | { kind: "starting" }
  | { kind: "loading"; message: string; percentage?: number }
  | { kind: "ready"; latencyMs?: number }
  | { kind: "error"; message: string };

/** A `$/progress` value (WorkDoneProgressBegin / Report / End). */
export interface Progress {
  kind: "begin" | "report" | "end";
  title?: string;
  message?: string;
  percentage?: number;
}

export interface View {
  text: string;
  tooltip: string;
  error: boolean;
}

/** The server ends its start progress with "ready" when the engine answers (lsp_server/backends.py). */
const READY = "ready";

export function onProgress(state: State, progress: Progress): State {
  if (progress.kind === "end") {
    if (progress.message === READY) {
      return { kind: "ready" };
    }
    // "failed" is followed by the error itself (window/showMessage); keep what was shown until then.
    return state.kind === "error" ? state : { kind: "loading", message: progress.message ?? "" };
  }
  const message = progress.message ?? (state.kind === "loading" ? state.message : progress.title ?? "");
  return { kind: "loading", message, percentage: progress.percentage };
}

/** A completion came back after `latencyMs`: the engine works, whatever was shown before. */
export function onCompletion(state: State, latencyMs: number): State {
  return state.kind === "loading" && state.message !== READY ? state : { kind: "ready", latencyMs };
}

/** What the backend part of `ahead/status` says while the server starts: connecting to a running engine (or
 * using a remote server) sends no progress, so the extension asks. A remote backend has no state: it is asked
 * per request. */
export function onStatus(state: State, backend: Record<string, any>): State {
  if (state.kind !== "starting" && state.kind !== "loading") {
    return state;
  }
  if (backend.state === "connected" || (backend.state === undefined && backend.url)) {
    return { kind: "ready" };
  }
  if (String(backend.state ?? "").startsWith("unavailable")) {
    return { kind: "error", message: `ahead: ${backend.error ?? backend.state}` };
  }
  const told = backend.state && backend.state !== "not started"; // the server has not made its backend yet
  return state.kind === "starting" && told ? { kind: "loading", message: String(backend.state) } : state;
}

export function formatMs(ms: number): string {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
}

export function view(state: State, enabled: boolean): View {
  const off = enabled ? "" : " (off)";
  const hint = enabled ? "" : "\nCompletions are off: ahead: Toggle Completions turns them on.";
  switch (state.kind) {
    case "starting":
      return { text: `$(loading~spin) ahead${off}`, tooltip: `ahead: starting the language server${hint}`, error: false };
    case "loading": {
      const percent = state.percentage === undefined ? "" : ` ${Math.round(state.percentage)}%`;
      return { text: `$(loading~spin) ahead${percent}${off}`, tooltip: `ahead: loading the model: ${state.message}${hint}`,
               error: false };
    }
    case "ready": {
      const latency = state.latencyMs === undefined ? "" : ` ${formatMs(state.latencyMs)}`;
      const last = state.latencyMs === undefined ? "" : `; the last completion took ${formatMs(state.latencyMs)}`;
      return { text: `${enabled ? "$(check)" : "$(circle-slash)"} ahead${latency}${off}`,
               tooltip: `ahead: ready${last}${hint}`, error: false };
    }
    case "error":
      return { text: `$(error) ahead${off}`, tooltip: `${state.message}\nClick for the status, or see ahead: Show Log.`,
               error: true };
  }
}

/** A one-line summary of the server's `ahead/status` answer (lsp_server/server.py) for a notification. */
export function statusSummary(status: { server?: Record<string, any>; backend?: Record<string, any> }): string {
  const server = status.server ?? {};
  const backend = status.backend ?? {};
  const model = backend.model ?? server.settings?.model ?? "the default model";
  const where = backend.endpoint ? `engine on ${backend.endpoint}` : backend.url ? `remote ${backend.url}` : "no backend";
  const state = backend.state ?? (backend.url ? "remote" : "unknown");
  const device = backend.device ? ` on ${backend.device}` : "";
  const parts = [`${model}${device}`, `${where}: ${state}`, `${server.requests ?? 0} requests`,
                 `${server.type_through_hits ?? 0} answered by type-through`, `${server.errors ?? 0} errors`];
  if (backend.error) {
    parts.push(`last error: ${backend.error}`);
  }
  return `ahead: ${parts.join("; ")}`;
}
