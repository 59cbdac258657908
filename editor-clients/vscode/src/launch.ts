/**
 * How `ahead lsp` is started, and what to tell the user when it cannot be.
 *
 * Pure (the file system and PATH are passed in) so that the order of choices and the messages are
 * unit-tested: an explicit `ahead.serverPath`, then `ahead.pythonPath -m engine.cli lsp`, then
 * `ahead` on PATH, then `python3 -m engine.cli lsp`.
 */

import * as path from "node:path";

export interface Launch {
  command: string;
  args: string[];
}

export const MODULE_ARGS = ["-m", "engine.cli", "lsp"];
export const INSTALL = "pip install 'ahead[lsp]' (from a checkout of ahead: pip install -e '.[lsp]')";

/** The first executable `name` in a PATH-style list of folders. */
export function findOnPath(name: string, pathList: string, isExecutable: (file: string) => boolean,
                           delimiter: string = path.delimiter): string | undefined {
  for (const folder of pathList.split(delimiter)) {
    const file = folder && path.join(folder, name);
    if (file && isExecutable(file)) {
      return file;
    }
  }
  return undefined;
}

export function serverLaunch(serverPath: string, pythonPath: string,
                             find: (name: string) => string | undefined): Launch {
  if (serverPath.trim()) {
    return { command: serverPath.trim(), args: ["lsp"] };
  }
  if (pythonPath.trim()) {
    return { command: pythonPath.trim(), args: MODULE_ARGS };
  }
  const ahead = find("ahead");
  if (ahead) {
    return { command: ahead, args: ["lsp"] };
  }
  return { command: find("python3") ?? find("python") ?? "python3", args: MODULE_ARGS };
}

/**
 * `ahead engine --stop` run the way the server is (the same executable or Python), for the engine on the
 * configured Unix socket (empty: the default one); undefined when the completions come from an engine over
 * TCP or a remote server, which are not this machine's to stop.
 */
export function engineStop(launch: Launch, socket: string, tcp: string, remoteUrl: string): Launch | undefined {
  if (tcp.trim() || remoteUrl.trim()) {
    return undefined;
  }
  const base = launch.args[0] === "-m" ? launch.args.slice(0, 2) : [];
  return { command: launch.command, args: [...base, "engine", "--stop", ...(socket.trim() ? ["--socket", socket.trim()] : [])] };
}

export function describe(launch: Launch): string {
  return [launch.command, ...launch.args].join(" ");
}

/**
 * What the user is told when the server did not start: `error` is the start's error message, `stderr`
 * the last lines the process wrote. Each message says how to fix it.
 */
export function startFailure(launch: Launch, error: string, stderr: readonly string[]): string {
  const python = launch.args[0] === "-m";
  if (/ENOENT|not found/i.test(error)) {
    return `ahead: cannot start the language server: ${launch.command} was not found. Install ahead with `
      + `${INSTALL}, or set ahead.serverPath (the ahead executable) or ahead.pythonPath (a Python that has it).`;
  }
  if (python && stderr.some((line) => /No module named '?engine/.test(line))) {
    return `ahead: ahead is not installed for ${launch.command}. Install it with ${launch.command} -m ${INSTALL}, `
      + "or set ahead.pythonPath to a Python that has it.";
  }
  const told = [...stderr].reverse().find((line) => line.startsWith("ahead: error: "));
  if (told) {
    return `ahead: ${told.slice("ahead: error: ".length)}`;
  }
  return `ahead: the language server (${describe(launch)}) stopped before it started: ${error}. `
    + "See ahead: Show Log.";
}

/** The level of one of the server's log lines (`<date> <time> LEVEL logger: message`), for VS Code's log. */
export function logLevel(line: string): "error" | "warn" | "info" {
  const level = /^\S+ \S+ (ERROR|CRITICAL|WARNING|INFO|DEBUG) /.exec(line)?.[1];
  if (level === "ERROR" || level === "CRITICAL" || (!level && /Traceback|Error\b/.test(line))) {
    return "error";
  }
  return level === "WARNING" ? "warn" : "info";
}
