-- Drives a real headless Neovim through the ahead plugin the way a user does: keys go in with nvim_input
-- (under `-l` typed keys fire no autocmds, so this runs with `-c 'luafile ...'`), and the ghost text is read
-- back from the extmarks the user would see. Everything observed goes to a JSON report; the Python test
-- (tests/test_nvim_plugin.py) judges it against the in-process engine.
local cfg = vim.json.decode(table.concat(vim.fn.readfile(os.getenv("AHEAD_NVIM_TEST")), "\n"))
vim.opt.runtimepath:prepend(cfg.plugin)
vim.cmd("filetype indent off") -- the indent script re-indents on some typed characters

local report = { steps = {}, latencies_ms = {}, misses = 0 }
local ns = vim.api.nvim_create_namespace(cfg.mode == "native" and "nvim.lsp.inline_completion" or "ahead.ghost")
local co

local function now_ms()
  return vim.uv.hrtime() / 1e6
end

local function sleep(ms)
  vim.defer_fn(function()
    assert(coroutine.resume(co))
  end, ms)
  coroutine.yield()
end

local function wait_for(predicate, timeout_ms)
  local deadline = now_ms() + timeout_ms
  while not predicate() do
    if now_ms() > deadline then
      return false
    end
    sleep(2)
  end
  return true
end

--- The ghost text on screen: the first line's inline chunks, then the virtual lines below it.
local function ghost()
  local marks = vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true })
  if #marks == 0 then
    return nil
  end
  local details = marks[1][4]
  local function join(chunks)
    local out = {}
    for _, chunk in ipairs(chunks or {}) do
      out[#out + 1] = chunk[1]
    end
    return table.concat(out)
  end
  local lines = { join(details.virt_text) }
  for _, line in ipairs(details.virt_lines or {}) do
    lines[#lines + 1] = join(line)
  end
  return table.concat(lines, "\n")
end

local function buffer_text()
  return table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), "\n") .. "\n"
end

--- The document around the cursor, as the language server sees it (Neovim adds the final line break).
local function around()
  local lines = vim.api.nvim_buf_get_lines(0, 0, -1, false)
  local row, col = unpack(vim.api.nvim_win_get_cursor(0))
  local before = { unpack(lines, 1, row - 1) }
  before[#before + 1] = lines[row]:sub(1, col)
  local after = { lines[row]:sub(col + 1), unpack(lines, row + 1) }
  return table.concat(before, "\n"), table.concat(after, "\n") .. "\n"
end

local function press(keys)
  vim.api.nvim_input(keys)
end

--- Wait for ghost text; the step records it with the text around the cursor it belongs to.
local function wait_ghost(timeout_ms)
  if not wait_for(ghost, timeout_ms or 15000) then
    return nil
  end
  local prefix, suffix = around()
  return { ghost = ghost(), prefix = prefix, suffix = suffix }
end

--- Dismiss what is shown, type one character that does not start the shown text (so the engine, not the
--- type-through cache, answers) and time the keystroke to the ghost text; a state the engine answers with
--- nothing counts as a miss.
local function timed_keystroke()
  local shown = ghost() or ""
  local char = cfg.keys:sub(1, 1)
  for i = 1, #cfg.keys do
    char = cfg.keys:sub(i, i)
    if shown:sub(1, 1) ~= char then
      break
    end
  end
  if shown ~= "" then
    press(cfg.keymaps.dismiss)
    wait_for(function()
      return ghost() == nil
    end, 2000)
  end
  local started = now_ms()
  press(char)
  local step = wait_ghost(3000)
  if step then
    report.latencies_ms[#report.latencies_ms + 1] = now_ms() - started
  else
    report.misses = report.misses + 1
  end
  return step
end

--- Press a key on a shown suggestion and record the buffer once it changed.
local function accept(name, key, step)
  local tick = vim.api.nvim_buf_get_changedtick(0)
  press(key)
  wait_for(function()
    return vim.api.nvim_buf_get_changedtick(0) ~= tick
  end, 5000)
  step.action, step.after = name, buffer_text()
  report.steps[#report.steps + 1] = step
end

local function client()
  return vim.lsp.get_clients({ name = "ahead", bufnr = 0 })[1]
end

--- The server connects to the engine after `initialized`; until then it answers with no items.
local function wait_connected()
  assert(wait_for(function()
    return client() and client().initialized
  end, 30000), "the language server did not start")
  assert(wait_for(function()
    local status = require("ahead.status").ask(client())
    return status and status.backend.state == "connected"
  end, 30000), "the language server did not connect to the engine")
end

local function run()
  assert(require("ahead").setup({ cmd = cfg.cmd, init_options = cfg.init_options, ghost_text = cfg.mode }))
  vim.cmd.edit(cfg.file)
  wait_connected()
  report.client_id = client().id
  press("GA") -- insert mode at the end of the last line
  report.first = wait_ghost()

  -- Keystroke -> ghost text, then accept all of the engine's answer.
  local last
  while #report.latencies_ms < cfg.keystrokes and report.misses < cfg.keystrokes do
    last = timed_keystroke() or last
  end
  assert(last, "no ghost text after any keystroke")
  accept("all", cfg.keymaps.accept, wait_ghost())

  -- The next word, then the next line, of whatever is shown next.
  local step = wait_ghost()
  if step then
    accept("word", cfg.keymaps.accept_word, step)
    step = wait_ghost()
  end
  if step then
    accept("line", cfg.keymaps.accept_line, step)
  end

  -- Dismiss: the ghost goes and stays gone; then the accept key is an ordinary key again.
  step = wait_ghost()
  if step then
    local before = buffer_text()
    press(cfg.keymaps.dismiss)
    report.dismissed = wait_for(function()
      return ghost() == nil
    end, 2000)
    sleep(600)
    report.after_dismiss = { ghost = ghost() or vim.NIL, unchanged = buffer_text() == before }
    local line = vim.api.nvim_get_current_line()
    local tick = vim.api.nvim_buf_get_changedtick(0)
    press(cfg.keymaps.accept)
    wait_for(function()
      return vim.api.nvim_buf_get_changedtick(0) ~= tick
    end, 2000)
    report.plain_key = { before = line, after = vim.api.nvim_get_current_line() }
  end

  if cfg.restart then
    local old = client().id
    vim.cmd("AheadRestart")
    report.restarted = wait_for(function()
      return client() and client().id ~= old and client().initialized
    end, 30000)
    wait_connected()
  end

  -- One more keystroke the engine answers, accepted whole.
  local final = timed_keystroke()
  if final then
    accept("all", cfg.keymaps.accept, final)
  end

  report.status = vim.api.nvim_exec2("AheadStatus", { output = true }).output
  if cfg.health then
    press("<Esc>")
    sleep(50)
    vim.cmd("checkhealth ahead")
    report.health = table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), "\n")
  end
end

co = coroutine.create(function()
  local ok, err = xpcall(run, debug.traceback)
  report.error = not ok and err or nil
  report.messages = vim.api.nvim_exec2("messages", { output = true }).output
  vim.fn.writefile({ vim.json.encode(report) }, cfg.out)
  vim.cmd("qa!")
end)
vim.schedule(function()
  assert(coroutine.resume(co))
end)
