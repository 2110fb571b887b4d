--- :checkhealth parafill — what a user needs to know when no ghost text shows up.
--- Reports; never changes settings or starts a server.
local M = {}

local health = vim.health

local function check_version()
  health.start('Neovim')
  local v = vim.version()
  local version = ('%d.%d.%d'):format(v.major, v.minor, v.patch)
  local features = require('parafill').features()
  if features.inline_completion then
    health.ok(('Neovim %s has vim.lsp.inline_completion (ghost text)'):format(version))
  elseif features.lsp_config then
    health.warn(('Neovim %s has no vim.lsp.inline_completion'):format(version), {
      'Upgrade to Neovim 0.12 for ghost text.',
      'Meanwhile suggestions come through the completion menu (vim.lsp.completion or nvim-cmp).',
    })
  else
    health.error(('Neovim %s is older than 0.11'):format(version), {
      'Upgrade Neovim, or start the server with vim.lsp.start (see editors/README.md).',
    })
  end
end

local function check_executable()
  health.start('Server executable')
  local parafill = require('parafill')
  local cmd = parafill.server_cmd()
  if not cmd then
    health.info('cmd is a function; cannot check it')
    return
  end
  local ok, problem = parafill.check_executable()
  if ok then
    health.ok(('%s found: %s'):format(cmd[1], vim.fn.exepath(cmd[1])))
    health.info('command: ' .. table.concat(cmd, ' '))
  else
    health.error(problem)
  end
end

local function check_options()
  health.start('Options')
  local parafill = require('parafill')
  if not vim.lsp.is_enabled or not vim.lsp.is_enabled(parafill.name) then
    health.warn("the 'parafill' LSP config is not enabled", {
      "Call require('parafill').setup{} in your init.lua (or vim.lsp.enable('parafill')).",
    })
  else
    health.ok("'parafill' LSP config enabled")
  end
  health.info('settings sent to the server: ' .. vim.inspect(parafill.options.settings))
  health.info(('ghost text %s'):format(parafill.is_enabled() and 'enabled' or 'disabled'))
end

local function check_client()
  health.start('Client and server status')
  local parafill = require('parafill')
  local all = parafill.clients()
  if #all == 0 then
    health.warn('no parafill client is running', {
      'Open a file of a supported filetype: ' .. table.concat(
        (vim.lsp.config and vim.lsp.config[parafill.name] or {}).filetypes or {}, ', '),
      'If one is open, see :LspLog for why the server did not start.',
    })
    return
  end
  local here = parafill.clients(0)
  if #here > 0 then
    health.ok(('attached to the current buffer (client id %d)'):format(here[1].id))
  else
    health.info('running, but not attached to the current buffer')
  end
  local client = here[1] or all[1]
  if not client.server_capabilities or not client.server_capabilities.inlineCompletionProvider then
    health.warn('the server does not advertise inlineCompletionProvider; only the completion fallback works')
  end
  -- A short synchronous request: :checkhealth is interactive, and a stuck
  -- server is exactly what the user wants to learn about.
  local response, err = client:request_sync('parafill/status', {}, 2000, 0)
  if not response then
    health.error('parafill/status got no answer within 2 s: ' .. tostring(err), {
      'The server may be busy loading the model; try again, or run :ParafillRestart.',
    })
  elseif response.err then
    health.error('parafill/status failed: ' .. vim.inspect(response.err))
  else
    health.ok(parafill.format_status(response.result))
  end
end

function M.check()
  check_version()
  check_executable()
  check_options()
  check_client()
end

return M
