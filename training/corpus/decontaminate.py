"""Keep HumanEval out of the training corpus.

Reads the human-eval-infilling files (``*.jsonl.gz`` whose records hold
``task_id``, ``entry_point``, ``prompt``, ``canonical_solution``, ``suffix``),
rebuilds each task's full function (prompt + solution + suffix), and splits it
with ``ast`` into the original HumanEval prompt (signature and docstring) and
the canonical solution (the body after the docstring).

A corpus file is contaminated when, after whitespace normalisation (each line
stripped, inner runs of whitespace collapsed, blank lines dropped), it holds
the whole prompt or the whole solution as consecutive lines.  Solutions
shorter than ``MIN_SOLUTION_CHARS`` (``return a + b``) would match unrelated
code, so they only count together with the function's ``def`` line.
"""

from __future__ import annotations

import ast
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

MIN_SOLUTION_CHARS = 64


def normalise_lines(text: str) -> list[str]:
    """Lines with whitespace normalised; blank lines removed."""
    out = []
    for line in text.splitlines():
        norm = " ".join(line.split())
        if norm:
            out.append(norm)
    return out


@dataclass(frozen=True)
class Pattern:
    task_id: str
    kind: str  # "prompt" or "solution"
    lines: tuple[str, ...]


def _split_task(full: str, entry_point: str) -> tuple[str, str] | None:
    """(prompt, solution) source text of the entry-point function, or None."""
    try:
        tree = ast.parse(full)
    except SyntaxError:
        return None
    src_lines = full.splitlines()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == entry_point:
            body = node.body
            first = body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                doc_end = first.end_lineno
            else:
                doc_end = node.lineno  # no docstring: the prompt is the signature
            sig_start = node.lineno - 1
            prompt = "\n".join(src_lines[sig_start:doc_end])
            solution = "\n".join(src_lines[doc_end : node.end_lineno])
            return prompt, solution
    return None


def patterns_from_records(records) -> list[Pattern]:
    """Contamination patterns from human-eval-infilling records (any variant)."""
    seen: set[tuple[str, tuple[str, ...]]] = set()
    patterns: list[Pattern] = []
    for rec in records:
        parts = rec["task_id"].split("/")
        task = "/".join(parts[1:3]) if len(parts) >= 3 else rec["task_id"]
        full = rec["prompt"] + rec["canonical_solution"] + rec["suffix"]
        split = _split_task(full, rec["entry_point"])
        candidates: list[tuple[str, list[str]]] = []
        if split is None:
            # Unparseable: fall back to the whole text as one pattern.
            candidates.append(("prompt", normalise_lines(full)))
        else:
            prompt, solution = split
            prompt_lines = normalise_lines(prompt)
            sol_lines = normalise_lines(solution)
            candidates.append(("prompt", prompt_lines))
            if sum(len(s) for s in sol_lines) >= MIN_SOLUTION_CHARS:
                candidates.append(("solution", sol_lines))
            elif sol_lines:
                candidates.append(("solution", prompt_lines[:1] + sol_lines))
        for kind, lines in candidates:
            key = (task, tuple(lines))
            if lines and key not in seen:
                seen.add(key)
                patterns.append(Pattern(task, kind, tuple(lines)))
    return patterns


def load_patterns(directory: str | Path) -> list[Pattern]:
    """Patterns from every ``*.jsonl.gz`` in a human-eval-infilling directory."""
    directory = Path(directory)
    files = sorted(directory.glob("*.jsonl.gz"))
    if not files:
        raise FileNotFoundError(
            f"no *.jsonl.gz files in {directory}: point --humaneval at the "
            "human-eval-infilling data directory"
        )
    records = []
    for f in files:
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            records.extend(json.loads(line) for line in fh if line.strip())
    return patterns_from_records(records)


class Decontaminator:
    """``match(text)`` returns the task id a file contains, or None."""

    def __init__(self, patterns: list[Pattern]):
        self.patterns = patterns
        self._by_first: dict[str, list[Pattern]] = {}
        for p in patterns:
            self._by_first.setdefault(p.lines[0], []).append(p)

    def match(self, text: str) -> str | None:
        lines = normalise_lines(text)
        by_first = self._by_first
        for i, line in enumerate(lines):
            cands = by_first.get(line)
            if not cands:
                continue
            for p in cands:
                n = len(p.lines)
                if tuple(lines[i : i + n]) == p.lines:
                    return p.task_id
        return None
