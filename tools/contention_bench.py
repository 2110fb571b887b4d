"""`parafill bench --contended`: completion latency with and without other work on the CPU.

A laptop is rarely idle: a build, a test run or a browser tab competes for its
cores. This measures, in one run, the latency of real completions through the
server's own path (`lsp_server.suggest`: window, engine, post-processing; each
request a new document, so every one computes its context) for several torch
thread counts, first on an idle machine and then with a CPU hog of N busy
processes beside it, and reports p50/p99 and the loaded/unloaded ratio of each.
The thread count parafill picks for the machine is marked. Writes JSON and a
plot under bench/results/. Measures only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results"
SOURCES = ("fim/context.py", "denoiser/engine.py", "lsp_server/server.py")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parafill bench --contended", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory or name (default: the embedded model)")
    p.add_argument("--requests", type=int, default=40, help="timed completions per thread count and load")
    p.add_argument("--threads", default="", help="comma-separated torch thread counts (default: 1..cores)")
    p.add_argument("--hog", type=int, default=2, help="busy processes beside the completions (default 2)")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/<machine>__contended.json)")
    return p


def cursors(count: int) -> list[tuple[str, str, int, int]]:
    """(path, text, line, character) at the ends of code lines spread through real files."""
    out = []
    for name in SOURCES:
        text = (REPO / name).read_text(encoding="utf-8")
        lines = text.splitlines()
        code = [i for i, line in enumerate(lines) if len(line.strip()) > 12 and i > 40]
        stride = max(1, len(code) // max(1, count // len(SOURCES) + 1))
        for i in code[::stride]:
            cut = len(lines[i]) - len(lines[i]) // 3  # mid-line: the rest of the line is the answer
            out.append((name, text, i, cut))
    return out[:count]


def start_hog(processes: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]


def stop_hog(hog: list[subprocess.Popen]) -> None:
    for proc in hog:
        proc.kill()
    for proc in hog:
        proc.wait()


def measure(backend, settings, requests, tag: str) -> list[float]:
    from denoiser.engine import Engine
    from lsp_server.suggest import suggest

    engine = Engine(backend)  # empty completion caches: every request reaches the model
    latencies = []
    for i, (path, text, line, character) in enumerate(requests):
        started = time.perf_counter()
        suggest(engine, text, line, character, document=f"{tag}-{i}", path=path, settings=settings)
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from denoiser.engine import Engine, percentiles
    from denoiser.native_backend import cpu_threads_for
    from lsp_server.settings import Settings
    from tools.bench import cpu_name, slug

    cores = os.cpu_count() or 1
    counts = [int(t) for t in args.threads.split(",") if t] or list(range(1, min(cores, 8) + 1))
    chosen = cpu_threads_for(cores)
    backend = Engine.load(args.model, device="cpu").backend
    settings = Settings()
    requests = cursors(args.requests)
    rows = []
    for threads in counts:
        torch.set_num_threads(threads)
        measure(backend, settings, requests[:2], f"warm-{threads}")
        row = {"threads": threads, "chosen": threads == chosen}
        for load in ("idle", "loaded"):
            hog = start_hog(args.hog) if load == "loaded" else []
            try:
                time.sleep(0.5 if hog else 0)
                row[load] = percentiles(measure(backend, settings, requests, f"{load}-{threads}"), (50, 90, 99))
            finally:
                stop_hog(hog)
        row["p99_ratio"] = round(row["loaded"]["p99"] / row["idle"]["p99"], 2)
        rows.append(row)
        print(f"{threads} thread(s){' (chosen)' if row['chosen'] else ''}: idle p50 {row['idle']['p50']:.0f} ms "
              f"p99 {row['idle']['p99']:.0f} ms | with {args.hog} busy processes p50 {row['loaded']['p50']:.0f} ms "
              f"p99 {row['loaded']['p99']:.0f} ms ({row['p99_ratio']}x)", file=sys.stderr)
    machine = slug(cpu_name())[:48]
    results = {"machine": machine, "cpu": cpu_name(), "cores": cores, "torch": torch.__version__,
               "model": backend.name, "requests": len(requests), "hog_processes": args.hog,
               "chosen_threads": chosen, "command": "parafill bench --contended " + " ".join(argv or sys.argv[1:]),
               "rows": rows}
    out = Path(args.out) if args.out else DEFAULT_OUT / f"{machine}__contended.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)
    return 0


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    x = [r["threads"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for load, style in (("idle", "-o"), ("loaded", "--s")):
        for p in ("p50", "p99"):
            ax.plot(x, [r[load][p] for r in rows], style, label=f"{p}, {load if load == 'idle' else 'with a CPU hog'}")
    ax.axvline(results["chosen_threads"], color="gray", linestyle=":", label="parafill's choice")
    ax.set_xlabel("torch threads")
    ax.set_ylabel("completion latency (ms)")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.legend(fontsize=8)
    ax.set_title(f"{results['model']} on {results['cpu']} ({results['cores']} cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
