"""HumanEval-infilling tasks: loading, editor-realistic cursor placement, sandboxed tests.

The benchmark (Bavarian et al. 2022, `human-eval-infilling`) cuts each HumanEval
solution into prefix (`prompt`), middle (`canonical_solution`) and `suffix`.
This module turns a task into the document and cursor an editor user would
have, and decides pass/fail by running the task's own tests on
prefix + completion + suffix in a separate, resource-limited Python process.

Generated code is never imported or executed in this process, and nothing here
touches the model or tensors.
"""
from __future__ import annotations

import gzip
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fim.positions import position_at

BENCHMARKS = {
    "single": "HumanEval-SingleLineInfilling.jsonl.gz",
    "multi": "HumanEval-MultiLineInfilling.jsonl.gz",
    "random": "HumanEval-RandomSpanInfilling.jsonl.gz",
    "random-light": "HumanEval-RandomSpanInfillingLight.jsonl.gz",
}

_REPO = Path(__file__).resolve().parent.parent
DATA_DIR_CANDIDATES = (
    _REPO / "eval" / "human-eval-infilling",  # the copy this repository ships (MIT, see its LICENSE)
    _REPO / "shared" / "data" / "human-eval-infilling",
    _REPO.parent / "shared" / "data" / "human-eval-infilling",
    _REPO / "data" / "human-eval-infilling",
)


@dataclass(frozen=True)
class Task:
    task_id: str
    benchmark: str
    prompt: str  # text before the middle
    suffix: str  # text after the middle
    canonical_solution: str  # the middle
    test: str  # defines check(candidate)
    entry_point: str


def find_data_dir(explicit: str | Path | None = None) -> Path:
    """The human-eval-infilling directory: the explicit one, $PARAFILL_HUMANEVAL_DIR, or a known place."""
    chosen = explicit or os.environ.get("PARAFILL_HUMANEVAL_DIR")
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such directory; it should hold the HumanEval-*Infilling.jsonl.gz files")
        return path
    for candidate in DATA_DIR_CANDIDATES:
        if (candidate / BENCHMARKS["single"]).is_file():
            return candidate
    places = ", ".join(str(c) for c in DATA_DIR_CANDIDATES)
    raise FileNotFoundError(
        f"HumanEval-infilling data not found (looked in {places}); "
        "pass --humaneval-dir DIR or set PARAFILL_HUMANEVAL_DIR"
    )


def load_tasks(benchmark: str, data_dir: str | Path | None = None) -> list[Task]:
    """All tasks of one benchmark ("single", "multi", "random", "random-light"), in file order."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose from {', '.join(BENCHMARKS)}")
    path = find_data_dir(data_dir) / BENCHMARKS[benchmark]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; download human-eval-infilling's data files into that directory")
    tasks = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                tasks.append(
                    Task(
                        task_id=record["task_id"],
                        benchmark=benchmark,
                        prompt=record["prompt"],
                        suffix=record["suffix"],
                        canonical_solution=record["canonical_solution"],
                        test=record["test"],
                        entry_point=record["entry_point"],
                    )
                )
            except (json.JSONDecodeError, KeyError) as exc:
                raise ValueError(f"{path}:{number}: not a human-eval-infilling record ({exc})") from exc
    return tasks


def spread(items: list, limit: int | None) -> list:
    """At most `limit` items evenly spaced through the list (all when limit is None or large).

    The files are ordered by problem, so the first N tasks would all come from
    the first few problems; evenly spaced ones cover the whole benchmark.
    """
    if limit is None or limit >= len(items):
        return list(items)
    if limit <= 0:
        return []
    return [items[i * len(items) // limit] for i in range(limit)]


# --- where the editor's cursor is -------------------------------------------------

@dataclass(frozen=True)
class EditorPlacement:
    """The document an editor user has, the cursor in it, and how a completion lands.

    `text` is the document with the middle missing, the cursor at `offset`
    (`line`, `character` in LSP UTF-16 units). Accepting a completion inserts it
    at the cursor, so the resulting program is `before + completion + after`
    (`before` = text[:offset], `after` = text[offset:]).
    `expected` is what the completion must be to rebuild the original program.
    """

    text: str
    offset: int
    line: int
    character: int
    expected: str

    @property
    def before(self) -> str:
        return self.text[: self.offset]

    @property
    def after(self) -> str:
        return self.text[self.offset:]

    def program(self, completion: str) -> str:
        return self.before + completion + self.after


def place_cursor(prefix: str, middle: str, suffix: str) -> EditorPlacement:
    """Where an editor user's cursor sits when `middle` is what they still have to write.

    A middle that ends with a newline (every single- and multi-line task) was
    cut right after a line break. In an editor the missing lines leave one
    empty line behind: the user opened a new line (or deleted the lines'
    content) and the cursor sits on it. So the document is prefix + "\\n" +
    suffix with the cursor on that empty line, and the completion the user
    needs is the middle without its final newline, because the line break
    after the cursor is already in the document. Any other middle (random
    spans cut mid-line) leaves the document prefix + suffix.
    """
    if middle.endswith("\n"):
        expected = middle[:-1]
        text = prefix + "\n" + suffix
    else:
        expected = middle
        text = prefix + suffix
    offset = len(prefix)
    line, character = position_at(text, offset)
    return EditorPlacement(text=text, offset=offset, line=line, character=character, expected=expected)


def document_path(task: Task) -> str:
    """The file name the editor shows: the problem's, e.g. humaneval/HumanEval_0.py.

    Only the problem id: the benchmark and the cut position are not something
    an editor's file name would reveal.
    """
    parts = task.task_id.split("/")
    problem = "_".join(parts[1:3]) if len(parts) >= 3 else task.task_id.replace("/", "_")
    return f"humaneval/{problem}.py"


def task_placement(task: Task) -> EditorPlacement:
    return place_cursor(task.prompt, task.canonical_solution, task.suffix)


# --- running a task's tests -------------------------------------------------------

@dataclass(frozen=True)
class TestOutcome:
    passed: bool
    status: str  # "passed" | "failed" | "timeout"
    detail: str = ""  # the end of stderr, for a failure


# Run inside the child before the task: generated code must not delete files,
# start processes or reach the network. Not a security boundary (the process
# limits and the temporary working directory are the real fences), but it
# keeps an accidental `shutil.rmtree` or `os.system` from doing harm.
_GUARD = """\
import builtins as _b, os as _os, shutil as _sh, subprocess as _sp, socket as _so
def _refused(*args, **kwargs):
    raise PermissionError("refused by the parafill eval sandbox")
for _mod, _names in ((_os, ("system", "kill", "killpg", "fork", "forkpty", "remove", "unlink", "rmdir",
                             "removedirs", "rename", "renames", "replace", "truncate", "chmod", "chown",
                             "putenv", "setuid", "execv", "execve", "execvp", "spawnv", "popen")),
                     (_sh, ("rmtree", "move", "chown")),
                     (_sp, ("Popen", "run", "call", "check_call", "check_output")),
                     (_so, ("socket", "create_connection"))):
    for _name in _names:
        if hasattr(_mod, _name):
            setattr(_mod, _name, _refused)
del _b, _mod, _names, _name
"""


def build_test_program(task: Task, program: str, marker: str) -> str:
    """The child's source: guard, the candidate program, the task's tests, then the pass marker.

    The marker is a fresh random token printed only after `check` returns, so a
    completion that exits early with status 0 (`sys.exit()`, `os._exit(0)`)
    cannot pass.
    """
    return (
        _GUARD
        + "\n"
        + program
        + "\n\n"
        + task.test
        + f"\n\ncheck({task.entry_point})\nprint({marker!r}, flush=True)\n"
    )


def _limit_resources(memory_bytes: int, cpu_seconds: int) -> None:
    """In the child, before exec: cap address space, CPU time, file size and core dumps."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_tests(task: Task, program: str, *, timeout_s: float = 10.0, memory_mb: int = 2048) -> TestOutcome:
    """Run the task's tests on `program` in a fresh, isolated, resource-limited Python process."""
    marker = f"PARAFILL-PASSED-{secrets.token_hex(8)}"
    source = build_test_program(task, program, marker)
    cpu_seconds = max(1, int(timeout_s) + 1)
    with tempfile.TemporaryDirectory(prefix="parafill-eval-") as workdir:
        script = Path(workdir) / "candidate.py"
        script.write_text(source, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        # -I: no user site-packages, no PYTHONPATH, no script directory magic.
        child = subprocess.Popen(
            [sys.executable, "-I", str(script)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so a timeout kills everything it started
            preexec_fn=lambda: _limit_resources(memory_mb << 20, cpu_seconds),
        )
        try:
            stdout, stderr = child.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(child)
            child.communicate()
            return TestOutcome(False, "timeout", f"killed after {timeout_s:g} s")
        finally:
            if child.poll() is None:
                _kill_group(child)
                child.wait()
    if child.returncode == 0 and marker.encode() in stdout:
        return TestOutcome(True, "passed")
    if child.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return TestOutcome(False, "timeout", f"CPU limit of {cpu_seconds} s reached")
    tail = stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
    return TestOutcome(False, "failed", "\n".join(tail))


def _kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
