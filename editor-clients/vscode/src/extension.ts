/**
 * The VS Code side of ahead: starts `ahead lsp` over stdio with vscode-languageclient, whose inline
 * completion feature turns the server's `textDocument/inlineCompletion` answers into ghost text.
 *
 * Around that: settings sent to the server (settings.ts), a status bar item fed by the server's
 * `$/progress`, its messages and the latency of each completion (status.ts), and the commands.
 * Accepting is VS Code's own: Tab (whole), acceptNextWord / acceptNextLine (keys in package.json).
 */

import { execFile } from "node:child_process";
import * as fs from "node:fs";
import { performance } from "node:perf_hooks";
import * as readline from "node:readline";
import * as vscode from "vscode";
import {
  CloseAction, DidChangeConfigurationNotification, ErrorAction, type FeatureState, LanguageClient,
  type LanguageClientOptions, MessageType, ResponseError, ShowMessageNotification, type StaticFeature,
  WorkDoneProgress, WorkDoneProgressCreateRequest,
} from "vscode-languageclient/node";

import { describe, engineStop, findOnPath, type Launch, logLevel, serverLaunch, startFailure } from "./launch";
import { needsRestart, serverSettings } from "./settings";
import { onCompletion, onProgress, onStatus, type Progress, type State, statusSummary, view } from "./status";

const STATUS_REQUEST = "ahead/status";
const STDERR_LINES = 30; // kept to explain a start that fails
const RESTARTS = 4; // a server that crashes more often than this in RESTART_WINDOW_MS is not started again
const RESTART_WINDOW_MS = 3 * 60 * 1000;
const POLL_MS = 2000; // while the engine starts, ask the server how far it got (progress covers only a launch)

function isExecutable(file: string): boolean {
  try {
    fs.accessSync(file, fs.constants.X_OK);
    return fs.statSync(file).isFile();
  } catch {
    return false;
  }
}

function config(): vscode.WorkspaceConfiguration {
  return vscode.workspace.getConfiguration("ahead");
}

/** The settings the user set (in any scope; the most specific wins), as the server's settings object. */
function currentSettings(): Record<string, unknown> {
  const ahead = config();
  return serverSettings((key) => {
    const set = ahead.inspect(key);
    return set?.workspaceFolderValue ?? set?.workspaceValue ?? set?.globalValue;
  });
}

/** `$/progress` of the tokens the server creates (the engine loading) goes to the status bar. Registered after
 * the client's own progress feature, so its `window/workDoneProgress/create` handler is the one in effect. */
class ProgressInStatusBar implements StaticFeature {
  constructor(private readonly client: LanguageClient, private readonly show: (progress: Progress) => void) {}

  getState(): FeatureState {
    return { kind: "static" };
  }

  fillClientCapabilities(capabilities: { window?: { workDoneProgress?: boolean } }): void {
    (capabilities.window ??= {}).workDoneProgress = true;
  }

  initialize(): void {
    this.client.onRequest(WorkDoneProgressCreateRequest.type, ({ token }) => {
      const listening = this.client.onProgress(WorkDoneProgress.type, token, (value) => {
        this.show(value);
        if (value.kind === "end") {
          listening.dispose();
        }
      });
    });
  }

  clear(): void {}
}

class Ahead implements vscode.Disposable {
  private client: LanguageClient | undefined;
  private launch: Launch | undefined;
  private state: State = { kind: "starting" };
  private stderr: string[] = [];
  private crashes: number[] = [];
  private serving = false; // the server answered initialize: a crash from now on restarts it
  private poll: NodeJS.Timeout | undefined;
  private readonly item: vscode.StatusBarItem;
  readonly log: vscode.LogOutputChannel;

  constructor() {
    this.log = vscode.window.createOutputChannel("ahead", { log: true });
    this.item = vscode.window.createStatusBarItem("ahead.status", vscode.StatusBarAlignment.Right, 100);
    this.item.name = "ahead";
    this.item.command = "ahead.showStatus";
    this.render();
    this.item.show();
  }

  get enabled(): boolean {
    return config().get<boolean>("enable", true);
  }

  render(): void {
    const shown = view(this.state, this.enabled);
    this.item.text = shown.text;
    this.item.tooltip = shown.tooltip;
    this.item.accessibilityInformation = { label: shown.tooltip };
    this.item.backgroundColor = shown.error ? new vscode.ThemeColor("statusBarItem.errorBackground") : undefined;
  }

  private setState(state: State): void {
    this.state = state;
    this.render();
    const waiting = state.kind === "starting" || state.kind === "loading";
    if (waiting && this.poll === undefined) {
      this.poll = setInterval(() => void this.refresh(), POLL_MS);
    } else if (!waiting && this.poll !== undefined) {
      clearInterval(this.poll);
      this.poll = undefined;
    }
  }

  /** Ask the server how the start goes (status.ts onStatus). */
  private async refresh(): Promise<void> {
    const status = await this.status().catch(() => undefined);
    if (status?.backend) {
      this.setState(onStatus(this.state, status.backend));
    }
  }

  async status(): Promise<any> {
    if (!this.client?.isRunning()) {
      throw new Error("the language server is not running");
    }
    return this.client.sendRequest(STATUS_REQUEST, {});
  }

  private options(launch: Launch): LanguageClientOptions {
    return {
      documentSelector: [{ scheme: "file" }, { scheme: "untitled" }],
      outputChannel: this.log,
      initializationOptions: currentSettings,
      initializationFailedHandler: () => false, // start() rejects; start() tells the user why
      stdioOptions: {
        stdout: (input) => readline.createInterface({ input }).on("line", (line) => this.log.info(line)),
        stderr: (input) => readline.createInterface({ input }).on("line", (line) => {
          this.stderr = [...this.stderr.slice(1 - STDERR_LINES), line];
          this.log[logLevel(line)](line);
        }),
      },
      errorHandler: {
        error: (_error, _message, count) => ({ action: (count ?? 0) <= 3 ? ErrorAction.Continue : ErrorAction.Shutdown }),
        closed: () => {
          if (!this.serving) {
            return { action: CloseAction.DoNotRestart, handled: true }; // start() tells the user why
          }
          const now = Date.now();
          this.crashes = [...this.crashes.filter((at) => now - at < RESTART_WINDOW_MS), now];
          if (this.crashes.length <= RESTARTS) {
            this.setState({ kind: "starting" });
            return { action: CloseAction.Restart, handled: true };
          }
          const message = `ahead: the language server (${describe(launch)}) stopped ${this.crashes.length} times `
            + "in 3 minutes and is not started again; see ahead: Show Log, then ahead: Restart.";
          this.setState({ kind: "error", message });
          return { action: CloseAction.DoNotRestart, message };
        },
      },
      middleware: {
        provideInlineCompletionItems: async (document, position, context, token, next) => {
          if (!this.enabled) {
            return null;
          }
          const asked = performance.now();
          const result = await next(document, position, context, token);
          if (!token.isCancellationRequested) {
            this.setState(onCompletion(this.state, performance.now() - asked));
          }
          return result;
        },
        // The ghost text shows the completion; the server's plain item is for editors without inline completion.
        provideCompletionItem: () => undefined,
        workspace: {
          configuration: async (params, token, next) => {
            const answers = await next(params, token);
            if (answers instanceof ResponseError) {
              return answers;
            }
            return params.items.map((item, i) => (item.section === "ahead" ? currentSettings() : answers[i]));
          },
        },
      },
    };
  }

  async start(): Promise<void> {
    const ahead = config();
    const launch = serverLaunch(ahead.get("serverPath", ""), ahead.get("pythonPath", ""),
                                (name) => findOnPath(name, process.env.PATH ?? "", isExecutable));
    this.launch = launch;
    this.stderr = [];
    this.serving = false;
    this.setState({ kind: "starting" });
    this.log.info(`starting ${describe(launch)}`);
    // No `transport`: with TransportKind.stdio the client would add a --stdio argument that `ahead lsp` refuses.
    const client = new LanguageClient("ahead", "ahead", { command: launch.command, args: launch.args },
                                      this.options(launch));
    client.registerFeature(new ProgressInStatusBar(client, (progress) => this.setState(onProgress(this.state, progress))));
    client.onNotification(ShowMessageNotification.type, ({ type, message }) => {
      if (type === MessageType.Error) {
        this.setState({ kind: "error", message });
        void vscode.window.showErrorMessage(message, "Show Log").then((pick) => pick && this.log.show());
      } else if (type === MessageType.Warning) {
        void vscode.window.showWarningMessage(message);
      } else {
        void vscode.window.showInformationMessage(message);
      }
    });
    this.client = client;
    try {
      await client.start();
    } catch (error) {
      const message = startFailure(launch, error instanceof Error ? error.message : String(error), this.stderr);
      this.log.error(message);
      this.setState({ kind: "error", message });
      void vscode.window.showErrorMessage(message, "Open Settings", "Show Log").then((pick) => {
        if (pick === "Open Settings") {
          void vscode.commands.executeCommand("workbench.action.openSettings", "ahead.");
        } else if (pick === "Show Log") {
          this.log.show();
        }
      });
      return;
    }
    this.serving = true;
    await this.refresh();
  }

  async stop(): Promise<void> {
    const client = this.client;
    this.client = undefined;
    if (client?.needsStop()) {
      await client.stop(10_000).catch((error) => this.log.warn(`stopping the language server: ${error}`));
    }
  }

  /** The server has no restart request: stop it (it stops the engine it started if no other editor uses it),
   * stop the local engine in any case (`ahead engine --stop`; other editors' servers start it again when they
   * next need it), and start a new server, which starts a new engine with the current settings. */
  async restart(): Promise<void> {
    this.crashes = [];
    await this.stop();
    const ahead = config();
    const stopping = this.launch && engineStop(this.launch, ahead.get("engine.socket", ""), ahead.get("engine.tcp", ""),
                                               ahead.get("remote.url", ""));
    if (stopping) {
      await new Promise<void>((done) => execFile(stopping.command, stopping.args, { timeout: 30_000 }, (error, _out, err) => {
        // "no engine answers" is the usual outcome: the server stopped the engine it started.
        this.log.info(`${describe(stopping)}: ${error ? err.trim() || error.message : "stopped"}`);
        done();
      }));
    }
    await this.start();
  }

  async configurationChanged(event: vscode.ConfigurationChangeEvent): Promise<void> {
    if (!event.affectsConfiguration("ahead")) {
      return;
    }
    if (needsRestart((key) => event.affectsConfiguration(`ahead.${key}`))) {
      await this.restart();
      return;
    }
    this.render();
    if (this.client?.isRunning()) {
      await this.client.sendNotification(DidChangeConfigurationNotification.type, { settings: { ahead: currentSettings() } });
    }
  }

  dispose(): void {
    if (this.poll !== undefined) {
      clearInterval(this.poll);
    }
    this.item.dispose();
    this.log.dispose();
  }
}

let ahead: Ahead | undefined;

export function activate(context: vscode.ExtensionContext): void {
  const extension = new Ahead();
  ahead = extension;
  context.subscriptions.push(
    extension,
    vscode.commands.registerCommand("ahead.restart", () => extension.restart()),
    vscode.commands.registerCommand("ahead.toggle", async () => {
      await config().update("enable", !extension.enabled, vscode.ConfigurationTarget.Global);
      extension.render();
    }),
    vscode.commands.registerCommand("ahead.showStatus", async () => {
      try {
        const status = await extension.status();
        extension.log.info(`ahead/status: ${JSON.stringify(status, null, 2)}`);
        const pick = await vscode.window.showInformationMessage(statusSummary(status), "Show Log");
        if (pick) {
          extension.log.show();
        }
      } catch (error) {
        void vscode.window.showErrorMessage(`ahead: no status: ${error instanceof Error ? error.message : error}`);
      }
    }),
    vscode.commands.registerCommand("ahead.showLog", () => extension.log.show()),
    vscode.workspace.onDidChangeConfiguration((event) => extension.configurationChanged(event)),
  );
  void extension.start();
}

export async function deactivate(): Promise<void> {
  await ahead?.stop();
  ahead = undefined;
}
