-- parafill language server config for `vim.lsp.config` / `vim.lsp.enable` (Neovim >= 0.11).
--
-- Put this directory on 'runtimepath' (any plugin manager does) and run
-- `vim.lsp.enable('parafill')`, or call `require('parafill').setup{}` which also
-- turns on inline completion and keymaps. This file only describes how to start
-- the server; it must not change editor state.
--
-- Override any field with `vim.lsp.config('parafill', { ... })`, e.g.
--   vim.lsp.config('parafill', { cmd = { 'parafill', 'serve', '--device', 'cuda' } })
--   vim.lsp.config('parafill', { init_options = { parafill = { steps = 4 } } })

---@type vim.lsp.Config
return {
  cmd = { 'parafill', 'serve' },
  filetypes = {
    'python', 'javascript', 'javascriptreact', 'typescript', 'typescriptreact',
    'lua', 'go', 'rust', 'c', 'cpp', 'java', 'sh', 'ruby', 'php',
  },
  -- Completions need no project root; fall back to the file's directory so
  -- single files get a client too.
  root_markers = { '.git', 'pyproject.toml', 'package.json', 'Cargo.toml', 'go.mod' },
  workspace_required = false,
  -- Sent as initializationOptions; the server reads the `parafill` table
  -- (camelCase keys, see editors/README.md for the full list).
  init_options = { parafill = {} },
  settings = { parafill = {} },
}
