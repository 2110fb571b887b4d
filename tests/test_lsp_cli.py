"""`parafill complete FILE:LINE:COL` and the CLI's errors, run as a user runs them.

`complete` goes through the same path as the server (lsp_server.suggest), so the
same tiny model gives the same text here as in an editor; what is checked is the
output's shape, its timing fields, and one-line errors with exit code 2.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

SOURCE = "import os\n\n\ndef read_lines(path):\n    with open(path) as handle:\n        return [l for l in handle]\n"


def parafill(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lsp_server", *args], capture_output=True, text=True,
                          env=ENV, cwd=REPO, timeout=timeout)


@pytest.fixture()
def source_file(tmp_path) -> Path:
    path = tmp_path / "lines.py"
    path.write_text(SOURCE, encoding="utf-8")
    return path


def test_complete_prints_the_suggestion_and_its_timing(source_file, parafill_tiny_model):
    run = parafill("complete", f"{source_file}:6:16", "--model", str(parafill_tiny_model), "--device", "cpu",
                   "--steps", "4", "--min-confidence", "0")
    assert run.returncode == 0, run.stderr
    timing = run.stderr.strip().splitlines()[-1]
    match = re.fullmatch(
        r"parafill: ([\d.]+) ms total, model ([\d.]+) ms, (\d+) tokens, (\d+) steps, cache source (\w+), "
        r"(line|block) span, (\S+) on cpu \(load \d+ ms\)( \(no suggestion\))?", timing)
    assert match, timing
    total, model = float(match[1]), float(match[2])
    assert 0 < model <= total
    assert match[5] == "model" and int(match[4]) >= 1
    assert match[7] == parafill_tiny_model.name
    printed = run.stdout[:-1] if run.stdout.endswith("\n") else run.stdout
    assert (printed == "") == (match[8] is not None)


def test_complete_json_matches_the_text_output(source_file, parafill_tiny_model):
    common = ["--model", str(parafill_tiny_model), "--device", "cpu", "--steps", "4"]
    # COL counts characters as editors show them; the LSP position counts UTF-16 units.
    source_file.write_text(SOURCE.replace("[l for", "['é😀' for"), encoding="utf-8")
    run = parafill("complete", f"{source_file}:6:25", "--json", *common)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert set(result) >= {"text", "raw", "total_ms", "model_ms", "tokens", "steps", "source", "device", "model"}
    assert result["device"] == "cpu" and result["source"] == "model"
    assert result["position"] == {"line": 5, "character": 25}  # the emoji before column 25 is two units
    assert isinstance(result["raw"], str)
    assert result["text"] is None or isinstance(result["text"], str)
    assert result["tokens"] >= 1 and result["steps"] <= 4 * 2  # a span may grow once
    assert 0 < result["confidence"] < 1


def test_a_doubtful_suggestion_is_hidden_and_the_user_told_why(source_file, parafill_tiny_model):
    # The tiny random model is never sure: the default gate (0.3) hides what it writes.
    run = parafill("complete", f"{source_file}:6:16", "--model", str(parafill_tiny_model), "--device", "cpu",
                   "--steps", "4")
    assert run.returncode == 0 and run.stdout.strip() == "", run.stderr
    assert "is under minConfidence 0.3; --min-confidence 0 shows it)" in run.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model/dir"], "/no/such/model/dir: no such directory"),
    ([], None),  # filled in below: a location past the end of the file
])
def test_errors_are_one_line_with_exit_code_2(source_file, parafill_tiny_model, args, message):
    if not args:
        args = ["--model", str(parafill_tiny_model)]
        location, message = f"{source_file}:99:1", "line 99 is past the end"
    else:
        location = f"{source_file}:1:1"
    run = parafill("complete", location, *args, "--device", "cpu")
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("parafill: error: ")
    assert message in lines[0]
    assert run.stdout == ""


def test_a_broken_model_directory_is_one_line(source_file, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("[]", encoding="utf-8")
    run = parafill("complete", f"{source_file}:1:1", "--model", str(broken), "--device", "cpu")
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "config.json" in lines[0]


@pytest.mark.parametrize("location, message", [
    ("nocolons", "expected FILE:LINE:COL"),
    ("file.py:x:1", "must be whole numbers"),
    ("file.py:0:1", "start at 1"),
])
def test_bad_locations(location, message):
    run = parafill("complete", location)
    assert run.returncode == 2
    assert run.stderr.startswith("parafill: error: ") and message in run.stderr


def test_missing_file(tmp_path):
    run = parafill("complete", f"{tmp_path / 'absent.py'}:1:1")
    assert run.returncode == 2
    assert "absent.py: cannot read the file" in run.stderr
