--- ahead for Neovim: starts `ahead lsp` for the configured filetypes and shows its completions as ghost
--- text, through Neovim's own inline completion (0.12+) or ahead's extmarks (0.10/0.11).
---
---   require("ahead").setup({ init_options = { model = "Qwen/Qwen2.5-Coder-1.5B" } })
local status = require("ahead.status")

local M = {}

M.defaults = {
  cmd = { "ahead", "lsp" },
  -- The server's settings (README, "The language server"): model, device, maxLines, debounceMs, remote, ...
  init_options = {},
  filetypes = {
    "python", "lua", "javascript", "javascriptreact", "typescript", "typescriptreact", "go", "rust", "c", "cpp",
    "cs", "java", "kotlin", "scala", "swift", "ruby", "php", "perl", "sh", "bash", "zsh", "sql", "r", "julia",
    "haskell", "ocaml", "elixir", "erlang", "zig", "nim", "dart", "vim", "html", "css", "scss", "vue", "svelte",
    "json", "yaml", "toml", "make", "cmake", "dockerfile", "markdown", "tex",
  },
  root_markers = { ".git", "pyproject.toml", "package.json", "Cargo.toml", "go.mod", "Makefile" },
  -- "native": vim.lsp.inline_completion (0.12+); "extmark": ahead's own; "auto": native where Neovim has it.
  ghost_text = "auto",
  -- Insert-mode keys; false turns one off. Each does its usual work when no suggestion is shown.
  keymaps = { accept = "<Tab>", accept_word = "<M-Right>", accept_line = "<M-C-Right>", dismiss = "<C-]>" },
}

---@type table? the merged options once setup() ran
M.config = nil

local function version()
  local v = vim.version()
  return ("%d.%d.%d"):format(v.major, v.minor, v.patch)
end

--- The ghost-text path for the config and this Neovim.
local function ghost()
  local native = vim.fn.has("nvim-0.12") == 1 and pcall(require, "vim.lsp.inline_completion")
  if M.config.ghost_text ~= "extmark" and native then
    return require("ahead.native")
  end
  return require("ahead.ghost")
end

local told_missing = false

--- Start (or reuse) the language server for a buffer; its root is the nearest marker's folder.
---@param bufnr integer
---@return integer? client_id
function M.start(bufnr)
  local config = assert(M.config, "ahead: call require('ahead').setup() first")
  if vim.bo[bufnr].buftype ~= "" then
    return nil
  end
  if vim.fn.executable(config.cmd[1]) ~= 1 then
    if not told_missing then
      told_missing = true
      vim.notify(("ahead: %s not found: pip install 'ahead[lsp]', or set cmd in require('ahead').setup()")
        :format(config.cmd[1]), vim.log.levels.ERROR)
    end
    return nil
  end
  local name = vim.api.nvim_buf_get_name(bufnr)
  local root = vim.fs.root(bufnr, config.root_markers) or (name ~= "" and vim.fs.dirname(name)) or vim.fn.getcwd()
  return vim.lsp.start({ name = "ahead", cmd = config.cmd, root_dir = root, init_options = config.init_options },
    { bufnr = bufnr })
end

local function map_keys(bufnr, path)
  local actions = {
    accept = { "accept all of the suggestion", function() return path.accept(bufnr, "all") end },
    accept_word = { "accept the suggestion's next word", function() return path.accept(bufnr, "word") end },
    accept_line = { "accept the suggestion's next line", function() return path.accept(bufnr, "line") end },
    dismiss = { "dismiss the suggestion", function() return path.dismiss(bufnr) end },
  }
  for key, lhs in pairs(M.config.keymaps) do
    local action = actions[key]
    if lhs and action then
      vim.keymap.set("i", lhs, function()
        return action[2]() and "" or lhs
      end, { buffer = bufnr, expr = true, silent = true, desc = "ahead: " .. action[1] })
    end
  end
end

local function on_attach(args)
  local client = vim.lsp.get_client_by_id(args.data.client_id)
  if client and client.name == "ahead" then
    local path = ghost()
    path.attach(args.buf, client)
    map_keys(args.buf, path)
  end
end

local function on_detach(args)
  local client = vim.lsp.get_client_by_id(args.data.client_id)
  if client and client.name == "ahead" then
    ghost().detach(args.buf)
  end
end

--- :AheadStatus: the engine and the server, in three lines.
function M.show_status()
  local client = status.client()
  if not client then
    vim.notify("ahead: the language server is not running (:AheadRestart starts it for this buffer)",
      vim.log.levels.WARN)
    return
  end
  local result, err = status.ask(client)
  if not result then
    vim.notify("ahead: no status: " .. err, vim.log.levels.ERROR)
    return
  end
  vim.notify(table.concat(status.lines(result), "\n"))
end

--- :AheadRestart: stop the language server (it stops the engine it started, unless other editors use it)
--- and start it again for the buffers it served, or for the current buffer.
function M.restart()
  local buffers = {}
  for _, client in ipairs(vim.lsp.get_clients({ name = "ahead" })) do
    for bufnr in pairs(client.attached_buffers) do
      buffers[#buffers + 1] = bufnr
    end
    require("ahead.ghost").call(client, "stop")
  end
  local stopped = vim.wait(10000, function()
    return #vim.lsp.get_clients({ name = "ahead" }) == 0
  end, 20)
  if not stopped then
    for _, client in ipairs(vim.lsp.get_clients({ name = "ahead" })) do
      require("ahead.ghost").call(client, "stop", true)
    end
  end
  if #buffers == 0 then
    buffers = { vim.api.nvim_get_current_buf() }
  end
  for _, bufnr in ipairs(buffers) do
    if vim.api.nvim_buf_is_valid(bufnr) then
      M.start(bufnr)
    end
  end
end

--- Configure ahead and start it for matching buffers, open ones included.
---@param opts? { cmd?: string[], init_options?: table, filetypes?: string[], root_markers?: string[],
---              ghost_text?: "auto"|"native"|"extmark", keymaps?: table<string, string|false> }
---@return boolean ok false on a Neovim too old for ahead
function M.setup(opts)
  if vim.fn.has("nvim-0.10") ~= 1 then
    vim.notify(("ahead.nvim needs Neovim 0.10 or newer; this is %s. "
      .. "The language server works with any LSP client: `ahead lsp` on stdio."):format(version()),
      vim.log.levels.ERROR)
    return false
  end
  opts = opts or {}
  local config = vim.tbl_extend("force", M.defaults, opts)
  config.keymaps = vim.tbl_extend("force", M.defaults.keymaps, opts.keymaps or {})
  if not vim.tbl_contains({ "auto", "native", "extmark" }, config.ghost_text) then
    error(("ahead: ghost_text must be auto, native or extmark, not %s"):format(vim.inspect(config.ghost_text)))
  end
  M.config = config
  if config.ghost_text == "native" and vim.fn.has("nvim-0.12") ~= 1 then
    vim.notify("ahead: native ghost text needs Neovim 0.12; using extmarks", vim.log.levels.WARN)
  end

  vim.api.nvim_set_hl(0, "AheadGhostText", { link = "Comment", default = true })
  local group = vim.api.nvim_create_augroup("ahead", { clear = true })
  vim.api.nvim_create_autocmd("ColorScheme", {
    group = group,
    callback = function()
      vim.api.nvim_set_hl(0, "AheadGhostText", { link = "Comment", default = true })
    end,
  })
  vim.api.nvim_create_autocmd("FileType", {
    group = group,
    pattern = config.filetypes,
    callback = function(args)
      M.start(args.buf)
    end,
  })
  vim.api.nvim_create_autocmd("LspAttach", { group = group, callback = on_attach })
  vim.api.nvim_create_autocmd("LspDetach", { group = group, callback = on_detach })
  vim.api.nvim_create_user_command("AheadStatus", M.show_status, { desc = "ahead: engine and server status" })
  vim.api.nvim_create_user_command("AheadRestart", M.restart, { desc = "ahead: restart the language server" })

  for _, bufnr in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_is_loaded(bufnr) and vim.tbl_contains(config.filetypes, vim.bo[bufnr].filetype) then
      M.start(bufnr)
    end
  end
  return true
end

return M
