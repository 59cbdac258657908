--- Ghost text drawn with extmarks: the path for Neovim 0.10/0.11, which have no vim.lsp.inline_completion
--- (and for 0.12 with `ghost_text = "extmark"`). It asks `textDocument/inlineCompletion` itself whenever the
--- text or the cursor changes in insert mode; a newer state cancels the request in flight, and an answer for
--- an older state is dropped. Typing the start of the shown text keeps showing the rest until the server's
--- answer (its type-through cache) replaces it, so the ghost text does not flicker while the user types on.
local text = require("ahead.text")

local M = {}

local ns = vim.api.nvim_create_namespace("ahead.ghost")
local AUTOMATIC = 2 -- lsp.InlineCompletionTriggerKind.Automatic

---@class ahead.GhostState
---@field client_id integer
---@field request? integer the inlineCompletion request in flight
---@field asked? string the buffer state (changedtick and cursor) last asked about
---@field shown? { row: integer, col: integer, text: string }
---@field typed? string what stays to show after the character being typed (InsertCharPre to TextChangedI)

---@type table<integer, ahead.GhostState>
local state = {}

--- Client methods take `self` since 0.11 (`client:request`); 0.10 has plain functions (`client.request`).
---@param client vim.lsp.Client
---@param method string
function M.call(client, method, ...)
  if vim.fn.has("nvim-0.11") == 1 then
    return client[method](client, ...)
  end
  return client[method](...)
end

---@return integer row 0-based
---@return integer col byte column
local function cursor()
  local row, col = unpack(vim.api.nvim_win_get_cursor(0))
  return row - 1, col
end

local function here(bufnr)
  local row, col = cursor()
  return ("%d:%d:%d"):format(vim.api.nvim_buf_get_changedtick(bufnr), row, col)
end

---@param line string
---@param index integer a column in the client's position encoding
---@param encoding string
local function byte_col(line, index, encoding)
  if encoding == "utf-8" then
    return index
  elseif vim.fn.has("nvim-0.11") == 1 then
    return vim.str_byteindex(line, encoding, index, false)
  end
  return vim.str_byteindex(line, index, encoding == "utf-16")
end

--- What an item still inserts at the cursor: all of its text when it starts there, less what is typed
--- already when it starts earlier on the line; nil when it does not fit the buffer.
---@param bufnr integer
---@param item table lsp.InlineCompletionItem
---@param encoding string
---@return string?
local function rest_of(bufnr, item, encoding, row, col)
  local insert = type(item.insertText) == "table" and item.insertText.value or item.insertText
  if type(insert) ~= "string" then
    return nil
  end
  insert = insert:gsub("\r\n", "\n")
  if not item.range then
    return insert
  end
  local start = item.range.start
  local line = vim.api.nvim_buf_get_lines(bufnr, row, row + 1, false)[1] or ""
  local from = start.line == row and byte_col(line, start.character, encoding) or nil
  if from == nil or from > col then
    return nil
  end
  local typed = line:sub(from + 1, col)
  return insert:sub(1, #typed) == typed and insert:sub(#typed + 1) or nil
end

local function show(bufnr, row, col, rest)
  vim.api.nvim_buf_clear_namespace(bufnr, ns, 0, -1)
  local lines = vim.split(rest, "\n", { plain = true })
  local below = {}
  for i = 2, #lines do
    below[#below + 1] = { { lines[i], "AheadGhostText" } }
  end
  vim.api.nvim_buf_set_extmark(bufnr, ns, row, col, {
    virt_text = { { lines[1], "AheadGhostText" } },
    virt_text_pos = "inline",
    virt_lines = #below > 0 and below or nil,
    hl_mode = "combine",
  })
  state[bufnr].shown = { row = row, col = col, text = rest }
end

local function hide(bufnr)
  vim.api.nvim_buf_clear_namespace(bufnr, ns, 0, -1)
  state[bufnr].shown = nil
end

local function cancel(bufnr)
  local s = state[bufnr]
  local client = s.request and vim.lsp.get_client_by_id(s.client_id)
  if client then
    M.call(client, "cancel_request", s.request)
  end
  s.request = nil
end

--- Ask the server for the ghost text at the cursor (the request in flight, if any, is cancelled).
---@param bufnr integer
function M.request(bufnr)
  local s = state[bufnr]
  local client = vim.lsp.get_client_by_id(s.client_id)
  if not client then
    return
  end
  cancel(bufnr)
  local asked = here(bufnr)
  local row, col = cursor()
  s.asked = asked
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
  params.context = { triggerKind = AUTOMATIC }
  local id
  local function on_answer(err, result)
    if s.request ~= id or state[bufnr] ~= s then
      return -- cancelled (dismissed, or a newer keystroke asked again) after the server had answered
    end
    s.request = nil
    local current = vim.api.nvim_get_current_buf() == bufnr and vim.api.nvim_get_mode().mode:sub(1, 1) == "i"
    if err or not result or not current or here(bufnr) ~= asked then
      return
    end
    local item = (result.items or result)[1]
    local rest = item and rest_of(bufnr, item, client.offset_encoding, row, col)
    if text.blank(rest) then
      hide(bufnr)
    else
      show(bufnr, row, col, rest)
    end
  end
  local _, request_id = M.call(client, "request", "textDocument/inlineCompletion", params, on_answer, bufnr)
  id = request_id
  s.request = id
end

--- After a change or a cursor move in insert mode: show what is still valid at once, then ask again.
local function refresh(bufnr)
  local s = state[bufnr]
  if s.asked == here(bufnr) then
    return -- TextChangedI and CursorMovedI both fire for one keystroke
  end
  local rest = s.typed
  s.typed = nil
  hide(bufnr)
  if not text.blank(rest) then
    local row, col = cursor()
    show(bufnr, row, col, rest)
  end
  M.request(bufnr)
end

--- Whether a suggestion is on screen at the cursor.
---@param bufnr integer
function M.visible(bufnr)
  local shown = state[bufnr] and state[bufnr].shown
  local row, col = cursor()
  return shown ~= nil and shown.row == row and shown.col == col
end

--- Insert the suggestion (all of it, or its next word or line) at the cursor; false when none is shown.
--- The edit is scheduled, so that an `expr` mapping may call this.
---@param bufnr integer
---@param part ahead.Part
---@return boolean
function M.accept(bufnr, part)
  if not M.visible(bufnr) then
    return false
  end
  local shown = state[bufnr].shown.text
  vim.schedule(function()
    local s = state[bufnr]
    if not s then
      return
    end
    local piece = text.take(shown, part)
    cancel(bufnr)
    hide(bufnr)
    text.insert_at_cursor(bufnr, piece)
    s.typed = shown:sub(#piece + 1)
    refresh(bufnr)
  end)
  return true
end

--- Hide the suggestion and cancel the request in flight (nothing is asked again until the text or the cursor
--- changes); false when no suggestion was on screen, so that the key can do its own work.
---@param bufnr integer
---@return boolean
function M.dismiss(bufnr)
  if not state[bufnr] then
    return false
  end
  local visible = M.visible(bufnr)
  vim.schedule(function()
    if state[bufnr] then
      cancel(bufnr)
      hide(bufnr)
    end
  end)
  return visible
end

---@param bufnr integer
---@param client vim.lsp.Client
function M.attach(bufnr, client)
  if state[bufnr] then
    state[bufnr].client_id = client.id
    return
  end
  state[bufnr] = { client_id = client.id }
  local group = vim.api.nvim_create_augroup(("ahead.ghost.%d"):format(bufnr), { clear = true })
  local function on(events, callback)
    vim.api.nvim_create_autocmd(events, { group = group, buffer = bufnr, callback = callback })
  end
  on({ "InsertEnter", "TextChangedI", "TextChangedP", "CursorMovedI" }, function()
    refresh(bufnr)
  end)
  on("InsertCharPre", function()
    local s, char = state[bufnr], vim.v.char
    local shown = M.visible(bufnr) and s.shown.text or ""
    s.typed = shown:sub(1, #char) == char and shown:sub(#char + 1) or nil
  end)
  on({ "InsertLeave", "BufLeave" }, function()
    cancel(bufnr)
    hide(bufnr)
    state[bufnr].asked = nil -- coming back asks again, even at the same place
  end)
end

---@param bufnr integer
function M.detach(bufnr)
  if not state[bufnr] then
    return
  end
  cancel(bufnr)
  hide(bufnr)
  state[bufnr] = nil
  pcall(vim.api.nvim_del_augroup_by_name, ("ahead.ghost.%d"):format(bufnr))
end

return M
