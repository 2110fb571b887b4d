"""The README's first command, as a new user runs it: `parafill complete` on examples/demo.py.

Its cursor must sit where an editor asks for a completion (the rest of the line
empty), and what it prints must say in words what happened, with the embedded
model, whatever that model suggests.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from lsp_server.settings import Settings

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def readme_first_location() -> tuple[str, int, int]:
    first_block = (REPO / "README.md").read_text(encoding="utf-8").split("```")[1]
    match = re.search(r"parafill complete (\S+):(\d+):(\d+)", first_block)
    assert match, first_block
    return match[1], int(match[2]), int(match[3])


def test_the_first_command_asks_at_the_end_of_an_unfinished_line():
    name, line, column = readme_first_location()
    lines = (REPO / name).read_text(encoding="utf-8").split("\n")
    cursor_line = lines[line - 1]
    assert cursor_line.strip(), "the cursor line has code before the cursor"
    assert column == len(cursor_line) + 1, f"text after the cursor: {cursor_line[column - 1:]!r}"
    assert f"parafill complete {name}:{line}:{column}" in lines[0]  # the demo file names the same command


def test_the_first_command_says_what_happened_in_words():
    name, line, column = readme_first_location()
    run = subprocess.run([sys.executable, "-m", "lsp_server", "complete", f"{name}:{line}:{column}", "--device", "cpu"],
                         capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    said = run.stderr.strip().splitlines()[-1]
    outcome = said.split("; took ")[0]
    # On a busy machine the latency budget may stop the model: that is said too.
    late = r"(; the latency budget stopped the model early \(--latency-budget-ms 0 lets it finish\))?"
    assert re.fullmatch(
        r"parafill: (rest-of-line suggestion from the model, confidence 0\.\d\d" + late +
        r"|no suggestion: the model was not sure enough \(confidence 0\.\d\d < minConfidence "
        + re.escape(f"{Settings().min_confidence:g}") + "; "
        r"--min-confidence 0 shows it\)" + late +
        r"|no suggestion: what the model wrote added nothing here once tidied .*"
        r"|no suggestion: the latency budget ran out before the model wrote anything \(--latency-budget-ms 0 "
        r"lets it finish\)"
        r"|no suggestion: the model wrote nothing here)", outcome), said
    assert re.search(r"; took \d+ ms, \d+ ms in the model \(\d+ tokens?, \d+ denoising steps?; "
                     r"default_model on cpu, loaded in \d+ ms\)$", said), said
    assert (run.stdout.strip() != "") == outcome.startswith("parafill: rest-of-line suggestion"), run.stdout
