--- Ghost text by Neovim's own vim.lsp.inline_completion (0.12+): it asks as the cursor moves in insert mode
--- (after its own 200 ms debounce) and draws the item. This adds what it lacks: accepting the next word or
--- line, and dismissing without leaving insert mode.
local text = require("ahead.text")

local M = {}

-- The namespace and augroup of Neovim's inline completion, which draws and owns the suggestion.
local ns = vim.api.nvim_create_namespace("nvim.lsp.inline_completion")
local GROUP = "nvim.lsp.inline_completion:%d"

---@param bufnr integer
function M.attach(bufnr)
  vim.lsp.inline_completion.enable(true, { bufnr = bufnr })
end

function M.detach() end -- Neovim drops its inline completion state with the client

---@param bufnr integer
function M.visible(bufnr)
  return #vim.api.nvim_buf_get_extmarks(bufnr, ns, 0, -1, { limit = 1 }) > 0
end

--- The part of an item still to insert at the cursor (its range may start before it, on the same line).
---@param bufnr integer
---@param item vim.lsp.inline_completion.Item
---@param part ahead.Part
local function insert_part(bufnr, item, part)
  local insert = type(item.insert_text) == "table" and item.insert_text.value or item.insert_text
  local row, col = unpack(vim.api.nvim_win_get_cursor(0))
  local start = item.range and item.range.start
  if start and start.row == row - 1 and start.col <= col then
    local typed = vim.api.nvim_buf_get_lines(bufnr, row - 1, row, false)[1]:sub(start.col + 1, col)
    if insert:sub(1, #typed) == typed then
      insert = insert:sub(#typed + 1)
    end
  end
  text.insert_at_cursor(bufnr, text.take(insert, part))
end

--- Accept all of the suggestion (Neovim's own accept) or its next word or line; false when none is shown.
---@param bufnr integer
---@param part ahead.Part
---@return boolean
function M.accept(bufnr, part)
  if part == "all" then
    return vim.lsp.inline_completion.get({ bufnr = bufnr })
  end
  return vim.lsp.inline_completion.get({
    bufnr = bufnr,
    on_accept = function(item)
      insert_part(bufnr, item, part)
    end,
  })
end

--- Hide the suggestion and cancel its requests: the inline completion does exactly that on InsertLeave, so
--- run that handler alone; if a later Neovim names its group otherwise, turn it off and on for the buffer.
---@param bufnr integer
---@return boolean shown whether a suggestion was on screen
function M.dismiss(bufnr)
  local shown = M.visible(bufnr)
  vim.schedule(function()
    local ok = pcall(vim.api.nvim_exec_autocmds, "InsertLeave", { group = GROUP:format(bufnr) })
    if not ok then
      vim.lsp.inline_completion.enable(false, { bufnr = bufnr })
      vim.lsp.inline_completion.enable(true, { bufnr = bufnr })
    end
  end)
  return shown
end

return M
