--- What a partial accept takes from a suggestion, and how it lands in the buffer.
--- Pure string rules (both ghost-text paths share them) plus one buffer edit.
local M = {}

--- The next word: leading blanks, then a run of word characters (non-ASCII letters included, so a UTF-8
--- character is never split) or a run of other symbols; at a line end,
--- the line break and the next line's indentation (so repeated word accepts walk down the lines).
---@param text string
---@return string
function M.next_word(text)
  return text:match("^[ \t]*[%w_\128-\255]+")
    or text:match("^[ \t]*[^%w_%s\128-\255]+")
    or text:match("^[ \t]*\n[ \t]*")
    or text
end

--- The rest of the current line; at a line end, the line break and the whole next line.
---@param text string
---@return string
function M.next_line(text)
  local line = text:match("^[^\n]*")
  if not line:match("^[ \t]*$") then
    return line
  end
  return text:match("^[^\n]*\n?[^\n]*")
end

---@alias ahead.Part "all"|"word"|"line"
--- The part of a suggestion to insert, with the buffer's own line breaks ("\n": a CRLF document gets CRLF
--- suggestions from the server, but Neovim keeps "\r" out of buffer lines).
---@param text string
---@param part ahead.Part
---@return string
function M.take(text, part)
  text = text:gsub("\r\n", "\n")
  if part == "word" then
    return M.next_word(text)
  elseif part == "line" then
    return M.next_line(text)
  end
  return text
end

--- Whether `text` would show nothing worth accepting.
---@param text string?
function M.blank(text)
  return text == nil or text:match("^%s*$") ~= nil
end

--- Insert `text` at the cursor of the current window and put the cursor after it (insert mode allows the
--- column after the last character).
---@param bufnr integer
---@param text string
function M.insert_at_cursor(bufnr, text)
  local row, col = unpack(vim.api.nvim_win_get_cursor(0))
  local lines = vim.split(text, "\n", { plain = true })
  vim.api.nvim_buf_set_text(bufnr, row - 1, col, row - 1, col, lines)
  local last = #lines == 1 and col + #lines[1] or #lines[#lines]
  vim.api.nvim_win_set_cursor(0, { row + #lines - 1, last })
end

return M
