"""`parafill bench --help` and `parafill eval --help`: every option explained, and no torch.

Asking for help must not import torch (seconds on a laptop): each check runs the
real `parafill` entry point in a fresh interpreter and reads `sys.modules` after
argparse has printed the help.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

HELP_THEN_MODULES = """
import contextlib, io, json, sys
from lsp_server.cli import main
text = io.StringIO()
with contextlib.redirect_stdout(text):
    try:
        main(sys.argv[1:])
    except SystemExit:
        pass
print(json.dumps({"help": text.getvalue(), "heavy": sorted(m for m in ("torch", "numpy", "tokenizers")
                                                             if m in sys.modules)}))
"""


def help_of(*args: str) -> dict:
    run = subprocess.run([sys.executable, "-c", HELP_THEN_MODULES, *args], capture_output=True, text=True,
                         env=ENV, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_help_imports_no_heavy_module(command):
    shown = help_of(command, "--help")
    assert f"usage: parafill {command}" in shown["help"]
    assert shown["heavy"] == []


@pytest.mark.parametrize("module", ["tools.bench", "tools.evaluate"])
def test_every_option_has_help_text(module):
    parser = __import__(module, fromlist=["build_parser"]).build_parser()
    unexplained = [action.option_strings or action.dest for action in parser._actions
                   if not (action.help or "").strip()]
    assert unexplained == []


def test_bench_device_help_says_what_it_chooses():
    shown = help_of("bench", "--help")["help"]
    device = shown[shown.index("\n  --device {auto,cpu,cuda}"):]  # the option's entry, not the usage line
    assert "where the model runs" in " ".join(device.split()[:8])
