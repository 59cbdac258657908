--- The server's `ahead/status` (lsp_server/server.py): asked for, and put into a few lines for people.
local call = require("ahead.ghost").call

local M = {}

--- The `ahead` language server for a buffer (any one when none is attached to it).
---@param bufnr? integer
---@return vim.lsp.Client?
function M.client(bufnr)
  return vim.lsp.get_clients({ name = "ahead", bufnr = bufnr or 0 })[1] or vim.lsp.get_clients({ name = "ahead" })[1]
end

--- The status, or nil and why not.
---@param client vim.lsp.Client
---@param timeout_ms? integer
---@return table? status
---@return string? error
function M.ask(client, timeout_ms)
  local answer, err = call(client, "request_sync", "ahead/status", vim.empty_dict(), timeout_ms or 5000)
  if not answer then
    return nil, tostring(err)
  elseif answer.err then
    return nil, answer.err.message or vim.inspect(answer.err)
  end
  return answer.result
end

local function ms(value)
  return type(value) == "number" and ("%.0f ms"):format(value) or "-"
end

--- One line on the backend: where completions come from and how fast they are.
---@param backend table
---@return string
function M.backend_line(backend)
  -- The engine backend has a state; the remote one (an OpenAI-compatible server) names its server and url.
  local parts = { ("%s %s"):format(backend.backend or backend.server or "backend", backend.state or backend.url or "") }
  if backend.model then
    parts[#parts + 1] = "model " .. backend.model
  end
  if backend.device then
    parts[#parts + 1] = table.concat({ backend.device, backend.dtype }, " ")
  end
  local latency = backend.latency_ms
  if type(latency) == "table" and (latency.count or 0) > 0 then
    parts[#parts + 1] = ("latency p50 %s, p95 %s over %d"):format(ms(latency.p50), ms(latency.p95), latency.count)
  end
  if backend.queue then
    parts[#parts + 1] = ("queue %d"):format(backend.queue)
  end
  if backend.error then
    parts[#parts + 1] = "error: " .. backend.error
  end
  return table.concat(parts, " · ")
end

---@param status table the `ahead/status` result
---@return string[]
function M.lines(status)
  local server, backend = status.server or {}, status.backend or {}
  local settings = server.settings or {}
  return {
    "ahead: " .. M.backend_line(backend),
    ("server %s · %d documents · %d requests: %d to the backend, %d type-through, %d prefetched, %d superseded, %d errors")
      :format(server.version or "?", server.documents_open or 0, server.requests or 0, server.backend_requests or 0,
        server.type_through_hits or 0, server.prefetch_hits or 0, server.superseded or 0, server.errors or 0),
    ("settings: decoding %s · max tokens %s · max lines %s · debounce %s ms · prefetch %s · repo context %s")
      :format(tostring(settings.decoding), tostring(settings.max_tokens), tostring(settings.max_lines),
        tostring(settings.debounce_ms), tostring(settings.prefetch), tostring(settings.repo_context)),
  }
end

return M
