"""Runs the VS Code extension's own unit tests (`npm test`) when Node is installed.

The extension is TypeScript (editors/vscode); its tests use Node's test runner
with the `vscode` module stubbed. Skips when node/npm or the installed
node_modules are missing (`.ci/editors.sh` runs `npm ci` first in CI).
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

VSCODE_DIR = Path(__file__).resolve().parents[1] / "editors" / "vscode"


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm not installed (Node.js >= 20 needed)")
def test_vscode_extension_unit_tests():
    if not (VSCODE_DIR / "node_modules" / "vscode-languageclient").is_dir():
        pytest.skip("run `npm ci` in editors/vscode first (or .ci/editors.sh)")
    proc = subprocess.run(["npm", "test"], cwd=VSCODE_DIR, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "# fail 0" in proc.stdout
