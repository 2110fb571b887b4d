--- parafill for Neovim: starts `parafill serve` and shows its suggestions as ghost text.
---
--- `require('parafill').setup{}` enables the `parafill` LSP config (lsp/parafill.lua),
--- turns on `vim.lsp.inline_completion` (Neovim >= 0.12) with keymaps, or the
--- completion-menu fallback on older versions, and defines the :Parafill* commands.
--- It never edits a buffer except when the user accepts a suggestion, and it tells
--- the user about a problem once (missing executable, crash, bad option), not on
--- every keystroke.

local M = {}

M.name = 'parafill'

--- Defaults; every key may be overridden by setup{}.
M.defaults = {
  -- Server command; nil keeps lsp/parafill.lua's `{ 'parafill', 'serve' }`.
  cmd = nil,
  -- Filetypes to attach to; nil keeps lsp/parafill.lua's list.
  filetypes = nil,
  -- Server settings, camelCase as on the wire (model, device, contextTokens,
  -- spanTokensLine, spanTokensBlock, steps, confidenceThreshold, minConfidence,
  -- debounceMs, latencyBudgetMs, threads, enabledLanguages, maxSnippets, repoDrafts,
  -- verboseLogging,
  -- engine, engineTokenFile, engineFallback, openModelWeights, openModelKeystrokeCache).
  settings = {},
  -- Show suggestions as ghost text (needs Neovim >= 0.12).
  inline = true,
  -- On Neovim without inline completion: 'auto' uses the LSP completion menu
  -- (vim.lsp.completion, or nvim-cmp if installed); false does nothing.
  fallback = 'auto',
  -- Insert-mode keymaps; set one to false to skip it, or `keymaps = false` for none.
  keymaps = {
    accept = '<Tab>', -- only when a suggestion is shown; otherwise a normal <Tab>
    next = '<M-]>',
    prev = '<M-[>',
    dismiss = '<C-]>', -- only when a suggestion is shown
  },
}

M.options = vim.deepcopy(M.defaults)

-- Messages already shown, so a problem is reported once, not per buffer or keystroke.
local notified = {}

--- Notify once per `key` (until `M._reset_notifications`).
---@param key string
---@param msg string
---@param level? integer
function M.notify_once(key, msg, level)
  if notified[key] then
    return false
  end
  notified[key] = true
  vim.schedule(function()
    vim.notify('parafill: ' .. msg, level or vim.log.levels.WARN)
  end)
  return true
end

function M._reset_notifications()
  notified = {}
end

--- Neovim version features this plugin relies on.
function M.features()
  return {
    lsp_config = vim.fn.has('nvim-0.11') == 1 and vim.lsp.config ~= nil,
    inline_completion = vim.lsp.inline_completion ~= nil,
    lsp_completion = vim.lsp.completion ~= nil,
  }
end

local option_types = {
  cmd = { 'table', 'nil' },
  filetypes = { 'table', 'nil' },
  settings = { 'table' },
  inline = { 'boolean' },
  fallback = { 'string', 'boolean' },
  keymaps = { 'table', 'boolean' },
}

--- Merge user options over the defaults; a wrong-typed option is reported once
--- and its default kept, so a typo never stops the plugin.
---@param user table|nil
---@return table options, string[] problems
function M.resolve_options(user)
  local opts = vim.deepcopy(M.defaults)
  local problems = {}
  if user ~= nil and type(user) ~= 'table' then
    table.insert(problems, ('setup() expects a table, got %s'):format(type(user)))
    return opts, problems
  end
  for key, value in pairs(user or {}) do
    local allowed = option_types[key]
    if not allowed then
      table.insert(problems, ('unknown option %q (known: %s)'):format(
        key, table.concat(vim.tbl_keys(option_types), ', ')))
    elseif not vim.tbl_contains(allowed, type(value)) then
      table.insert(problems, ('option %q must be %s, got %s; using the default'):format(
        key, table.concat(allowed, ' or '), type(value)))
    elseif key == 'keymaps' and type(value) == 'table' then
      opts.keymaps = vim.tbl_extend('force', opts.keymaps, value)
    else
      opts[key] = value
    end
  end
  if type(opts.cmd) == 'table' and (#opts.cmd == 0 or type(opts.cmd[1]) ~= 'string') then
    table.insert(problems, 'option "cmd" must be a list of strings, e.g. { "parafill", "serve" }')
    opts.cmd = nil
  end
  return opts, problems
end

--- The command that starts the server, after setup{} overrides.
---@return string[]|nil
function M.server_cmd()
  local config = M.features().lsp_config and vim.lsp.config[M.name] or nil
  local cmd = M.options.cmd or (config and config.cmd)
  if type(cmd) == 'table' then
    return cmd
  end
  return nil
end

--- Whether the server executable can be started; returns false and a fix otherwise.
---@return boolean ok, string|nil problem
function M.check_executable()
  local cmd = M.server_cmd()
  if not cmd then
    return true -- a function cmd: nothing we can check
  end
  if vim.fn.executable(cmd[1]) == 1 then
    return true
  end
  return false,
    ('server command %q not found. Install parafill from its source folder'
      .. ' (`pipx install /path/to/parafill`, or `pip install /path/to/parafill` in a virtual environment;'
      .. ' then check `parafill serve --help` works in this shell) or point the plugin at it:'
      .. " require('parafill').setup{ cmd = { '/path/to/venv/bin/parafill', 'serve' } }")
      :format(cmd[1])
end

--- The parafill clients attached to `bufnr` (0 = current), or all of them.
---@param bufnr integer|nil
function M.clients(bufnr)
  return vim.lsp.get_clients({ name = M.name, bufnr = bufnr })
end

-- Inline completion --------------------------------------------------------

local function inline_namespace()
  return vim.api.nvim_create_namespace('nvim.lsp.inline_completion')
end

--- True when a suggestion is shown as ghost text in `bufnr`.
function M.suggestion_visible(bufnr)
  if not M.features().inline_completion then
    return false
  end
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  return #vim.api.nvim_buf_get_extmarks(bufnr, inline_namespace(), 0, -1, { limit = 1 }) > 0
end

--- The ghost text shown in `bufnr`, as a string ('' when none).
function M.visible_text(bufnr)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  local marks = vim.api.nvim_buf_get_extmarks(bufnr, inline_namespace(), 0, -1, { details = true })
  local out = {}
  for _, mark in ipairs(marks) do
    local details = mark[4] or {}
    local line = {}
    for _, chunk in ipairs(details.virt_text or {}) do
      table.insert(line, chunk[1])
    end
    table.insert(out, table.concat(line))
    for _, vline in ipairs(details.virt_lines or {}) do
      local parts = {}
      for _, chunk in ipairs(vline) do
        table.insert(parts, chunk[1])
      end
      table.insert(out, table.concat(parts))
    end
  end
  return table.concat(out, '\n')
end

--- Accept the shown suggestion; false when there is none.
function M.accept()
  if not M.features().inline_completion then
    return false
  end
  return vim.lsp.inline_completion.get()
end

--- Show the next (count > 0) or previous (count < 0) suggestion.
function M.cycle(count)
  if M.features().inline_completion then
    vim.lsp.inline_completion.select({ count = count })
  end
end

--- Hide the shown suggestion and cancel the request in flight.
function M.dismiss(bufnr)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  -- Neovim's inline completion aborts (cancels pending requests, forgets the
  -- current item, clears the ghost text) when its InsertLeave autocmd runs;
  -- running just that autocmd dismisses without leaving insert mode.
  local group = ('nvim.lsp.inline_completion:%d'):format(bufnr)
  local ok = pcall(vim.api.nvim_exec_autocmds, 'InsertLeave',
    { group = group, buffer = bufnr, modeline = false })
  if not ok then
    vim.api.nvim_buf_clear_namespace(bufnr, inline_namespace(), 0, -1)
  end
end

--- Turn ghost-text suggestions on or off (all buffers).
function M.enable(enable)
  enable = enable ~= false
  M.enabled = enable
  if M.features().inline_completion then
    vim.lsp.inline_completion.enable(enable)
  end
end

function M.toggle()
  M.enable(not M.is_enabled())
end

function M.is_enabled()
  if M.features().inline_completion then
    return vim.lsp.inline_completion.is_enabled()
  end
  return M.enabled ~= false
end

local function set_keymaps(keymaps)
  if not keymaps then
    return
  end
  local function map(lhs, rhs, desc, expr)
    if lhs then
      vim.keymap.set('i', lhs, rhs, { desc = 'parafill: ' .. desc, expr = expr, silent = true })
    end
  end
  local termcodes = function(key)
    return vim.api.nvim_replace_termcodes(key, true, false, true)
  end
  if keymaps.accept then
    -- Fall through to the key's own meaning when nothing is shown, so <Tab>
    -- still indents.
    map(keymaps.accept, function()
      if M.accept() then
        return ''
      end
      return termcodes(keymaps.accept)
    end, 'accept suggestion', true)
  end
  map(keymaps.next, function() M.cycle(1) end, 'next suggestion')
  map(keymaps.prev, function() M.cycle(-1) end, 'previous suggestion')
  if keymaps.dismiss then
    map(keymaps.dismiss, function()
      if M.suggestion_visible() then
        M.dismiss()
        return ''
      end
      return termcodes(keymaps.dismiss)
    end, 'dismiss suggestion', true)
  end
end

-- Status -------------------------------------------------------------------

--- Ask the server for `parafill/status`; calls `callback(err, result)`.
---@param callback fun(err: any, result: table|nil)
---@param bufnr integer|nil
function M.request_status(callback, bufnr)
  local client = M.clients(bufnr)[1] or M.clients()[1]
  if not client then
    callback('no parafill client is running (open a supported file, or see :checkhealth parafill)')
    return
  end
  client:request('parafill/status', {}, function(err, result)
    callback(err, result)
  end)
end

--- One line describing a `parafill/status` result.
function M.format_status(status)
  if type(status) ~= 'table' then
    return 'no status'
  end
  -- JSON null arrives as vim.NIL; treat it as absent.
  local function value(v)
    if v == vim.NIL then
      return nil
    end
    return v
  end
  local latency = type(status.latency) == 'table' and status.latency or {}
  latency = { p50 = value(latency.p50), p90 = value(latency.p90), p99 = value(latency.p99) }
  local parts = {
    ('model %s'):format(tostring(value(status.model) or '?')),
    ('device %s'):format(tostring(value(status.device) or '?')),
    ('state %s'):format(tostring(value(status.state) or '?')),
  }
  -- A model adapted to the repository (`parafill adapt`) may have answered instead.
  local answered = value(status.answeredBy)
  if answered and answered ~= '' and answered ~= value(status.model) then
    table.insert(parts, ('last answer from the model adapted to this repository (%s)'):format(tostring(answered)))
  end
  if latency.p50 then
    table.insert(parts, ('latency p50 %s ms, p90 %s ms, p99 %s ms'):format(
      tostring(latency.p50), tostring(latency.p90 or '?'), tostring(latency.p99 or '?')))
  elseif value(status.message) then
    table.insert(parts, tostring(status.message))
  end
  if value(status.cacheHitRate) then
    table.insert(parts, ('cache hit rate %s'):format(tostring(status.cacheHitRate)))
  end
  return table.concat(parts, ' | ')
end

-- Restart ------------------------------------------------------------------

function M.restart()
  M._reset_notifications()
  local ok, problem = M.check_executable()
  if not ok then
    M.notify_once('executable', problem, vim.log.levels.ERROR)
    return
  end
  vim.lsp.enable(M.name, false)
  -- Re-enable once the old clients are gone, so the new one is not merged into
  -- a client that is still shutting down.
  local waited = 0
  local timer = assert(vim.uv.new_timer())
  timer:start(50, 50, vim.schedule_wrap(function()
    waited = waited + 50
    if #M.clients() == 0 or waited >= 3000 then
      timer:stop()
      timer:close()
      for _, client in ipairs(M.clients()) do
        client:stop(true)
      end
      vim.lsp.enable(M.name, true)
    end
  end))
end

-- Setup --------------------------------------------------------------------

local function lsp_overrides(opts)
  local config = {
    init_options = { parafill = opts.settings },
    settings = { parafill = opts.settings },
    on_exit = function(code, signal)
      -- 0 = a normal shutdown; anything else is a crash worth one message.
      if code ~= 0 or (signal ~= nil and signal ~= 0) then
        M.notify_once('crash', ('the server stopped (exit code %s, signal %s). Check :LspLog and'
          .. ' :checkhealth parafill, then run :ParafillRestart.'):format(code, signal),
          vim.log.levels.ERROR)
      end
    end,
  }
  if opts.cmd then
    config.cmd = opts.cmd
  end
  if opts.filetypes then
    config.filetypes = opts.filetypes
  end
  return config
end

local function on_attach_fallback(args)
  local client = vim.lsp.get_client_by_id(args.data.client_id)
  if not client or client.name ~= M.name then
    return
  end
  -- Without ghost text, the whole suggestion arrives as one item of the
  -- completion menu (textDocument/completion). nvim-cmp users get it from
  -- cmp-nvim-lsp without anything here.
  if M.options.fallback and M.features().lsp_completion and not pcall(require, 'cmp') then
    vim.lsp.completion.enable(true, client.id, args.buf, { autotrigger = false })
  end
end

local function define_commands()
  local command = vim.api.nvim_create_user_command
  command('ParafillEnable', function() M.enable(true) end, { desc = 'Show parafill suggestions' })
  command('ParafillDisable', function() M.enable(false) end, { desc = 'Hide parafill suggestions' })
  command('ParafillToggle', function() M.toggle() end, { desc = 'Toggle parafill suggestions' })
  command('ParafillRestart', function() M.restart() end, { desc = 'Restart parafill serve' })
  command('ParafillStatus', function()
    M.request_status(function(err, result)
      if err then
        vim.notify('parafill: ' .. (type(err) == 'table' and (err.message or vim.inspect(err)) or tostring(err)),
          vim.log.levels.WARN)
      else
        vim.notify('parafill: ' .. M.format_status(result), vim.log.levels.INFO)
      end
    end)
  end, { desc = 'Show the parafill server status' })
end

---@param user table|nil see M.defaults
function M.setup(user)
  local opts, problems = M.resolve_options(user)
  M.options = opts
  if #problems > 0 then
    M.notify_once('options', table.concat(problems, '; '), vim.log.levels.ERROR)
  end
  define_commands()

  local features = M.features()
  if not features.lsp_config then
    M.notify_once('version', 'Neovim >= 0.11 is needed for require("parafill").setup();'
      .. ' on older versions start the server with vim.lsp.start (see editors/README.md).',
      vim.log.levels.WARN)
    return
  end

  vim.lsp.config(M.name, lsp_overrides(opts))
  local ok, problem = M.check_executable()
  if not ok then
    -- Neovim would only log this to lsp.log; say it once where the user sees it.
    M.notify_once('executable', problem, vim.log.levels.ERROR)
  end
  vim.lsp.enable(M.name)

  if features.inline_completion and opts.inline then
    M.enable(true)
    set_keymaps(opts.keymaps)
  elseif opts.fallback then
    vim.api.nvim_create_autocmd('LspAttach', {
      group = vim.api.nvim_create_augroup('parafill.fallback', { clear = true }),
      callback = on_attach_fallback,
    })
  end
end

return M
