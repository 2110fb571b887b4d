-- Loaded on startup when this directory is on 'runtimepath'. It only defines the
-- :ParafillSetup command; nothing starts until the user calls
-- require('parafill').setup{} (or :ParafillSetup), so installing the plugin
-- never spawns a process behind the user's back.
if vim.g.loaded_parafill then
  return
end
vim.g.loaded_parafill = true

vim.api.nvim_create_user_command('ParafillSetup', function()
  require('parafill').setup(vim.g.parafill or {})
end, { desc = 'Start parafill with the options in vim.g.parafill' })
