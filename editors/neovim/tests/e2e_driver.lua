-- End-to-end driver for tests/test_neovim.py: runs inside a real headless Neovim
-- with the plugin on 'runtimepath', plays a user session, and writes what it saw
-- to a JSON file. It only reports; the assertions live in the Python test.
--
-- Configuration comes from environment variables (JSON where structured):
--   PARAFILL_E2E_SCENARIO  'accept' (default) | 'bad_input' | 'settings'
--   PARAFILL_E2E_CMD       server command, JSON list
--   PARAFILL_E2E_SETTINGS  server settings, JSON object
--   PARAFILL_E2E_FILES     files to open, JSON list (the first is the one typed in)
--   PARAFILL_E2E_ATTEMPTS  JSON list of {line=1-based, keys="A"} ways to enter insert mode
--   PARAFILL_E2E_OUT       where to write the JSON report
--   PARAFILL_E2E_TIMEOUT_MS  overall budget

local uv = vim.uv
local env = function(name, default)
  local value = os.getenv(name)
  if value == nil or value == '' then
    return default
  end
  return value
end

local out_path = assert(env('PARAFILL_E2E_OUT'), 'PARAFILL_E2E_OUT is required')
local scenario = env('PARAFILL_E2E_SCENARIO', 'accept')
local budget_ms = tonumber(env('PARAFILL_E2E_TIMEOUT_MS', '45000'))
local started = uv.now()
local report = { scenario = scenario, events = {}, notifications = {} }

local function log(msg)
  table.insert(report.events, ('%6d ms  %s'):format(uv.now() - started, msg))
end

local finished = false
local function finish(err)
  if finished then
    return
  end
  finished = true
  report.error = err
  report.elapsed_ms = uv.now() - started
  local file = assert(io.open(out_path, 'w'))
  file:write(vim.json.encode(report))
  file:close()
  vim.cmd('qall!')
end

-- Record notifications instead of printing them, so the test can count them.
vim.notify = function(msg, level)
  table.insert(report.notifications, { msg = tostring(msg), level = level })
end

local function resume(thread)
  local ok, err = coroutine.resume(thread)
  if not ok then
    finish('driver error: ' .. tostring(err))
  end
end

local function sleep(ms)
  local me = coroutine.running()
  vim.defer_fn(function() resume(me) end, ms)
  coroutine.yield()
end

local function wait_for(what, predicate, timeout_ms)
  local deadline = uv.now() + math.min(timeout_ms, budget_ms - (uv.now() - started))
  while uv.now() < deadline do
    local value = predicate()
    if value then
      return value
    end
    sleep(50)
  end
  error('timed out waiting for ' .. what, 0)
end

local function request(client, method, params)
  local me = coroutine.running()
  local response
  client:request(method, params, function(err, result)
    response = { err = err, result = result }
    vim.schedule(function() resume(me) end)
  end, 0)
  coroutine.yield()
  return response
end

local parafill = require('parafill')
local cmd = vim.json.decode(assert(env('PARAFILL_E2E_CMD')))
local settings = vim.json.decode(env('PARAFILL_E2E_SETTINGS', '{}'))
local files = vim.json.decode(assert(env('PARAFILL_E2E_FILES')))

local function scenario_accept()
  parafill.setup({ cmd = cmd, settings = settings })
  vim.cmd.edit(vim.fn.fnameescape(files[1]))
  local bufnr = vim.api.nvim_get_current_buf()
  log('opened ' .. files[1] .. ' filetype=' .. vim.bo.filetype)

  local client = wait_for('the parafill client to initialize', function()
    local c = parafill.clients(bufnr)[1]
    return c and c.initialized and c
  end, 20000)
  report.inline_provider = client.server_capabilities.inlineCompletionProvider ~= nil
  log('client initialized; inlineCompletionProvider=' .. tostring(report.inline_provider))

  -- The model loads in the background after initialize; wait until it is ready.
  wait_for('the model to load (parafill/status)', function()
    local response = request(client, 'parafill/status', {})
    report.status = response.result
    local state = type(response.result) == 'table' and response.result.state or nil
    return state ~= nil and not tostring(state):match('load') and not tostring(state):match('start')
  end, 30000)
  log('status: ' .. parafill.format_status(report.status))

  -- Record every inline completion reply next to what the plugin shows, by
  -- wrapping this client's request method (Neovim's own handler still runs).
  local replies = {}
  local original_request = client.request
  client.request = function(self, method, params, handler, ...)
    if method == 'textDocument/inlineCompletion' and handler then
      local inner = handler
      handler = function(err, result, ...)
        table.insert(replies, { err = err, result = result, params = params })
        return inner(err, result, ...)
      end
    end
    return original_request(self, method, params, handler, ...)
  end

  local attempts = vim.json.decode(env('PARAFILL_E2E_ATTEMPTS', '[{"line": 1, "keys": "A"}]'))

  -- Enter insert mode as `attempt` says and wait for a reply; the items, or nil.
  local function try(attempt, label)
    vim.api.nvim_win_set_cursor(0, { attempt.line, 0 })
    local replies_before = #replies
    vim.api.nvim_input(attempt.keys)
    wait_for('insert mode', function() return vim.api.nvim_get_mode().mode == 'i' end, 2000)
    local ok = pcall(wait_for, 'an inline completion reply', function()
      return #replies > replies_before
    end, 10000)
    local reply = replies[#replies]
    local items = reply and reply.result and (reply.result.items or reply.result) or {}
    log(('%s (line %d, keys %q): reply=%s items=%d'):format(
      label, attempt.line, attempt.keys, tostring(ok), #items))
    if ok and #items > 0 then
      wait_for('ghost text', function() return parafill.suggestion_visible(bufnr) end, 3000)
      return reply, items
    end
    vim.api.nvim_input('<Esc>')
    wait_for('normal mode', function() return vim.api.nvim_get_mode().mode == 'n' end, 2000)
  end

  local chosen, reply, items
  for index, attempt in ipairs(attempts) do
    reply, items = try(attempt, 'attempt ' .. index)
    if reply then
      chosen = attempt
      break
    end
  end
  if not chosen then
    error('no attempt produced an inline completion item', 0)
  end

  -- Dismiss with the plugin's keymap: the ghost text goes, the buffer stays.
  local tick = vim.api.nvim_buf_get_changedtick(bufnr)
  report.dismiss = { ghost_before = parafill.visible_text(bufnr) }
  vim.api.nvim_input(parafill.options.keymaps.dismiss)
  wait_for('the ghost text to go after dismissing', function()
    return not parafill.suggestion_visible(bufnr)
  end, 3000)
  sleep(300) -- a late reply or redraw must not bring it back
  report.dismiss.ghost_after = parafill.visible_text(bufnr)
  report.dismiss.buffer_changed = vim.api.nvim_buf_get_changedtick(bufnr) ~= tick
  report.dismiss.mode = vim.api.nvim_get_mode().mode
  log('dismissed')
  vim.api.nvim_input('<Esc>')
  wait_for('normal mode', function() return vim.api.nvim_get_mode().mode == 'n' end, 2000)

  -- Ask again at the same place (the server may answer from its cache) and accept.
  reply, items = try(chosen, 'again')
  if not reply then
    error('no inline completion the second time at the same position', 0)
  end
  report.attempt = chosen
  report.request = reply.params
  report.item = items[1]
  report.ghost_text = parafill.visible_text(bufnr)
  report.cursor_before = vim.api.nvim_win_get_cursor(0)
  report.lines_before = vim.api.nvim_buf_get_lines(bufnr, 0, -1, false)
  tick = vim.api.nvim_buf_get_changedtick(bufnr)
  log('ghost text shown: ' .. vim.inspect(report.ghost_text))
  -- Accept with the plugin's keymap, as a user would type it.
  vim.api.nvim_input(parafill.options.keymaps.accept)
  wait_for('the buffer to change after accepting', function()
    return vim.api.nvim_buf_get_changedtick(bufnr) ~= tick
  end, 3000)
  sleep(100)
  report.lines_after = vim.api.nvim_buf_get_lines(bufnr, 0, -1, false)
  report.cursor_after = vim.api.nvim_win_get_cursor(0)
  report.mode_after = vim.api.nvim_get_mode().mode
  report.ghost_after = parafill.visible_text(bufnr)
  local status = request(client, 'parafill/status', {})
  report.status_after = status.result
  log('accepted; ' .. parafill.format_status(status.result))
end

-- A broken setup: wrong-typed options and a server that dies at once, opened
-- in several buffers. The user must hear about each problem once.
local function scenario_bad_input()
  parafill.setup({ cmd = cmd, settings = settings, inline = 'yes', keymaps = 3 })
  for _, file in ipairs(files) do
    vim.cmd.edit(vim.fn.fnameescape(file))
    sleep(300)
  end
  -- Give the (crashing) servers time to exit and report.
  sleep(1500)
  report.clients = #parafill.clients()
  report.health = (function()
    vim.cmd('checkhealth parafill')
    return vim.api.nvim_buf_get_lines(0, 0, -1, false)
  end)()
end

-- Server settings the server rejects or cannot honour: wait until the model has
-- loaded or failed, and a moment more for late messages, then report what the user saw.
local function scenario_settings()
  parafill.setup({ cmd = cmd, settings = settings })
  vim.cmd.edit(vim.fn.fnameescape(files[1]))
  local bufnr = vim.api.nvim_get_current_buf()
  -- Generous waits: on a busy machine the server can take a while to start; the
  -- test's own timeout bounds the whole run.
  local client = wait_for('the parafill client to initialize', function()
    local c = parafill.clients(bufnr)[1]
    return c and c.initialized and c
  end, budget_ms)
  wait_for('the model to load or fail (parafill/status)', function()
    local response = request(client, 'parafill/status', {})
    report.status = response.result
    local state = type(response.result) == 'table' and response.result.state or nil
    return state == 'ready' or state == 'error'
  end, budget_ms)
  sleep(1000)
  log('status: ' .. parafill.format_status(report.status))
end

local scenarios = { accept = scenario_accept, bad_input = scenario_bad_input, settings = scenario_settings }

local co = coroutine.create(function()
  local ok, err = pcall(assert(scenarios[scenario], 'unknown scenario ' .. scenario))
  finish(not ok and tostring(err) or nil)
end)
local timer = assert(uv.new_timer())
timer:start(budget_ms, 0, vim.schedule_wrap(function()
  finish('driver budget of ' .. budget_ms .. ' ms exhausted')
end))
vim.schedule(function() resume(co) end)
