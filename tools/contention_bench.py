"""`parafill bench --contended`: completion latency with and without other work on the CPU.

A laptop is rarely idle: a build, a test run, a training job compete for its
cores. This measures, in one run, the latency of real completions through the
server's own path (`lsp_server.suggest`: window, engine, post-processing; each
request a new document, so every one computes its context) for several torch
thread counts and for parafill's automatic choice, first on an idle machine and
then beside a CPU hog, and reports p50/p99 and the loaded/unloaded p99 ratio of
each (the target: at most 2x).

The default hog is what an unrelated job on a developer's machine usually is: N
processes doing numeric work with torch's default threads (one OpenMP thread per
core each, spin-waiting between matmuls), fp32 and bf16 matmuls in turn. `--hog
python` is N single-threaded busy loops instead. Configurations take turns
request by request, so each sees the same machine. Writes JSON and a plot under
bench/results/. Measures only.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results"
SOURCES = ("fim/context.py", "denoiser/engine.py", "lsp_server/server.py")
AUTOMATIC = "auto"
HOG_READY_TIMEOUT_S = 300  # a hog imports torch; on a busy machine that takes a while

# Each hog process prints "ready <threads>" once it is busy, then works until its parent
# (this bench) is gone: a bench killed outright leaves no hog spinning behind it.
HOGS = {
    "torch": (
        "import os, torch\n"
        "parent = os.getppid()\n"
        "a = torch.randn(512, 512)\n"
        "b = a.to(torch.bfloat16)\n"
        "a @ a; b @ b\n"
        "print('ready', torch.get_num_threads(), flush=True)\n"
        "while os.getppid() == parent:\n"
        "    a @ a\n"
        "    b @ b\n"
    ),
    "python": (
        "import os\n"
        "parent = os.getppid()\n"
        "print('ready', 1, flush=True)\n"
        "while os.getppid() == parent:\n"
        "    for _ in range(100_000):\n"
        "        pass\n"
    ),
}
# The hog is someone else's job: it runs with its own defaults, not the limits this bench runs under.
HOG_UNSET_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parafill bench --contended", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory or name (default: the embedded model)")
    p.add_argument("--requests", type=int, default=40, help="timed completions per configuration and load")
    p.add_argument("--threads", default=f"1,2,{AUTOMATIC}",
                   help=f"comma-separated torch thread counts, '{AUTOMATIC}' for parafill's own choice "
                        f"(default: 1,2,{AUTOMATIC})")
    p.add_argument("--hog", choices=sorted(HOGS), default="torch",
                   help="torch: processes running matmuls on torch's default threads (default); "
                        "python: single-threaded busy loops")
    p.add_argument("--hog-processes", type=int, default=2, help="hog processes beside the completions (default 2)")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/<machine>__contended-<hog>.json)")
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


def parse_threads(spec: str) -> list[str]:
    configs = [part.strip() for part in spec.split(",") if part.strip()]
    for part in configs:
        if part != AUTOMATIC and not (part.isdigit() and int(part) > 0):
            raise SystemExit(f"parafill bench --contended: --threads takes counts >= 1 and '{AUTOMATIC}', got {part!r}")
    return configs or [AUTOMATIC]


def start_hog(kind: str, processes: int) -> tuple[list[subprocess.Popen], int]:
    """`processes` hog processes, returned once every one of them is busy, and the threads each runs."""
    env = {k: v for k, v in os.environ.items() if k not in HOG_UNSET_ENV}
    # A session of its own, as a job started from another terminal has (where the kernel
    # groups sessions for scheduling, `autogroup` in the report, that decides the shares).
    hog = [subprocess.Popen([sys.executable, "-c", HOGS[kind]], stdout=subprocess.PIPE, env=env,
                            start_new_session=True) for _ in range(processes)]
    threads = 0
    try:
        deadline = time.monotonic() + HOG_READY_TIMEOUT_S
        for proc in hog:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = proc.stdout.readline().split() if ready else []
            if line[:1] != [b"ready"]:
                raise RuntimeError(f"the {kind} hog did not start (exit code {proc.poll()})")
            threads = int(line[1])
    except BaseException:
        stop_hog(hog)
        raise
    return hog, threads


def autogroup() -> bool | None:
    """Whether the kernel shares the CPU between sessions first, then between their tasks
    (Linux `sched_autogroup`; None where it cannot be read)."""
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return None


def stop_hog(hog: list[subprocess.Popen]) -> None:
    for proc in hog:
        proc.kill()
    for proc in hog:
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


class Configuration:
    """One thread setting, with an engine of its own (`fresh_engine`)."""

    def __init__(self, spec: str, backend):
        self.spec = spec
        self.setting = 0 if spec == AUTOMATIC else int(spec)
        self.backend = backend
        self.fresh_engine()
        self.latencies: dict[str, list[float]] = {"idle": [], "loaded": []}
        self.threads_used: dict[str, list[int]] = {"idle": [], "loaded": []}

    def fresh_engine(self) -> None:
        """Empty completion caches: every request reaches the model, whatever ran before."""
        from denoiser.engine import Engine

        self.engine = Engine(self.backend)

    def complete(self, request, settings, document: str) -> tuple[float, int]:
        from lsp_server.suggest import suggest

        path, text, line, character = request
        self.backend.set_cpu_threads(self.setting)
        started = time.perf_counter()
        suggest(self.engine, text, line, character, document=document, path=path, settings=settings)
        return (time.perf_counter() - started) * 1000, self.backend.cpu_threads

    def row(self) -> dict:
        from denoiser.engine import percentiles

        row: dict = {"threads": self.spec, "automatic": self.setting == 0}
        for load in ("idle", "loaded"):
            row[load] = percentiles(self.latencies[load], (50, 90, 99))
            used = self.threads_used[load]
            row[load]["threads_used"] = {str(n): used.count(n) for n in sorted(set(used))}
        row["p99_ratio"] = round(row["loaded"]["p99"] / row["idle"]["p99"], 2)
        row["p99_within_2x"] = row["p99_ratio"] <= 2.0
        return row


def measure(configs: list[Configuration], requests, settings, load: str) -> dict:
    """Each request once per configuration, configurations taking turns; the other tasks seen meanwhile."""
    from denoiser.native_backend import busy_tasks

    for config in configs:  # a new team size starts its threads: not on the clock
        config.complete(requests[0], settings, f"warm-{load}-{config.spec}")
        config.fresh_engine()
    busy = []
    for i, request in enumerate(requests):
        for config in configs:
            busy.append(busy_tasks())
            ms, threads = config.complete(request, settings, f"{load}-{config.spec}-{i}")
            config.latencies[load].append(ms)
            config.threads_used[load].append(threads)
    return {"median": statistics.median(busy), "max": max(busy)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from denoiser.engine import Engine
    from denoiser.native_backend import cpu_threads_for
    from lsp_server.settings import Settings
    from tools.bench import cpu_name, slug

    cores = os.cpu_count() or 1
    # The automatic row must choose as the server does for a user who set nothing.
    user_omp = os.environ.pop("OMP_NUM_THREADS", None)
    try:
        backend = Engine.load(args.model, device="cpu").backend
        configs = [Configuration(spec, backend) for spec in parse_threads(args.threads)]
        requests = cursors(args.requests)
        settings = Settings()
        busy = {"idle": measure(configs, requests, settings, "idle")}
        hog, hog_threads = start_hog(args.hog, args.hog_processes)
        try:
            time.sleep(0.5)
            busy["loaded"] = measure(configs, requests, settings, "loaded")
        finally:
            stop_hog(hog)
        backend.set_cpu_threads(0)
    finally:
        if user_omp is not None:
            os.environ["OMP_NUM_THREADS"] = user_omp
    rows = [config.row() for config in configs]
    for row in rows:
        print(f"{row['threads']:>4} thread(s): idle p50 {row['idle']['p50']:.0f} ms p99 {row['idle']['p99']:.0f} ms | "
              f"with the {args.hog} hog p50 {row['loaded']['p50']:.0f} ms p99 {row['loaded']['p99']:.0f} ms "
              f"({row['p99_ratio']}x; threads used {row['loaded']['threads_used']})", file=sys.stderr)
    machine = slug(cpu_name())[:48]
    results = {
        "machine": machine, "cpu": cpu_name(), "cores": cores, "torch": torch.__version__, "model": backend.name,
        "requests": len(requests),
        "hog": {"kind": args.hog, "processes": args.hog_processes, "threads_each": hog_threads},
        # What the automatic choice allows this machine when nothing else runs (cpu_threads_for).
        "automatic_cap": cpu_threads_for(cores),
        "autogroup": autogroup(),
        # Other runnable tasks seen before each request (denoiser.native_backend.busy_tasks):
        # an idle phase with a median above 0 did not run on an idle machine.
        "busy_tasks": busy,
        "command": "parafill bench --contended " + " ".join(sys.argv[1:] if argv is None else argv),
        "rows": rows,
    }
    out = Path(args.out) if args.out else DEFAULT_OUT / f"{machine}__contended-{args.hog}.json"
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
    labels = [f"{r['threads']}\n(cap {results['automatic_cap']})" if r["automatic"] else r["threads"] for r in rows]
    bars = (("idle", "p50"), ("idle", "p99"), ("loaded", "p50"), ("loaded", "p99"))
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, (load, p) in enumerate(bars):
        xs = [i + (k - 1.5) * width for i in range(len(rows))]
        name = "idle" if load == "idle" else f"with the {results['hog']['kind']} hog"
        ax.bar(xs, [r[load][p] for r in rows], width, label=f"{p}, {name}", hatch="//" if load == "loaded" else None,
               color=f"C{k % 2}", alpha=0.55 if load == "idle" else 0.9)
    for i, r in enumerate(rows):
        ax.annotate(f"p99 x{r['p99_ratio']}", (i + 1.5 * width, r["loaded"]["p99"]), ha="center", va="bottom",
                    fontsize=8, color="black" if r["p99_within_2x"] else "red")
    ax.set_xticks(range(len(rows)), labels)
    ax.set_xlabel("torch threads")
    ax.set_ylabel("completion latency (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    hog = results["hog"]
    ax.set_title(f"{results['model']} on {results['cpu']} ({results['cores']} cores); hog: {hog['processes']} "
                 f"{hog['kind']} processes x {hog['threads_each']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
