"""`parafill eval`: the test runner, cursor placement, metrics, and a tiny end-to-end run."""
from __future__ import annotations

import gzip
import json
import random
import time
from pathlib import Path

import pytest

from fim.positions import offset_at
from tools import evaluate, humaneval
from tools.humaneval import place_cursor, run_tests, task_placement

try:
    humaneval.find_data_dir()
    HAVE_DATA = True
except FileNotFoundError:
    HAVE_DATA = False

needs_data = pytest.mark.skipif(not HAVE_DATA, reason="human-eval-infilling data not found (set PARAFILL_HUMANEVAL_DIR)")


@pytest.fixture(scope="module")
def single_tasks():
    return {t.task_id: t for t in humaneval.load_tasks("single")}


def _task_with(tasks, solution_line: str):
    for task in tasks.values():
        if task.canonical_solution.strip() == solution_line:
            return task
    raise AssertionError(f"no task whose middle is {solution_line!r}")


# --- the sandboxed runner -----------------------------------------------------------

@needs_data
def test_canonical_passes_and_wrong_fails(single_tasks):
    task = _task_with(single_tasks, "return number % 1.0")
    placement = task_placement(task)
    assert run_tests(task, placement.program(placement.expected)).passed
    wrong = run_tests(task, placement.program("    return number"))
    assert not wrong.passed and wrong.status == "failed"
    assert "AssertionError" in wrong.detail

    other = single_tasks["SingleLineInfilling/HumanEval/0/L0"]
    placement = task_placement(other)
    assert run_tests(other, placement.program(placement.expected)).passed
    assert not run_tests(other, placement.program("")).passed  # syntax error: the loop body has no loop


@needs_data
@pytest.mark.parametrize("escape", ["    import sys; sys.exit(0)", "    import os; os._exit(0)"])
def test_exiting_early_does_not_pass(single_tasks, escape):
    task = _task_with(single_tasks, "return number % 1.0")
    outcome = run_tests(task, task_placement(task).program(escape))
    assert not outcome.passed


@needs_data
def test_infinite_loop_is_killed_by_the_timeout(single_tasks):
    task = _task_with(single_tasks, "return number % 1.0")
    started = time.monotonic()
    outcome = run_tests(task, task_placement(task).program("    while True:\n        pass"), timeout_s=1.0)
    assert outcome.status == "timeout" and not outcome.passed
    assert time.monotonic() - started < 8


@needs_data
def test_memory_limit_applies(single_tasks):
    task = _task_with(single_tasks, "return number % 1.0")
    program = task_placement(task).program("    hog = bytearray(4 << 30)\n    return number % 1.0")
    outcome = run_tests(task, program, memory_mb=512)
    assert not outcome.passed and "MemoryError" in outcome.detail


# --- where the cursor sits ---------------------------------------------------------

@needs_data
@pytest.mark.parametrize("benchmark", ["single", "multi"])
def test_editor_placement_rebuilds_every_canonical_program(benchmark):
    tasks = humaneval.load_tasks(benchmark)
    assert len(tasks) > 1000
    for task in tasks:
        placement = task_placement(task)
        assert placement.program(placement.expected) == task.prompt + task.canonical_solution + task.suffix
        # the cursor is on an empty line: the user opened a line and writes the middle on it
        assert placement.text[placement.offset - 1: placement.offset + 1] == "\n\n"
        assert placement.character == 0
        assert offset_at(placement.text, placement.line, placement.character) == placement.offset
        assert not placement.expected.endswith("\n")


@needs_data
def test_random_span_keeps_the_document_as_cut():
    for task in humaneval.load_tasks("random-light"):
        placement = task_placement(task)
        assert placement.program(placement.expected) == task.prompt + task.canonical_solution + task.suffix
        assert offset_at(placement.text, placement.line, placement.character) == placement.offset


@needs_data
def test_document_path_names_the_problem_only(single_tasks):
    task = single_tasks["SingleLineInfilling/HumanEval/0/L0"]
    assert humaneval.document_path(task) == "humaneval/HumanEval_0.py"


def test_placement_counts_utf16_units():
    placement = place_cursor("s = '\U0001F600' + f(", "a)", "\nprint(s)\n")
    assert placement.text == "s = '\U0001F600' + f(\nprint(s)\n"
    assert (placement.line, placement.character) == (0, 13)  # the emoji is two UTF-16 units
    placement = place_cursor("x = 1\n", "y = 2\n", "z = 3\n")
    assert (placement.text, placement.line, placement.character) == ("x = 1\n\nz = 3\n", 1, 0)
    assert placement.program("y = 2") == "x = 1\ny = 2\nz = 3\n"


# --- metrics -----------------------------------------------------------------------

def test_edit_similarity():
    assert evaluate.levenshtein("kitten", "sitting") == 3
    assert evaluate.edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert evaluate.edit_similarity("sitting", "kitten") == pytest.approx(1 - 3 / 7)
    assert evaluate.edit_similarity("", "") == 1.0
    assert evaluate.edit_similarity("abc", "") == 0.0
    assert evaluate.edit_similarity("return x", "return x") == 1.0
    assert evaluate.edit_similarity("ab", "ba") == pytest.approx(0.0)


def test_exact_match_ignores_trailing_whitespace_only():
    assert evaluate.exact_match("x = 1  \n", "x = 1")
    assert not evaluate.exact_match(" x = 1", "x = 1")
    assert not evaluate.exact_match("x = 1\ny = 2", "x = 1")


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 11)]
    assert evaluate.percentile(values, 50) == 5.0
    assert evaluate.percentile(values, 90) == 9.0
    assert evaluate.percentile([], 50) is None


def test_rest_of_line_cuts_are_deterministic_and_editor_shaped():
    text = Path(humaneval.__file__).read_text(encoding="utf-8")
    cuts = [evaluate.rest_of_line_cut(text, random.Random(7)) for _ in range(2)]
    assert cuts[0] == cuts[1]
    rng = random.Random(1)
    for _ in range(200):
        cursor, end = evaluate.rest_of_line_cut(text, rng)
        line_start = text.rfind("\n", 0, cursor) + 1
        assert text[line_start:cursor].strip(), "something is typed before the cursor"
        assert len(text[cursor:end].strip()) >= 2 and "\n" not in text[cursor:end]


# --- end to end on the tiny random model --------------------------------------------

@needs_data
def test_tiny_end_to_end(tmp_path, capsys):
    from tools.tiny_native import make_tiny_model

    model = make_tiny_model(tmp_path / "model")
    corpus = tmp_path / "valid.jsonl.gz"
    with gzip.open(corpus, "wt", encoding="utf-8") as handle:
        for module in (humaneval, evaluate):
            source = Path(module.__file__)
            handle.write(json.dumps({"package": "parafill", "path": source.name, "language": "python",
                                     "text": source.read_text(encoding="utf-8")}) + "\n")
    out = tmp_path / "results" / "tiny.json"
    code = evaluate.main([
        "--model", str(model), "--device", "cpu", "--tasks", "single", "--limit", "2",
        "--heldout", "2", "--corpus", str(corpus), "--decoders", "diffusion,autoregressive",
        "--steps", "2", "--warmup", "0", "--out", str(out), "--samples",
    ])
    assert code == 0
    report = json.loads(out.read_text())
    assert {"model", "device", "command", "git_commit", "settings", "options"} <= report.keys()
    assert report["model"]["parameters"] > 0
    assert "--limit 2" in report["command"]
    assert [s["decoder"] for s in report["settings"]] == ["diffusion", "autoregressive"]
    for setting in report["settings"]:
        single, heldout = setting["metrics"]["single"], setting["metrics"]["heldout"]
        assert single["count"] == 2 and heldout["count"] == 2
        assert 0.0 <= single["pass@1"] <= 1.0
        for metrics in (single, heldout):
            assert 0.0 <= metrics["exact_match"] <= 1.0 and 0.0 <= metrics["edit_similarity"] <= 1.0
            assert metrics["latency_ms"]["p50"] > 0 and metrics["latency_ms"]["p90"] >= metrics["latency_ms"]["p50"]
            assert metrics["tokens_per_step"] is not None and metrics["tokens_per_s"] is not None
    # The native denoiser reports its certainty, so the minConfidence table is there.
    gates = report["settings"][0]["metrics"]["single"]["min_confidence"]
    assert set(gates) == {"0.3", "0.5", "0.7", "0.9"} and all(0 <= g["shown"] <= 1 for g in gates.values())
    # autoregressive decoding writes one token per forward pass
    assert report["settings"][1]["metrics"]["single"]["tokens_per_step"] <= 1.0
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = [json.loads(line) for line in gzip.open(out.with_suffix(".samples.jsonl.gz"), "rt")]
    assert len(samples) == 2 * (2 + 2) and all("status" in s for s in samples if s["suite"] == "single")
    table = capsys.readouterr().out
    assert "single pass@1" in table and "autoregressive" in table


def test_confidence_gates_count_what_would_be_shown():
    from concurrent.futures import Future

    def attempt(completion, expected, confidence, passed=None):
        a = evaluate.Attempt("id", completion, expected, 1.0, 1, 1, "model", confidence=confidence)
        if passed is not None:
            a.test = Future()
            a.test.set_result(humaneval.TestOutcome(passed, "passed" if passed else "failed", ""))
        return a

    attempts = [attempt("x = 1", "x = 1", 0.95, True), attempt("y", "z", 0.6, False),
                attempt("", "q", 0.99, False), attempt("w", "w", 0.2, True)]
    gates = evaluate.gated(attempts)
    assert gates["0.5"] == {"shown": 0.5, "exact_match_of_shown": 0.5, "pass@1_of_shown": 0.5}
    assert gates["0.9"] == {"shown": 0.25, "exact_match_of_shown": 1.0, "pass@1_of_shown": 1.0}
    assert gates["0.3"]["shown"] == 0.5  # the empty completion is never shown, however sure


def test_missing_corpus_is_a_clear_error(tmp_path, capsys):
    code = evaluate.main(["--tasks", "", "--heldout", "3", "--corpus", str(tmp_path / "nope.jsonl.gz")])
    assert code == 2
    assert "nope.jsonl.gz: missing" in capsys.readouterr().err


def test_budgets_give_one_row_each_and_a_plot(tmp_path):
    """`--budgets`: one row per latency budget (a spent one cuts every answer), and the budget plot."""
    from tools.tiny_native import make_tiny_model

    model = make_tiny_model(tmp_path / "model")
    corpus = tmp_path / "valid.jsonl.gz"
    with gzip.open(corpus, "wt", encoding="utf-8") as handle:
        source = Path(humaneval.__file__)
        handle.write(json.dumps({"package": "parafill", "path": source.name, "language": "python",
                                 "text": source.read_text(encoding="utf-8")}) + "\n")
    out = tmp_path / "budgets.json"
    code = evaluate.main(["--model", str(model), "--device", "cpu", "--tasks", "", "--heldout", "2",
                          "--corpus", str(corpus), "--steps", "4", "--budgets", "0,1", "--warmup", "0",
                          "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert [s["latency_budget_ms"] for s in report["settings"]] == [0, 1]
    assert report["settings"][0]["metrics"]["heldout"]["budget_cuts"] == 0
    assert "exact_match" in report["settings"][1]["metrics"]["heldout"]
    assert out.with_suffix(".budgets.png").stat().st_size > 0


def test_the_completed_document_is_its_own_draft_source_and_is_forgotten(tmp_path):
    """As in the editor with repoDrafts on: a line the document already holds is offered as a
    draft at a cursor that starts the same way; the next item starts from an empty index."""
    from dataclasses import replace

    from denoiser.engine import Engine
    from lsp_server.settings import Settings
    from tools.tiny_native import make_tiny_model

    engine = Engine.load(str(make_tiny_model(tmp_path / "model")), device="cpu")
    text = "def area(shape):\n    return shape.width * shape.height\n\ndef other(shape):\n    return shape.\n"
    line, character = 4, len("    return shape.")
    placement = humaneval.EditorPlacement(text=text, offset=len(text) - 1, line=line, character=character,
                                          expected="width * shape.height")
    settings = replace(Settings(), min_confidence=0.0, steps=2)
    path = evaluate.CompletionPath(engine, settings)
    _, found, _ = path.complete(placement, path="shapes.py", language_id="python", document="eval:1")
    assert found.request.draft == "width * shape.height"
    assert found.draft in ("accepted", "repaired", "rejected")
    assert "eval:1" not in path.drafts
    alone = evaluate.CompletionPath(engine, replace(settings, repo_drafts=False))
    _, found, _ = alone.complete(placement, path="shapes.py", language_id="python", document="eval:2")
    assert alone.drafts is None and not found.request.draft and found.draft is None
