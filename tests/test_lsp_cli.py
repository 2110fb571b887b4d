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

from lsp_server.settings import Settings

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


TIMING = (r"; took (\d+) ms, (\d+) ms in the model \((\d+) tokens?, (\d+) denoising steps?; "
          r"(\S+) on cpu, loaded in \d+ ms\)")


def test_complete_prints_the_suggestion_and_says_what_happened(source_file, parafill_tiny_model):
    run = parafill("complete", f"{source_file}:6:16", "--model", str(parafill_tiny_model), "--device", "cpu",
                   "--steps", "4", "--min-confidence", "0")
    assert run.returncode == 0, run.stderr
    said = run.stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"parafill: (rest-of-line suggestion from the model, confidence 0\.\d\d"
                         r"(?:; the latency budget stopped the model early \(--latency-budget-ms 0 lets it finish\))?"
                         r"|no suggestion: what the model wrote added nothing here once tidied .*"
                         r"|no suggestion: the latency budget ran out before the model wrote anything .*"
                         r"|no suggestion: the model wrote nothing here)" + TIMING, said)
    assert match, said
    total, model = int(match[2]), int(match[3])
    assert 0 <= model <= total
    assert int(match[5]) >= 1
    assert match[6] == parafill_tiny_model.name
    # stdout holds the suggestion and nothing else: no empty line when there is none.
    assert (run.stdout == "") == match[1].startswith("no suggestion"), (run.stdout, said)


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
    # The tiny random model is never sure: the default gate (minConfidence) hides what it writes.
    # No latency budget: on a busy machine it could stop the model before it writes anything.
    run = parafill("complete", f"{source_file}:6:16", "--model", str(parafill_tiny_model), "--device", "cpu",
                   "--steps", "4", "--latency-budget-ms", "0")
    assert run.returncode == 0 and run.stdout == "", run.stderr
    said = run.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"parafill: no suggestion: the model was not sure enough \(confidence 0\.\d\d "
                        r"< minConfidence " + re.escape(f"{Settings().min_confidence:g}") +
                        r"; --min-confidence 0 shows it\)" + TIMING, said), said


@pytest.mark.parametrize("option, value, expected", [
    ("--steps", "-1", "must be a whole number from 0 to 1024, got -1"),
    ("--confidence-threshold", "0", "must be a number greater than 0 and at most 1, got 0"),
    ("--min-confidence", "nan", "must be a number from 0 to 1, got nan"),
])
def test_an_out_of_range_option_is_one_usage_error(source_file, option, value, expected):
    run = parafill("complete", f"{source_file}:1:1", option, value)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == f"parafill complete: error: argument {option}: {expected}"
    assert "keeping" not in run.stderr and "parafill: parafill" not in run.stderr
    assert run.stdout == ""


def test_a_binary_file_is_refused(tmp_path):
    binary = tmp_path / "image.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10")
    run = parafill("complete", f"{binary}:1:1")
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip() == (f"parafill: error: {binary}: this is a binary file (it contains NUL bytes); "
                                  "parafill completes in text files")


def test_a_file_that_is_not_utf8_is_read_with_a_warning(tmp_path, parafill_tiny_model):
    latin1 = tmp_path / "cafe.py"
    latin1.write_bytes("x = 1\nname = 'café crème'\nname\n".encode("latin-1"))
    run = parafill("complete", f"{latin1}:3:5", "--model", str(parafill_tiny_model), "--device", "cpu",
                   "--steps", "2", "--json")
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip() == (
        f"parafill: warning: {latin1}: not valid UTF-8: 2 undecodable byte sequences read as U+FFFD "
        "(the first at line 2, column 12); save the file as UTF-8, or declare its encoding on line 1 or 2, "
        "e.g. `# -*- coding: latin-1 -*-`")
    assert json.loads(run.stdout)["position"] == {"line": 2, "character": 4}


def test_a_declared_encoding_is_used_without_a_warning(tmp_path, parafill_tiny_model):
    declared = tmp_path / "declared.py"
    # In latin-1 the bytes C3 A9 are two characters, "Ã©"; read as UTF-8 they would be one, "é",
    # and column 26 (the end of the line in latin-1) would be past the end of the line.
    text = "# -*- coding: latin-1 -*-\nname = 'Ã©'; other = name\n"
    declared.write_bytes(text.encode("latin-1"))
    run = parafill("complete", f"{declared}:2:26", "--model", str(parafill_tiny_model), "--device", "cpu",
                   "--steps", "2", "--json")
    assert run.returncode == 0, run.stderr
    assert "warning" not in run.stderr
    assert json.loads(run.stdout)["position"] == {"line": 1, "character": 25}


def test_a_device_this_machine_lacks_names_the_flag_that_fixes_it(source_file):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = parafill("complete", f"{source_file}:1:1", "--device", "cuda")
    assert run.returncode == 2
    assert run.stderr.strip().startswith("parafill: error: device 'cuda': no CUDA device is available (")
    assert run.stderr.strip().endswith("; use --device cpu or --device auto")


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


def test_complete_leaves_nothing_compiling_behind(source_file, parafill_tiny_model, tmp_path):
    # One completion, then the command ends: it starts no compiler for a server's later requests.
    env = {key: value for key, value in ENV.items() if key != "PARAFILL_CPU_COMPILE"}
    run = subprocess.run([sys.executable, "-m", "lsp_server", "complete", f"{source_file}:6:16", "--model",
                          str(parafill_tiny_model), "--device", "cpu", "--steps", "4"], capture_output=True, text=True,
                         env={**env, "PARAFILL_CACHE": str(tmp_path / "cache")}, cwd=REPO, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert not (tmp_path / "cache" / "compiled").exists()
