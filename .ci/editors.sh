#!/usr/bin/env bash
# Build and test the VS Code extension: install from the lockfile, run the unit
# tests (node --test, vscode stubbed), and package the .vsix.
# Called by .ci/run; needs Node >= 20 and npm. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/../editors/vscode"
if ! command -v npm >/dev/null 2>&1; then
  echo "editors.sh: npm not found; install Node.js >= 20 to build the VS Code extension" >&2
  exit 1
fi
npm ci
npm test
npx --no-install vsce package --out parafill.vsix
ls -l parafill.vsix
