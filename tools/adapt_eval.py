"""`parafill eval --adapt DIR,...`: what `parafill adapt` gains on a package's own held-out files.

Each DIR is a package, split as the command splits it (`tools.adapt.split_files`:
one file in five aside, by a hash of its path). The base model is adapted on
the other four fifths once, up to the largest budget, and its weights are saved
(int8, as the command saves them) each time the training time crosses a budget:
the learning rate is constant after the warm-up, so the weights at 2 minutes
are what a 2-minute run learns. Rest-of-line and whole-line cuts of the files
set aside are completed through the server's own path (`lsp_server.suggest`)
by the base model and by every snapshot, and scored with the gate off and at
the default `minConfidence` gate. Training runs on `--adapt-threads` torch
threads, completions on one.

Must not: write into the packages, or reuse one point's engine for another.
"""
from __future__ import annotations

import json
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fim.positions import position_at
from lsp_server.settings import Settings, latency_budget_ms
from lsp_server.suggest import suggest
from tools.evaluate import exact_match, git_commit, percentile, rest_of_line_cut

KINDS = ("rest-of-line", "whole-line")
GATE_OFF = Settings(min_confidence=0.0)
DEFAULT_GATE = Settings()


@dataclass(frozen=True)
class Task:
    kind: str  # one of KINDS
    path: str  # relative to the package
    language: str
    document: str  # the file with the cut text removed
    line: int  # LSP position of the cursor
    character: int
    expected: str


def whole_line_cut(text: str, rng: random.Random, min_chars: int = 3) -> tuple[int, int] | None:
    """(cursor, end of line) for a whole-line completion in `text`, or None.

    The cursor sits where the line's code starts (its indentation typed, as an
    editor indents a new line) and the whole code of the line is to be written.
    Lines with fewer than `min_chars` non-blank characters are not chosen.
    """
    lines = text.split("\n")
    starts, offset = [], 0
    for line in lines:
        starts.append(offset)
        offset += len(line) + 1
    candidates = [i for i, line in enumerate(lines) if len(line.strip()) >= min_chars]
    if not candidates:
        return None
    number = rng.choice(candidates)
    line = lines[number]
    indent = len(line) - len(line.lstrip())
    return starts[number] + indent, starts[number] + len(line)


def held_out_tasks(files, per_kind: int, seed: int) -> list[Task]:
    """Up to `per_kind` distinct cuts of each kind from `files`, a file drawn first, then a line (by `seed`)."""
    cutters = {"rest-of-line": rest_of_line_cut, "whole-line": whole_line_cut}
    tasks = []
    for kind in KINDS:
        rng = random.Random(f"{seed}:{kind}")
        seen = set()
        for _ in range(per_kind * 20):
            if len(seen) >= per_kind or not files:
                break
            f = rng.choice(files)
            cut = cutters[kind](f.text, rng)
            if cut is None or (f.path, cut) in seen:
                continue
            seen.add((f.path, cut))
            cursor, end = cut
            document = f.text[:cursor] + f.text[end:]
            line, character = position_at(document, cursor)
            tasks.append(Task(kind, f.path, f.language, document, line, character, f.text[cursor:end]))
    return tasks


def shown_at(found, min_confidence: float) -> bool:
    """Whether the server shows `found` (asked with the gate off) under a `minConfidence` gate.

    The rule of `lsp_server.suggest`: what post-processing kept, unless the model
    is less sure of it than the gate. One request then scores both gates.
    """
    return found.text is not None and (found.confidence is None or found.confidence >= min_confidence)


def complete_tasks(model_dir: Path, tasks: list[Task], package: str, label: str, workspace=None) -> list[dict]:
    """Every task through `lsp_server.suggest` on a fresh engine of `model_dir`, one torch thread.

    `workspace`: the files an editor would index from the package's folder (the kept
    ones), so each request also carries the best draft from them or the document itself.
    """
    from denoiser.engine import Engine
    from denoiser.native_backend import NativeBackend
    from tools.draft_eval import workspace_index

    # Each budget's weights are scored once, beside training: no steps compiled for them.
    backend = NativeBackend(model_dir, device="cpu", cpu_compile="off")
    backend.set_cpu_threads(1)
    engine = Engine(backend)
    index = workspace_index(package, workspace) if workspace is not None else None
    rows = []
    for number, task in enumerate(tasks):
        document = f"adapt-eval:{package}:{label}:{number}"
        found = suggest(engine, task.document, task.line, task.character, document=document,
                        path=f"{package}/{task.path}", language_id=task.language, settings=GATE_OFF, drafts=index)
        engine.forget(document)
        if index is not None:
            index.remove(document)
        exact = found.text is not None and exact_match(found.text, task.expected)
        rows.append({"kind": task.kind, "exact": exact, "shown": found.text is not None,
                     "shown_default": shown_at(found, DEFAULT_GATE.min_confidence), "ms": found.total_ms,
                     "steps": found.steps, "budget_cut": found.budget_cut, "draft": found.draft})
    return rows


def summarise(rows: list[dict]) -> dict:
    shown = [r for r in rows if r["shown_default"]]
    n = len(rows) or 1
    return {
        "tasks": len(rows),
        "exact_line": round(sum(r["exact"] for r in rows) / n, 4),  # gate off
        "shown": round(sum(r["shown"] for r in rows) / n, 4),  # gate off: what post-processing kept
        "shown_default": round(len(shown) / n, 4),
        "exact_line_default": round(sum(r["exact"] for r in shown) / n, 4),  # shown at the default gate and exact
        "precision_default": round(sum(r["exact"] for r in shown) / len(shown), 4) if shown else None,
        "latency_ms_p50": _round(percentile([r["ms"] for r in rows], 50)),
        "steps_per_request": round(sum(r["steps"] for r in rows) / n, 3),
        "budget_cuts": sum(r["budget_cut"] for r in rows),
        "drafts": sum(r["draft"] is not None for r in rows),  # requests that carried a draft to the model
    }


def _round(value, digits: int = 1):
    return None if value is None else round(value, digits)


def scored(rows: list[dict]) -> dict:
    return {"all": summarise(rows)} | {kind: summarise([r for r in rows if r["kind"] == kind]) for kind in KINDS}


def weight_change(model, base: dict) -> float:
    """‖θ − θ₀‖ / ‖θ₀‖ over every weight: how far training has moved the model."""
    moved = total = 0.0
    for name, tensor in model.state_dict().items():
        start = base[name].float()
        moved += float((tensor.float() - start).pow(2).sum())
        total += float(start.pow(2).sum())
    return (moved / max(total, 1e-30)) ** 0.5


def adapt_snapshots(base_dir: Path, train_files, minutes: list[float], scratch: Path, args, log) -> list[dict]:
    """One adaptation run up to the largest budget; the weights saved as training time crosses each budget."""
    import torch

    from denoiser.checkpoint import TOKENIZER, load_native_model
    from denoiser.drafts import DraftCalibration
    from denoiser.tokenizer import CodeTokenizer
    from training.adapt import Adapter
    from training.export import save_native_model

    torch.set_num_threads(args.adapt_threads)
    model, _, _ = load_native_model(base_dir, torch.device("cpu"))
    calibration = DraftCalibration.load(base_dir)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tokenizer = base_dir / TOKENIZER
    adapter = Adapter(model, CodeTokenizer.load(tokenizer), [(f.path, f.language, f.text) for f in train_files],
                      lr=args.adapt_lr, seed=args.seed)
    snapshots, trained, cpu, losses = [], 0.0, 0.0, []
    for budget in minutes:
        while trained < budget * 60:
            torch.set_num_threads(args.adapt_threads)
            started, started_cpu = time.monotonic(), time.process_time()
            losses.append(adapter.train_for(min(60.0, budget * 60 - trained)))
            trained += time.monotonic() - started
            cpu += time.process_time() - started_cpu
            log(f"  {trained / 60:5.2f}/{minutes[-1]:g} min  step {adapter.steps}  loss {losses[-1]:.3f}")
        # CPU seconds per wall second per thread: about 1 on a quiet machine, far less when others share the cores.
        share = cpu / max(trained * args.adapt_threads, 1e-9)
        if share < 0.7:
            log(f"  warning: training got {100 * share:.0f}% of its {args.adapt_threads} threads' time; "
                "the machine is busy and these minutes are worth less than yours")
        folder = scratch / f"{budget:g}min"
        save_native_model(model, tokenizer, folder, int8=True, card=f"# snapshot at {budget:g} minutes\n")
        if calibration is not None:  # as `parafill adapt` does: drafts are trusted as with the base model
            calibration.save(folder)
        snapshots.append({"minutes": budget, "training_s": round(trained, 1), "cpu_s": round(cpu, 1),
                          "cpu_share": round(share, 3), "steps": adapter.steps, "tokens": adapter.tokens,
                          "loss": round(losses[-1], 4), "weight_change": round(weight_change(model, base), 6),
                          "model_dir": folder})
    return snapshots


def measure_package(folder: Path, base_dir: Path, minutes: list[float], args, log) -> dict:
    from fim.repo_files import iter_repo_files
    from tools.adapt import split_files

    files = list(iter_repo_files(folder))
    train, held = split_files(files)
    if not train or not held:
        raise ValueError(f"{folder}: found {len(files)} code files; measuring adaptation needs at least two")
    tasks = held_out_tasks(held, args.adapt_tasks, args.seed)
    name = folder.name
    log(f"{name}: {len(train)} files to learn from, {len(held)} held out, "
        f"{sum(t.kind == 'rest-of-line' for t in tasks)} rest-of-line and "
        f"{sum(t.kind == 'whole-line' for t in tasks)} whole-line tasks")
    untrained = {"minutes": 0, "training_s": 0.0, "cpu_s": 0.0, "cpu_share": None, "steps": 0, "tokens": 0,
                 "loss": None, "weight_change": 0.0}

    def score(model_dir: Path, label: str) -> dict:
        point = scored(complete_tasks(model_dir, tasks, name, label))
        if args.adapt_drafts:
            point["workspace"] = scored(complete_tasks(model_dir, tasks, name, f"{label}+ws", workspace=train))
        return point

    points = [untrained | score(base_dir, "base")]
    log(f"  before: {_brief(points[0])}")
    with tempfile.TemporaryDirectory(prefix="parafill-adapt-eval-") as scratch:
        for snapshot in adapt_snapshots(base_dir, train, minutes, Path(scratch), args, log):
            model_dir = snapshot.pop("model_dir")
            points.append(snapshot | score(model_dir, f"{snapshot['minutes']:g}"))
            log(f"  after {snapshot['minutes']:g} min: {_brief(points[-1])}")
    return {"path": str(folder), "files": len(files), "train_files": len(train),
            "train_chars": sum(len(f.text) for f in train), "held_out_files": sorted(f.path for f in held),
            "tasks": {kind: sum(t.kind == kind for t in tasks) for kind in KINDS}, "points": points,
            "gain": {f"{p['minutes']:g}": gain(points[0], p) for p in points[1:]}}


def gain(before: dict, after: dict) -> dict:
    """Points (percentage points) gained, per kind of task, on the metrics the target names
    (under "workspace", the same with the package's kept files indexed for drafts)."""
    out = {}
    for kind in ("all",) + KINDS:
        a, b = after[kind], before[kind]
        out[kind] = {m: round(100 * ((a[m] or 0.0) - (b[m] or 0.0)), 2)
                     for m in ("exact_line", "shown_default", "exact_line_default", "precision_default")}
    if "workspace" in after:
        out["workspace"] = gain(before["workspace"], after["workspace"])
    return out


def _brief(point: dict) -> str:
    text = "  ".join(f"{kind} exact {100 * point[kind]['exact_line']:.1f}% shown@gate "
                     f"{100 * point[kind]['shown_default']:.1f}%" for kind in KINDS)
    if "workspace" in point:
        ws = point["workspace"]["all"]
        text += (f"  | with workspace drafts: exact {100 * ws['exact_line']:.1f}% "
                 f"exact@gate {100 * ws['exact_line_default']:.1f}% shown@gate {100 * ws['shown_default']:.1f}%")
    return text + f"  p50 {point['all']['latency_ms_p50']} ms"


def describe_machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=10).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), cpu)
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {"cpu": cpu, "arch": platform.machine(), "cores_visible": os.cpu_count(), "system": platform.platform()}


def run(args, log) -> dict:
    import torch

    from denoiser.loading import default_model_dir, read_model_config

    base_dir = Path(args.model).expanduser() if args.model else default_model_dir()
    if read_model_config(base_dir).get("architecture") != "parafill-span-denoiser":
        raise ValueError(f"{base_dir}: only parafill's own models can be adapted on a CPU")
    if args.adapt_lr is None:
        from tools.adapt import build_parser

        args.adapt_lr = build_parser().get_default("lr")
    minutes = sorted({float(m) for m in args.adapt_minutes.split(",") if m.strip()})
    if not minutes or minutes[0] <= 0:
        raise ValueError(f"--adapt-minutes {args.adapt_minutes!r}: give budgets in minutes, all above 0")
    folders = [Path(p).expanduser() for p in args.adapt.split(",") if p.strip()]
    for folder in folders:
        if not folder.is_dir():
            raise ValueError(f"{folder}: not a folder; --adapt takes package folders separated by commas")
    report = {
        "command": "parafill eval " + shlex.join(getattr(args, "argv", sys.argv[1:])),
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": describe_machine(),
        "torch": {"version": torch.__version__, "train_threads": args.adapt_threads, "eval_threads": 1},
        "model": {"name": base_dir.name, "path": str(base_dir)},
        "options": {"minutes": minutes, "tasks_per_kind": args.adapt_tasks, "seed": args.seed, "lr": args.adapt_lr},
        "settings": {"gate_off": {"min_confidence": GATE_OFF.min_confidence},
                     "default_gate": {"min_confidence": DEFAULT_GATE.min_confidence},
                     "latency_budget_ms": latency_budget_ms(DEFAULT_GATE, "cpu"), "repo_drafts": False,
                     "workspace_drafts": bool(args.adapt_drafts)},
        "method": [
            "split: tools.adapt.split_files (the command's), training on the kept files, tasks from the files set aside",
            ("one adaptation run per package up to the largest budget; a snapshot (int8, as the command saves it) "
             "each time the training time crossed a budget. The command's held-out checks, early stopping and "
             "keeping of the best check were not run: a snapshot is what training alone reaches in that time, "
             "while the command spends part of its wall-clock budget on its checks"),
            ("every task: one request through lsp_server.suggest with minConfidence 0, a fresh document, "
             "no drafts from the package; the default gate applies the server's rule (shown when the model's "
             "confidence is at least the default minConfidence) to the same answer"),
            ("with --adapt-drafts, every task once more as an editor with the package's folder open asks it: "
             "repoDrafts on, the kept files (those trained on) and the document itself indexed for drafts "
             "(\"workspace\" in each point and gain)"),
            "a fresh engine per point; latency under the server's CPU latency budget",
        ],
        "packages": {},
    }
    started = time.perf_counter()
    for folder in folders:
        report["packages"][folder.name] = measure_package(folder.resolve(), base_dir, minutes, args, log)
    packages = report["packages"].values()

    def mean(m: float, metric: str, part: str | None = None) -> float:
        gains = [p["gain"][f"{m:g}"] for p in packages]
        values = [(g[part] if part else g)["all"][metric] for g in gains]
        return round(sum(values) / len(values), 2)

    report["mean_gain"] = {f"{m:g}": {metric: mean(m, metric) for metric in ("exact_line", "shown_default")}
                           for m in minutes}
    if args.adapt_drafts:
        for m in minutes:
            report["mean_gain"][f"{m:g}"]["workspace"] = {
                metric: mean(m, metric, "workspace")
                for metric in ("exact_line", "shown_default", "exact_line_default")}
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def format_summary(report: dict) -> str:
    header = (f"{'package':<14}{'min':>6}{'steps':>7}  {'kind':<13}{'exact':>7}{'gain':>7}"
              f"{'shown@gate':>11}{'gain':>7}{'precision':>10}{'p50 ms':>8}")
    rows = [header]
    for name, package in report["packages"].items():
        before = package["points"][0]
        for point in package["points"]:
            lines = [(kind, point[kind], before[kind]) for kind in ("all",) + KINDS]
            if "workspace" in point:
                lines.append(("all+drafts", point["workspace"]["all"], before["workspace"]["all"]))
            for kind, now, then in lines:
                precision = "-" if now["precision_default"] is None else f"{100 * now['precision_default']:.1f}"
                rows.append(f"{name:<14}{point['minutes']:>6g}{point['steps']:>7}  {kind:<13}"
                            f"{100 * now['exact_line']:>6.1f}%{100 * (now['exact_line'] - then['exact_line']):>+7.1f}"
                            f"{100 * now['shown_default']:>10.1f}%"
                            f"{100 * (now['shown_default'] - then['shown_default']):>+7.1f}"
                            f"{precision:>10}{now['latency_ms_p50'] or 0:>8.0f}")
    mean = ", ".join(f"{m} min: exact {g['exact_line']:+.1f}, shown {g['shown_default']:+.1f}"
                     for m, g in report["mean_gain"].items())
    rows.append(f"mean gain over packages, points (all tasks): {mean}")
    with_drafts = ", ".join(f"{m} min: exact {g['workspace']['exact_line']:+.1f}, exact at the gate "
                            f"{g['workspace']['exact_line_default']:+.1f}, shown {g['workspace']['shown_default']:+.1f}"
                            for m, g in report["mean_gain"].items() if "workspace" in g)
    if with_drafts:
        rows.append(f"the same with the workspace's drafts: {with_drafts}")
    return "\n".join(rows)


def write_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("exact_line", "exact line, gate off"), ("shown_default", "shown at the default gate"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, (metric, title) in zip(axes, panels):
        for name, package in report["packages"].items():
            xs = [0.0] + [float(m) for m in package["gain"]]
            ys = [0.0] + [g["all"][metric] for g in package["gain"].values()]
            ax.plot(xs, ys, marker="o", label=name)
        xs = [0.0] + [float(m) for m in report["mean_gain"]]
        ax.plot(xs, [0.0] + [g[metric] for g in report["mean_gain"].values()], "k--", label="mean")
        if all("workspace" in g for g in report["mean_gain"].values()):
            ax.plot(xs, [0.0] + [g["workspace"][metric] for g in report["mean_gain"].values()], "k:", marker="s",
                    label="mean, with workspace drafts")
        if metric == "exact_line":
            ax.axhline(5, color="grey", linewidth=0.8, linestyle=":")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_title(title)
        threads = report["torch"]["train_threads"]
        ax.set_xlabel(f"minutes of training ({threads} thread{'s' if threads != 1 else ''})")
        ax.set_ylabel("gain (points)")
    axes[0].legend()
    fig.suptitle(f"{report['model']['name']} adapted to each package: held-out rest-of-line and whole-line tasks")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args, log) -> int:
    from denoiser.backend import ModelLoadError

    try:
        report = run(args, log)
    except (ValueError, ModelLoadError) as exc:
        print(f"parafill eval: {exc}", file=sys.stderr)
        return 2
    print(format_summary(report))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        write_plot(report, out.with_suffix(".png"))
        print(f"wrote {out}, {out.with_suffix('.png')}")
    return 0
