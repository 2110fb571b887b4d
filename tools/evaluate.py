"""`parafill eval`: how good and how fast the model's completions are.

Every completion goes through the path an editor's request takes, the server's
own `lsp_server.suggest`: a document and an LSP cursor position →
`fim.build_request` → `Engine.complete` → `fim.postprocess`. What is measured (docs/EVALUATION.md):

- HumanEval-infilling pass@1 (single-line, multi-line, random-span): the task's
  tests run on prefix + completion + suffix in a sandboxed subprocess
  (`tools.humaneval`), with the cursor where an editor user would have it;
- exact match and edit similarity, on those tasks and on rest-of-line cuts of
  the corpus's held-out packages;
- the same weights decoded autoregressively, as a baseline;
- quality against denoising steps / confidence threshold, with tokens per step,
  latency per completion (p50/p90) and tokens per second.

As in the editor with the default settings (`repoDrafts` on), the document being
completed is in the drafts index, so a line it already holds can be proposed as
a draft; nothing else is (no other file of its package). `--no-document-drafts`
measures the model alone.

Results go to a JSON file and a speed-versus-quality plot beside it. This module
never runs generated code in its own process.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import platform
import random
import shlex
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from fim.drafts import DraftIndex
from fim.positions import position_at
from lsp_server.settings import Settings
from lsp_server.suggest import suggest
from tools import humaneval
from tools.humaneval import EditorPlacement

TASK_SETS = ("single", "multi", "random", "random-light")
DECODERS = ("diffusion", "autoregressive")
_REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = _REPO / "data" / "corpus" / "valid.jsonl.gz"


# --- text metrics -------------------------------------------------------------------

def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def edit_similarity(a: str, b: str) -> float:
    """1 - Levenshtein(a, b) / max(len(a), len(b)); 1.0 for two empty strings."""
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    return 1.0 - levenshtein(a, b) / longest


def normalise_for_match(text: str) -> str:
    """Trailing whitespace of lines and of the text does not count against a completion."""
    return "\n".join(line.rstrip() for line in text.split("\n")).rstrip()


def exact_match(completion: str, expected: str) -> bool:
    return normalise_for_match(completion) == normalise_for_match(expected)


# --- held-out rest-of-line examples ---------------------------------------------------

@dataclass(frozen=True)
class HeldOutExample:
    example_id: str
    path: str
    language: str
    placement: EditorPlacement


def rest_of_line_cut(text: str, rng: random.Random, min_rest: int = 2) -> tuple[int, int] | None:
    """(cursor, end of line) for a random rest-of-line completion in `text`, or None.

    The cursor sits after at least one typed non-blank character of a line, and
    at least `min_rest` non-blank characters remain to be completed.
    """
    lines = text.split("\n")
    starts, offset = [], 0
    for line in lines:
        starts.append(offset)
        offset += len(line) + 1
    candidates = [i for i, line in enumerate(lines) if len(line.strip()) >= min_rest + 1]
    if not candidates:
        return None
    number = rng.choice(candidates)
    line = lines[number]
    first = len(line) - len(line.lstrip())
    last_code = len(line.rstrip())
    # cursor in [first + 1, last_code - min_rest]: something typed, something left
    if last_code - min_rest < first + 1:
        return None
    column = rng.randint(first + 1, last_code - min_rest)
    return starts[number] + column, starts[number] + len(line)


def load_heldout(path: Path, count: int, seed: int) -> list[HeldOutExample]:
    """`count` rest-of-line examples cut deterministically (by `seed`) from held-out files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing; build the corpus first (python -m training.corpus) or pass --corpus FILE, "
            "or --heldout 0 to skip the held-out metrics"
        )
    records = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("text"):
                records.append(record)
    if not records:
        raise ValueError(f"{path}: holds no records with text")
    rng = random.Random(seed)
    examples: list[HeldOutExample] = []
    attempts = 0
    while len(examples) < count and attempts < count * 20:
        attempts += 1
        record = rng.choice(records)
        cut = rest_of_line_cut(record["text"], rng)
        if cut is None:
            continue
        cursor, end = cut
        text = record["text"]
        document = text[:cursor] + text[end:]
        line, character = position_at(document, cursor)
        placement = EditorPlacement(
            text=document, offset=cursor, line=line, character=character, expected=text[cursor:end]
        )
        examples.append(
            HeldOutExample(
                example_id=f"{record.get('package', '?')}/{record['path']}@{cursor}",
                path=record["path"],
                language=record.get("language", ""),
                placement=placement,
            )
        )
    return examples


# --- one completion through the editor's path -------------------------------------------

@dataclass(frozen=True)
class Setting:
    decoder: str  # "diffusion" | "autoregressive"
    steps: int | None = None
    confidence_threshold: float | None = None
    latency_budget_ms: int | None = None  # None: the server's default for the device; 0: no budget

    @property
    def label(self) -> str:
        if self.decoder == "autoregressive":
            return "autoregressive"
        steps = "auto" if self.steps == 0 else str(self.steps)
        budget = "" if self.latency_budget_ms is None else f" budget={self.latency_budget_ms or 'none'}"
        return f"diffusion steps={steps} threshold={self.confidence_threshold:g}{budget}"


@dataclass
class Attempt:
    """One completion and how it fared."""

    item_id: str
    completion: str
    expected: str
    latency_ms: float
    tokens: int
    steps: int
    source: str
    test: Future | None = None  # a humaneval.TestOutcome, for HumanEval tasks
    extra: dict = field(default_factory=dict)
    confidence: float | None = None  # the model's own certainty (the minConfidence setting gates on it)


class CompletionPath:
    """The server's own suggestion path (`lsp_server.suggest`) for one decoding setting,
    so that what is scored is exactly what an editor would be shown."""

    def __init__(self, engine, settings, *, postprocess: bool = True):
        self.engine = engine
        self.settings = settings
        self.postprocess = postprocess
        self._suggest = suggest
        # The server indexes every open document; here the one open document is the one completed.
        self.drafts = DraftIndex() if settings.repo_drafts else None

    def complete(self, placement: EditorPlacement, *, path: str, language_id: str, document: str):
        """(completion text, the Suggestion, latency in ms) at the placement's cursor."""
        found = self._suggest(
            self.engine,
            placement.text,
            placement.line,
            placement.character,
            document=document,
            path=path,
            language_id=language_id,
            settings=self.settings,
            drafts=self.drafts,
        )
        text = found.text if self.postprocess else found.raw
        self.engine.forget(document)  # each item is a fresh document; keeps memory bounded
        if self.drafts is not None:
            self.drafts.remove(document)
        return (text or ""), found, found.total_ms


# --- summaries -----------------------------------------------------------------------

def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile: an observed value."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(len(ordered), rank) - 1]


# minConfidence values whose effect each summary reports (what a user would be shown, and how good it is).
CONFIDENCE_GATES = (0.3, 0.5, 0.7, 0.9)


def gated(attempts: list[Attempt]) -> dict:
    """For each gate: the share of items that would show a suggestion, and how good those are."""
    out = {}
    for gate in CONFIDENCE_GATES:
        shown = [a for a in attempts if a.completion.strip() and (a.confidence is None or a.confidence >= gate)]
        entry = {"shown": _mean(a in shown for a in attempts) if attempts else None,
                 "exact_match_of_shown": _mean(exact_match(a.completion, a.expected) for a in shown)}
        tested = [a for a in shown if a.test is not None]
        if tested:
            entry["pass@1_of_shown"] = _mean(a.test.result().passed for a in tested)
        out[f"{gate:g}"] = entry
    return out


def summarise(attempts: list[Attempt]) -> dict:
    n = len(attempts)
    model_runs = [a for a in attempts if a.source == "model"]
    latencies = [a.latency_ms for a in model_runs]
    tokens = sum(a.tokens for a in model_runs)
    steps = sum(a.steps for a in model_runs)
    seconds = sum(latencies) / 1000
    summary = {
        "count": n,
        "exact_match": _mean(exact_match(a.completion, a.expected) for a in attempts),
        "edit_similarity": _mean(edit_similarity(a.completion, a.expected) for a in attempts),
        "empty_completions": sum(1 for a in attempts if not a.completion.strip()),
        "latency_ms": {
            "p50": _round(percentile(latencies, 50)),
            "p90": _round(percentile(latencies, 90)),
            "mean": _round(sum(latencies) / len(latencies)) if latencies else None,
        },
        "tokens_per_s": _round(tokens / seconds) if seconds > 0 else None,
        "tokens_per_step": _round(tokens / steps) if steps else None,
        "mean_tokens": _round(tokens / len(model_runs)) if model_runs else None,
        "mean_steps": _round(steps / len(model_runs)) if model_runs else None,
        "cached_answers": n - len(model_runs),
        "budget_cuts": sum(1 for a in attempts if a.extra.get("budget_cut")),
        # How the model judged drafts from the document itself: accepted whole, repaired, rejected.
        "drafts": {outcome: sum(1 for a in attempts if a.extra.get("draft") == outcome)
                   for outcome in ("accepted", "repaired", "rejected")},
    }
    tested = [a for a in attempts if a.test is not None]
    if tested:
        outcomes = [a.test.result() for a in tested]
        summary["pass@1"] = _mean(o.passed for o in outcomes)
        summary["timeouts"] = sum(1 for o in outcomes if o.status == "timeout")
    if any(a.confidence is not None for a in attempts):
        summary["min_confidence"] = gated(attempts)
    return summary


def _mean(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else None


def _round(value):
    return None if value is None else round(value, 3)


# --- the run ---------------------------------------------------------------------------

def parse_list(text: str, kind=str) -> list:
    return [kind(part.strip()) for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parafill eval",
        description="HumanEval-infilling pass@1, held-out exact match / edit similarity, speed vs quality.",
    )
    parser.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--tasks", default="single,multi,random",
                        help=f"comma-separated HumanEval sets from {', '.join(TASK_SETS)}; '' for none")
    parser.add_argument("--limit", type=int, default=None,
                        help="at most N tasks per set, evenly spaced through it (default: all)")
    parser.add_argument("--heldout", type=int, default=500,
                        help="rest-of-line examples from held-out corpus packages (0: skip)")
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="held-out corpus file (valid.jsonl.gz)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out cuts")
    parser.add_argument("--decoders", default="diffusion",
                        help="comma-separated from diffusion, autoregressive (same weights, one token per pass)")
    parser.add_argument("--steps", default="0",
                        help="comma-separated denoising step limits (0: as many as the span needs)")
    parser.add_argument("--thresholds", default="0.9", help="comma-separated confidence thresholds in (0, 1]")
    parser.add_argument("--budgets", default="",
                        help="comma-separated latency budgets in ms, one row each (0 = no budget; "
                             "default: the server's for the device); plotted as OUT.budgets.png")
    parser.add_argument("--context-tokens", type=int, default=None, help="context window (default: the server's)")
    parser.add_argument("--span-tokens-line", type=int, default=None,
                        help="longest rest-of-line suggestion (default: the server's)")
    parser.add_argument("--span-tokens-block", type=int, default=None,
                        help="longest suggestion of whole lines (default: the server's)")
    parser.add_argument("--no-document-drafts", action="store_true",
                        help="leave the completed document out of the drafts index (the model alone; the server "
                             "offers drafts from it by default)")
    parser.add_argument("--no-postprocess", action="store_true",
                        help="score the model's raw fill (to measure what post-processing adds)")
    parser.add_argument("--humaneval-dir", default=None, help="directory of the HumanEval-*Infilling.jsonl.gz files")
    parser.add_argument("--test-timeout", type=float, default=10.0, help="seconds per task's tests (default 10)")
    parser.add_argument("--test-memory-mb", type=int, default=2048, help="address-space limit of a test process")
    parser.add_argument("--workers", type=int, default=2, help="test processes run in parallel (default 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed completions before each setting")
    parser.add_argument("--out", default=None, help="write results JSON here (and a .png plot beside it)")
    parser.add_argument("--samples", action="store_true", help="also write every completion to OUT.samples.jsonl.gz")
    parser.add_argument("--repo-drafts", default=None, metavar="DIR,...",
                        help="instead: compare suggestions with and without drafts from your code, each DIR a package "
                             "used as the workspace folder (its evaluated files left out of the index)")
    parser.add_argument("--fit-drafts", default=None, metavar="DIR,...",
                        help="instead: fit how far this model's drafts can be trusted on packages it never trained "
                             "on and write drafts.json into the model directory (or --out DIR)")
    parser.add_argument("--draft-files", type=int, default=8,
                        help="files evaluated per package (--repo-drafts, --fit-drafts)")
    parser.add_argument("--draft-examples-per-file", type=int, default=5,
                        help="rest-of-line cuts per evaluated file (--repo-drafts, --fit-drafts)")
    parser.add_argument("--adapt", default=None, metavar="DIR,...",
                        help="instead: what `parafill adapt` gains on each package's held-out files, on the CPU "
                             "(tools/adapt_eval.py)")
    parser.add_argument("--adapt-minutes", default="2,5,10", help="training budgets in minutes (--adapt)")
    parser.add_argument("--adapt-tasks", type=int, default=150,
                        help="rest-of-line and as many whole-line tasks per package (--adapt)")
    parser.add_argument("--adapt-threads", type=int, default=2, help="torch threads while training (--adapt)")
    parser.add_argument("--adapt-drafts", action="store_true",
                        help="also score every point with the package's kept files indexed for drafts, as an "
                             "editor with the folder open asks (--adapt)")
    parser.add_argument("--adapt-lr", type=float, default=None,
                        help="learning rate (--adapt; default: parafill adapt's)")
    return parser


def settings_from(args) -> list[Setting]:
    decoders = parse_list(args.decoders)
    for name in decoders:
        if name not in DECODERS:
            raise SystemExit(f"parafill eval: unknown decoder {name!r}; choose from {', '.join(DECODERS)}")
    settings = []
    for name in decoders:
        if name == "autoregressive":
            settings.append(Setting("autoregressive"))
            continue
        for steps in parse_list(args.steps, int):
            for threshold in parse_list(args.thresholds, float):
                for budget in parse_list(args.budgets, int) or [None]:
                    if budget is not None and budget < 0:
                        raise SystemExit(f"parafill eval: a latency budget is 0 (none) or more ms, got {budget}")
                    settings.append(Setting("diffusion", steps, threshold, budget))
    if not settings:
        raise SystemExit("parafill eval: no decoding settings (check --decoders, --steps, --thresholds)")
    return settings


def engine_for(setting: Setting, backend):
    """A fresh engine per setting: its caches and stats belong to that setting alone."""
    from denoiser.engine import Engine

    if setting.decoder == "autoregressive":
        from denoiser.autoregressive import AutoregressiveBackend

        if not hasattr(backend, "context_ids") or not hasattr(backend, "model"):
            raise SystemExit(
                f"parafill eval: the autoregressive baseline needs a native parafill model; {backend.name} is not one"
            )
        return Engine(AutoregressiveBackend(backend))
    return Engine(backend)


def server_settings(setting: Setting, base):
    """The server's settings for one decoding setting (the autoregressive decoder ignores steps)."""
    if setting.decoder == "autoregressive":
        return base
    return replace(base, steps=setting.steps, confidence_threshold=setting.confidence_threshold,
                   latency_budget_ms=setting.latency_budget_ms)


def evaluate_setting(setting, backend, base_settings, suites, heldout, args, pool, log) -> tuple[dict, list[dict]]:
    path = CompletionPath(engine_for(setting, backend), server_settings(setting, base_settings),
                          postprocess=not args.no_postprocess)
    warm = [(t.task_id, humaneval.task_placement(t), "python") for tasks in suites.values() for t in tasks[:1]]
    warm += [(e.example_id, e.placement, e.language) for e in heldout[:1]]
    for i in range(args.warmup):
        if warm:
            _, placement, language = warm[i % len(warm)]
            path.complete(placement, path=f"warmup/{i}.py", language_id=language, document=f"warmup:{i}")

    results: dict[str, dict] = {}
    samples: list[dict] = []
    for name, tasks in suites.items():
        attempts = []
        started = time.perf_counter()
        for number, task in enumerate(tasks, 1):
            placement = humaneval.task_placement(task)
            text, result, latency = path.complete(
                placement,
                path=humaneval.document_path(task),
                language_id="python",
                document=f"eval:{name}:{task.task_id}",
            )
            attempt = Attempt(task.task_id, text, placement.expected, latency, result.tokens, result.steps,
                              result.source, confidence=result.confidence,
                              extra=_extra(result))
            attempt.test = pool.submit(humaneval.run_tests, task, placement.program(text),
                                       timeout_s=args.test_timeout, memory_mb=args.test_memory_mb)
            attempts.append(attempt)
            if number % 50 == 0 or number == len(tasks):
                log(f"  {setting.label} | {name}: {number}/{len(tasks)} ({time.perf_counter() - started:.0f} s)")
        results[name] = summarise(attempts)
        samples += [_sample(setting, name, a) for a in attempts]
    if heldout:
        attempts = []
        for example in heldout:
            text, result, latency = path.complete(
                example.placement, path=example.path, language_id=example.language,
                document=f"eval:heldout:{example.example_id}",
            )
            attempts.append(Attempt(example.example_id, text, example.placement.expected, latency,
                                    result.tokens, result.steps, result.source, confidence=result.confidence,
                                    extra=_extra(result)))
        results["heldout"] = summarise(attempts)
        samples += [_sample(setting, "heldout", a) for a in attempts]
        log(f"  {setting.label} | heldout: {len(attempts)} done")
    return results, samples


def _extra(result) -> dict:
    """What a sample records of a Suggestion beside its text: a budget cut, the draft and its fate."""
    return {"budget_cut": result.budget_cut, "draft": result.draft, "draft_text": result.request.draft or None}


def _sample(setting: Setting, suite: str, attempt: Attempt) -> dict:
    record = {"setting": setting.label, "suite": suite, "id": attempt.item_id, "completion": attempt.completion,
              "expected": attempt.expected, "latency_ms": round(attempt.latency_ms, 2), "tokens": attempt.tokens,
              "steps": attempt.steps,
              "confidence": None if attempt.confidence is None else round(attempt.confidence, 4)}
    if attempt.extra.get("draft"):
        record.update(draft=attempt.extra["draft"], draft_text=attempt.extra.get("draft_text"))
    if attempt.test is not None:
        outcome = attempt.test.result()
        record.update(passed=outcome.passed, status=outcome.status)
    return record


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def describe_device(backend) -> str:
    device = getattr(backend, "device", None)
    if device is not None and getattr(device, "type", "") == "cuda":
        import torch

        return f"{device} ({torch.cuda.get_device_name(device)})"
    import os

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible)"


def run(args, log=print) -> dict:
    from denoiser.engine import Engine
    settings = settings_from(args)
    suites = {}
    for name in parse_list(args.tasks):
        if name not in TASK_SETS:
            raise SystemExit(f"parafill eval: unknown task set {name!r}; choose from {', '.join(TASK_SETS)}")
        suites[name] = humaneval.spread(humaneval.load_tasks(name, args.humaneval_dir), args.limit)
    heldout = load_heldout(Path(args.corpus), args.heldout, args.seed) if args.heldout > 0 else []
    overrides = {
        "context_tokens": args.context_tokens,
        "span_tokens_line": args.span_tokens_line,
        "span_tokens_block": args.span_tokens_block,
    }
    # Every fill is scored as written: the minConfidence gate is reported apart (`min_confidence`).
    base_settings = replace(Settings(), min_confidence=0.0, repo_drafts=not args.no_document_drafts,
                            **{key: value for key, value in overrides.items() if value is not None})

    log(f"loading model {args.model or '(embedded default)'} on {args.device}")
    backend = Engine.load(args.model, device=args.device).backend
    report = {
        "model": {
            "name": backend.name,
            "path": str(getattr(backend, "model_dir", args.model or "")),
            "parameters": backend.parameters,
        },
        "device": describe_device(backend),
        "command": "parafill eval " + " ".join(shlex.quote(a) for a in args.argv),
        "git_commit": git_commit(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "options": {
            "tasks": {name: len(tasks) for name, tasks in suites.items()},
            "heldout": len(heldout),
            "seed": args.seed,
            "context_tokens": base_settings.context_tokens,
            "span_tokens_line": base_settings.span_tokens_line,
            "span_tokens_block": base_settings.span_tokens_block,
            "max_snippets": base_settings.max_snippets,
            "postprocess": not args.no_postprocess,
            "document_drafts": base_settings.repo_drafts,
            "test_timeout_s": args.test_timeout,
            "editor_placement": "middle ending in a newline: cursor on an empty line (docs/EVALUATION.md)",
        },
        "settings": [],
    }
    all_samples: list[dict] = []
    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        for setting in settings:
            log(f"evaluating {setting.label}")
            metrics, samples = evaluate_setting(setting, backend, base_settings, suites, heldout, args, pool, log)
            report["settings"].append({
                "label": setting.label,
                "decoder": setting.decoder,
                "steps": setting.steps,
                "confidence_threshold": setting.confidence_threshold,
                "latency_budget_ms": setting.latency_budget_ms,
                "metrics": metrics,
            })
            all_samples += samples
    report["_samples"] = all_samples
    return report


# --- output --------------------------------------------------------------------------

def format_table(report: dict) -> str:
    suites = []
    for setting in report["settings"]:
        for name in setting["metrics"]:
            if name not in suites:
                suites.append(name)
    columns = ["setting"]
    for name in suites:
        columns.append(f"{name} {'EM' if name == 'heldout' else 'pass@1'}")
    columns += ["ES", "p50 ms", "p90 ms", "tok/step", "tok/s"]
    rows = []
    for setting in report["settings"]:
        metrics = setting["metrics"]
        row = [setting["label"]]
        for name in suites:
            m = metrics.get(name, {})
            value = m.get("exact_match") if name == "heldout" else m.get("pass@1")
            row.append(_pct(value))
        merged = _merge_speed(metrics.values())
        row += [
            _pct(_mean_of(m.get("edit_similarity") for m in metrics.values())),
            _num(merged["p50"]), _num(merged["p90"]), _num(merged["tokens_per_step"], 2), _num(merged["tokens_per_s"], 0),
        ]
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [columns] + rows) for i in range(len(columns))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [columns] + rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _merge_speed(metric_list) -> dict:
    """Speed over all suites of a setting: weighted by completions."""
    metric_list = list(metric_list)
    count = sum(m["count"] for m in metric_list) or 1
    def weighted(key, sub=None):
        values = [((m[key][sub] if sub else m[key]), m["count"]) for m in metric_list]
        values = [(v, c) for v, c in values if v is not None]
        total = sum(c for _, c in values)
        return sum(v * c for v, c in values) / total if total else None
    del count
    return {"p50": weighted("latency_ms", "p50"), "p90": weighted("latency_ms", "p90"),
            "tokens_per_step": weighted("tokens_per_step"), "tokens_per_s": weighted("tokens_per_s")}


def _mean_of(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_plot(report: dict, path: Path) -> None:
    """Quality against latency (left) and against tokens per step (right), one point per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = []
    for setting in report["settings"]:
        for name in setting["metrics"]:
            if name not in suites:
                suites.append(name)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    markers = {"diffusion": "o", "autoregressive": "s"}
    for index, name in enumerate(suites):
        xs_latency, xs_tps, ys, labels, kinds = [], [], [], [], []
        for setting in report["settings"]:
            m = setting["metrics"].get(name)
            if not m:
                continue
            quality = m.get("exact_match") if name == "heldout" else m.get("pass@1")
            if quality is None or m["latency_ms"]["p50"] is None:
                continue
            xs_latency.append(m["latency_ms"]["p50"])
            xs_tps.append(m["tokens_per_step"] or 0.0)
            ys.append(100 * quality)
            labels.append(_short_label(setting))
            kinds.append(setting["decoder"])
        metric = "exact match" if name == "heldout" else "pass@1"
        line, = left.plot(xs_latency, ys, linestyle=":", alpha=0.5)
        for x, x2, y, label, kind in zip(xs_latency, xs_tps, ys, labels, kinds):
            left.scatter([x], [y], color=line.get_color(), marker=markers[kind])
            right.scatter([x2], [y], color=line.get_color(), marker=markers[kind])
            if index == 0:  # one label per setting is enough to tell the points apart
                left.annotate(label, (x, y), fontsize=7, textcoords="offset points", xytext=(4, 3))
                right.annotate(label, (x2, y), fontsize=7, textcoords="offset points", xytext=(4, 3))
        right.plot(xs_tps, ys, linestyle=":", alpha=0.5, color=line.get_color(), label=f"{name} {metric}")
    left.set_xlabel("latency per completion, p50 (ms)")
    left.set_ylabel("quality (%)")
    left.set_title("quality vs latency (o diffusion steps/threshold, □ AR)")
    right.set_xlabel("tokens per denoising step")
    right.set_title("quality vs parallelism")
    right.legend(fontsize=8)
    for axis in (left, right):
        axis.grid(alpha=0.3)
    figure.suptitle(f"{report['model']['name']} on {report['device']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_budget_plot(report: dict, path: Path) -> None:
    """The quality a latency budget costs: exact line (held-out) and pass@1 against the budget,
    one line per steps/threshold setting; "no budget" is drawn at the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in report["settings"] if s["decoder"] == "diffusion" and s.get("latency_budget_ms") is not None]
    budgets = sorted({s["latency_budget_ms"] for s in rows if s["latency_budget_ms"] > 0})
    unbounded_x = (max(budgets) * 1.5 if budgets else 1.0)

    def x_of(budget: int) -> float:
        return budget if budget > 0 else unbounded_x

    figure, axis = plt.subplots(figsize=(7, 4.8))
    groups: dict[tuple, list[dict]] = {}
    for setting in rows:
        groups.setdefault((setting["steps"], setting["confidence_threshold"]), []).append(setting)
    for (steps, threshold), settings in groups.items():
        settings = sorted(settings, key=lambda s: x_of(s["latency_budget_ms"]))
        suites = {name for s in settings for name in s["metrics"]}
        for name in sorted(suites):
            metric = "exact_match" if name == "heldout" else "pass@1"
            points = [(x_of(s["latency_budget_ms"]), s["metrics"][name].get(metric)) for s in settings
                      if name in s["metrics"]]
            points = [(x, 100 * y) for x, y in points if y is not None]
            if points:
                shown = "exact line" if name == "heldout" else f"{name} pass@1"
                steps_label = "auto" if steps == 0 else steps
                axis.plot(*zip(*points), marker="o", label=f"{shown} (steps {steps_label}, threshold {threshold:g})")
    axis.set_xticks(budgets + [unbounded_x], [str(b) for b in budgets] + ["none"])
    axis.set_xlabel("latency budget (ms)")
    axis.set_ylabel("quality (%)")
    axis.set_title("the quality a latency budget costs")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.suptitle(f"{report['model']['name']} on {report['device']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _short_label(setting: dict) -> str:
    if setting["decoder"] == "autoregressive":
        return "AR"
    steps = "auto" if setting["steps"] == 0 else setting["steps"]
    budget = setting.get("latency_budget_ms")
    return f"{steps}/{setting['confidence_threshold']:g}" + ("" if budget is None else f"/{budget or 'none'}ms")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)  # before torch is imported, so --help and mistakes are quick
    args.argv = argv
    from denoiser.backend import ModelLoadError

    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    if args.repo_drafts:
        from tools.draft_eval import main as drafts_main

        return drafts_main(args, log)
    if args.fit_drafts:
        from tools.draft_calibration import main as fit_main

        return fit_main(args, log)
    if args.adapt:
        from tools.adapt_eval import main as adapt_main

        return adapt_main(args, log)
    try:
        report = run(args, log)
    except (FileNotFoundError, ValueError, ModelLoadError) as exc:
        fix = "; use --device cpu or --device auto" if getattr(exc, "setting", None) == "device" else ""
        print(f"parafill eval: {exc}{fix}", file=sys.stderr)
        return 2
    samples = report.pop("_samples")
    print(format_table(report))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        write_plot(report, out.with_suffix(".png"))
        written = [str(out), str(out.with_suffix(".png"))]
        if args.budgets:
            budgets_plot = out.with_suffix(".budgets.png")
            write_budget_plot(report, budgets_plot)
            written.append(str(budgets_plot))
        if args.samples:
            samples_path = out.with_suffix(".samples.jsonl.gz")
            with gzip.open(samples_path, "wt", encoding="utf-8") as handle:
                for sample in samples:
                    handle.write(json.dumps(sample) + "\n")
            written.append(str(samples_path))
        print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
