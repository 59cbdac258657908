// Drives VS Code (code-server) in headless Chromium the way a user would, for tests/test_vscode_e2e.py.
//
// node e2e/drive.mjs '<json>' with {url, file, keys, out, chromium, wordKey, aheadHome, timeoutMs}: opens
// `file` (in the workspace code-server serves at `url`), waits for the extension's status item to say ready,
// goes to the end of the file, then for each character of `keys`: Escape (no ghost text), the key, and the
// time from its keydown to ghost text in the DOM. Then the next-word key and Tab, each followed by a save
// and the file read back from disk. Then the commands: Show Status, Toggle Completions (no ghost text while
// off) and Restart (a new `ahead lsp` process, found by its AHEAD_HOME, a new engine, and ghost text again).
// Prints one JSON object; screenshots go to `out`.

import { readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const options = JSON.parse(process.argv[2]);
const timeout = options.timeoutMs ?? 60_000;
const GHOST = ".ghost-text-decoration, .ghost-text";
const STATUS = '[aria-label^="ahead: "]';

/** In the page: when the last keydown happened and when ghost text next appeared after it. */
function watchGhostText(selector) {
  window.__keyAt = 0;
  window.__ghostAt = 0;
  addEventListener("keydown", () => { window.__keyAt = performance.now(); window.__ghostAt = 0; }, true);
  const seen = () => [...document.querySelectorAll(selector)].some((node) => node.textContent.trim() !== "");
  new MutationObserver(() => {
    if (window.__keyAt && !window.__ghostAt && seen()) {
      window.__ghostAt = performance.now();
    }
  }).observe(document.body, { subtree: true, childList: true, characterData: true });
}

/** Save, and the file as read back once the editor has written it (changed, and the same twice in a row). */
async function saved(page, before) {
  await page.keyboard.press("Control+S");
  await page.waitForSelector(".tab.active:not(.dirty)");
  const deadline = Date.now() + 10_000;
  let last = null;
  while (Date.now() < deadline) {
    const text = readFileSync(options.file, "utf8");
    if (text !== before && text === last) {
      return text;
    }
    last = text;
    await page.waitForTimeout(100);
  }
  return readFileSync(options.file, "utf8");
}

/** Run a command from the command palette by its title. */
async function command(page, title) {
  await page.keyboard.press("Control+Shift+P");
  await page.waitForSelector(".quick-input-widget:not([style*='display: none']) input");
  await page.keyboard.type(title);
  await page.waitForSelector(`.quick-input-list .monaco-list-row[aria-label*="${title}"]`);
  await page.keyboard.press("Enter");
}

/** The pids of the `ahead lsp` processes this test's code-server started (their environment names its AHEAD_HOME). */
function languageServers() {
  const pids = [];
  for (const pid of readdirSync("/proc").filter((name) => /^\d+$/.test(name))) {
    try {
      const args = readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
      const env = readFileSync(`/proc/${pid}/environ`, "utf8").split("\0");
      if (args.includes("engine.cli") && args.includes("lsp") && env.includes(`AHEAD_HOME=${options.aheadHome}`)) {
        pids.push(Number(pid));
      }
    } catch {
      // the process ended meanwhile
    }
  }
  return pids;
}

async function statusLabel(page) {
  return page.getAttribute(STATUS, "aria-label");
}

async function ghostAfterTyping(page, key, waitMs) {
  await page.keyboard.press("Escape");
  await page.waitForFunction((s) => !document.querySelector(s), GHOST);
  await page.keyboard.type(key);
  return page.waitForSelector(GHOST, { timeout: waitMs }).then(() => true, () => false);
}

const browser = await chromium.launch({
  executablePath: options.chromium,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"],
});
const report = { latenciesMs: [], missed: 0, messages: [] };
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 720 } });
  page.setDefaultTimeout(timeout);
  page.on("console", (message) => {
    if (message.type() === "error") {
      report.messages.push(message.text().slice(0, 300));
    }
  });
  await page.goto(options.url);
  await page.waitForSelector(".monaco-workbench .part.editor");

  // Quick Open the file, then wait for the extension to be ready (the language server answered, the engine too).
  const name = options.file.split("/").pop();
  await page.keyboard.press("Control+P");
  await page.waitForSelector(".quick-input-widget:not([style*='display: none']) input");
  await page.keyboard.type(name);
  await page.waitForSelector(`.quick-input-list .monaco-list-row[aria-label*="${name}"]`);
  await page.keyboard.press("Enter");
  await page.waitForSelector(`.tab[aria-label^="${name}"]`);
  await page.waitForSelector(".monaco-editor.focused textarea");
  try {
    // Ready, or an error (its icon): the report then says which.
    await page.waitForFunction((s) => {
      const item = document.querySelector(s);
      return item && (item.getAttribute("aria-label").startsWith("ahead: ready") || item.querySelector(".codicon-error"));
    }, STATUS);
  } finally {
    report.statusAtStart = await page.getAttribute(STATUS, "aria-label").catch(() => null);
  }
  if (!report.statusAtStart.startsWith("ahead: ready")) {
    throw new Error("the extension did not become ready");
  }

  await page.evaluate(watchGhostText, GHOST);
  await page.keyboard.press("Control+End");
  for (const key of options.keys) {
    await page.keyboard.press("Escape");
    await page.waitForFunction((s) => !document.querySelector(s), GHOST);
    await page.keyboard.type(key);
    try {
      await page.waitForFunction(() => window.__ghostAt > 0, null, { timeout: 20_000, polling: "raf" });
      report.latenciesMs.push(await page.evaluate(() => window.__ghostAt - window.__keyAt));
    } catch {
      report.missed += 1;
    }
  }
  await page.waitForSelector(GHOST);
  report.ghostText = await page.$$eval(GHOST, (nodes) => nodes.map((node) => node.textContent).join("\n"));
  report.statusAfterTyping = await page.getAttribute(STATUS, "aria-label");
  await page.screenshot({ path: join(options.out, "ghost-text.png") });

  const typed = await saved(page, readFileSync(options.file, "utf8"));
  report.typed = typed;
  await page.keyboard.press(options.wordKey);
  report.afterWord = await saved(page, typed);
  await page.waitForSelector(GHOST); // the rest of the suggestion stays
  await page.keyboard.press("Tab");
  report.afterTab = await saved(page, report.afterWord);
  await page.screenshot({ path: join(options.out, "accepted.png") });

  await command(page, "ahead: Show Status");
  const toast = await page.waitForSelector('.notification-toast:has-text("requests")');
  report.statusMessage = (await toast.textContent()).trim();

  await command(page, "ahead: Toggle Completions");
  await page.waitForFunction((s) => document.querySelector(s)?.getAttribute("aria-label").includes("are off"), STATUS);
  report.statusWhenOff = await statusLabel(page);
  report.ghostWhenOff = await ghostAfterTyping(page, "x", 3000);
  await command(page, "ahead: Toggle Completions");
  await page.waitForFunction((s) => !document.querySelector(s)?.getAttribute("aria-label").includes("are off"), STATUS);

  report.serversBefore = languageServers();
  await command(page, "ahead: Restart the Engine and Language Server");
  const deadline = Date.now() + timeout;
  const replaced = (pids) => pids.length > 0 && pids.every((pid) => !report.serversBefore.includes(pid));
  report.statusesDuringRestart = [];
  for (;;) { // every status the item shows until the new server and engine are ready (the engine's progress)
    const label = await statusLabel(page);
    if (label !== report.statusesDuringRestart.at(-1)) {
      report.statusesDuringRestart.push(label);
    }
    report.serversAfter = languageServers();
    const restarted = report.statusesDuringRestart.some((seen) => !seen.startsWith("ahead: ready"));
    if ((replaced(report.serversAfter) && restarted && label.startsWith("ahead: ready")) || Date.now() > deadline) {
      break;
    }
    await page.waitForTimeout(50);
  }
  report.ghostAfterRestart = await ghostAfterTyping(page, "y", 20_000);
} catch (error) {
  report.error = String(error?.stack ?? error);
  const [page] = browser.contexts()[0]?.pages() ?? [];
  if (page) {
    await page.screenshot({ path: join(options.out, "failure.png") }).catch(() => {});
    writeFileSync(join(options.out, "failure.html"), await page.content().catch(() => ""));
  }
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));
