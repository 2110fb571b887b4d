"""`parafill eval --repo-drafts DIR,...`: completions with and without drafts from the user's code.

Each DIR is a package used as the workspace folder. Some of its files are
evaluated: they are left out of the index (as if absent from disk) and opened
only as documents, so no evaluated line can be copied from the index. Each
request runs the server's own path (`lsp_server.suggest`) twice, with the index
and without, under the default confidence gate. Reports exact line, the share
shown, precision of what is shown, latency, steps per request, and how the
model judged the drafts (accepted whole, repaired, rejected).
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

from fim.drafts import DraftIndex
from fim.positions import position_at
from fim.repo_files import iter_repo_files
from lsp_server.settings import Settings
from lsp_server.suggest import suggest
from tools.evaluate import exact_match, percentile, rest_of_line_cut


def workspace_index(package: str, files) -> DraftIndex:
    """The drafts index an editor builds with `package` open as its workspace folder (`files`: those indexed)."""
    index = DraftIndex()
    for f in files:
        index.update(f"{package}/{f.path}", f.text)
    return index


def package_examples(root: Path, files: int, per_file: int, seed: int):
    """(index of the other files, examples [(path, document text, cursor, expected)])."""
    code = [f for f in iter_repo_files(root) if f.language == "python"]
    rng = random.Random(seed)
    chosen = set(rng.sample(range(len(code)), min(files, len(code))))
    index = workspace_index(root.name, [found for i, found in enumerate(code) if i not in chosen])
    examples = []
    for i in sorted(chosen):
        text = code[i].text
        for _ in range(per_file):
            cut = rest_of_line_cut(text, rng)
            if cut is not None:
                cursor, end = cut
                examples.append((f"{root.name}/{code[i].path}", text[:cursor] + text[end:], cursor, text[cursor:end]))
    return index, examples


def summarise(rows: list[dict]) -> dict:
    shown = [r for r in rows if r["shown"]]
    n = len(rows) or 1
    return {
        "examples": len(rows),
        "exact_line": round(sum(r["exact_shown"] for r in rows) / n, 4),
        "shown": round(len(shown) / n, 4),
        "precision": round(sum(r["exact_shown"] for r in shown) / len(shown), 4) if shown else None,
        "latency_ms_p50": percentile([r["ms"] for r in rows], 50),
        "steps_per_request": round(sum(r["steps"] for r in rows) / n, 3),
        "drafts": {k: sum(r["draft"] == k for r in rows) for k in ("accepted", "repaired", "rejected")}
        | {"proposed": sum(r["draft"] is not None for r in rows)},
        # What was shown and right, by how the model judged the request's draft (None: no draft).
        "shown_right_by_draft": {str(k): [sum(r["shown"] for r in rows if r["draft"] == k),
                                          sum(r["exact_shown"] for r in rows if r["draft"] == k)]
                                 for k in ("accepted", "repaired", "rejected", None)},
    }


def run(args, log) -> dict:
    from denoiser.engine import Engine

    backend = Engine.load(args.model, device=args.device).backend
    settings = Settings()  # the shipped defaults, the minConfidence gate included
    report = {"model": backend.name, "device": str(backend.device), "settings": {"min_confidence": settings.min_confidence},
              "packages": {}, "with_drafts": {}, "without_drafts": {}}
    rows = {"with": [], "without": []}
    for folder in [Path(p) for p in args.repo_drafts.split(",") if p]:
        index, examples = package_examples(folder, args.draft_files, args.draft_examples_per_file, args.seed)
        log(f"{folder.name}: {len(index)} files indexed, {len(examples)} examples")
        report["packages"][folder.name] = {"indexed_files": len(index), "examples": len(examples)}
        # Both modes answer each example in turn, so a change in the machine's load
        # weighs on both alike; each keeps its own engine (no answer from the other's cache).
        engines = {"without": Engine(backend), "with": Engine(backend)}
        for number, (path, text, cursor, expected) in enumerate(examples):
            line, character = position_at(text, cursor)
            for mode, engine in engines.items():
                document = f"eval:{mode}:{path}:{number}"
                found = suggest(engine, text, line, character, document=document, path=path, language_id="python",
                                settings=settings, drafts=index if mode == "with" else None)
                index.remove(document)
                engine.forget(document)
                rows[mode].append({"package": folder.name, "shown": found.text is not None,
                                   "exact_shown": found.text is not None and exact_match(found.text, expected),
                                   "ms": found.total_ms, "steps": found.steps, "draft": found.draft})
        for mode in engines:
            log(f"  {mode} drafts: {summarise([r for r in rows[mode] if r['package'] == folder.name])}")
    report["with_drafts"] = summarise(rows["with"])
    report["without_drafts"] = summarise(rows["without"])
    for name in report["packages"]:
        report["packages"][name]["with_drafts"] = summarise([r for r in rows["with"] if r["package"] == name])
        report["packages"][name]["without_drafts"] = summarise([r for r in rows["without"] if r["package"] == name])
    return report


def write_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("exact_line", "shown", "precision")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (label, key) in enumerate((("without drafts", "without_drafts"), ("with drafts", "with_drafts"))):
        values = [report[key][m] or 0.0 for m in metrics]
        ax.bar([x + 0.38 * i for x in range(len(metrics))], values, width=0.38, label=label)
    ax.set_xticks([x + 0.19 for x in range(len(metrics))], metrics)
    ax.set_ylim(0, 1)
    ax.set_title(f"{report['model']}: drafts from the package's own code")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args, log) -> int:
    started = time.perf_counter()
    report = run(args, log)
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps({k: report[k] for k in ("with_drafts", "without_drafts")}, indent=2))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        write_plot(report, out.with_suffix(".png"))
        print(f"wrote {out}, {out.with_suffix('.png')}")
    return 0
