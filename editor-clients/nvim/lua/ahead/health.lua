--- :checkhealth ahead — what a user checks first when no ghost text shows: Neovim's version, the `ahead`
--- executable, the language server, and the engine behind it.
local status = require("ahead.status")

local M = {}

function M.check()
  local health = vim.health
  health.start("ahead")
  local v = vim.version()
  local nvim = ("Neovim %d.%d.%d"):format(v.major, v.minor, v.patch)
  if vim.fn.has("nvim-0.10") ~= 1 then
    health.error(nvim .. ": ahead.nvim needs 0.10 or newer")
    return
  end
  local ahead = require("ahead")
  local config = ahead.config
  if not config then
    health.warn(nvim .. "; setup() was not called", { "require('ahead').setup({})" })
    return
  end
  local native = vim.fn.has("nvim-0.12") == 1 and config.ghost_text ~= "extmark"
  health.ok(("%s: ghost text by %s"):format(nvim, native and "vim.lsp.inline_completion" or "extmarks"))

  local exe = config.cmd[1]
  if vim.fn.executable(exe) == 1 then
    health.ok(("%s found: %s"):format(exe, vim.fn.exepath(exe)))
  else
    health.error(("%s not found"):format(exe),
      { "pip install 'ahead[lsp]' (in a virtualenv: activate it first)", "or set cmd in require('ahead').setup()" })
  end

  local client = status.client()
  if not client then
    health.warn("the language server is not running",
      { ("open a file of a configured filetype (%s)"):format(table.concat(config.filetypes, ", ")), ":AheadRestart" })
    return
  end
  local buffers = vim.tbl_count(client.attached_buffers)
  health.ok(("language server running (client %d, root %s, %d buffers)"):format(client.id,
    tostring(client.root_dir or client.config.root_dir), buffers))

  local result, err = status.ask(client)
  if not result then
    health.error("no answer to ahead/status: " .. err)
    return
  end
  local backend = result.backend or {}
  local line = "engine: " .. status.backend_line(backend)
  if backend.state == "connected" or (backend.url and not backend.error) then
    health.ok(line)
  elseif backend.error then
    health.error(line, { "see the engine's log: " .. tostring(backend.log or "ahead engine --status") })
  else
    health.warn(line, { "the engine may still be loading: :AheadStatus shows its progress" })
  end
end

return M
