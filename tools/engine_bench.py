"""`parafill bench --engine`: what the team engine costs and what its replicas buy.

In one run, on one machine, with one model:
- the hop: the same fills answered in this process (`Engine` over the model) and
  through `parafill engine` on 127.0.0.1 (the server's `RemoteBackend` → Ray
  Serve's proxy → one replica), taken in turns, one of each per cursor, so a
  machine whose load changes during the run slows both alike: p50 and p99 of
  each and of their paired difference, the part of a fill spent outside the
  replica's model (the round trip less the time the replica reports), and the
  round trip of a request that does no model work (GET /v1/health);
- throughput: requests/s, p50 and p99 for 1, 4 and 16 concurrent clients
  against 1 and 2 replicas (one CPU thread each by default). Each client is one
  editor's language server: its own `Engine` over its own `RemoteBackend`
  (connections, document keys), calling the server's suggestion path
  (`lsp_server.suggest`) on its own document, one request after another, each
  at a new cursor (so no answer comes from the server's own caches). With more
  than one replica, each client count starts once the documents of the one
  before have gone idle, as if those editors had closed them (the router places
  documents by the active ones: `team_engine.placement`);
- the machine's own ceiling: fills/s of 1 and 2 plain processes filling at
  once in themselves, no engine, no clients (what two replicas could at best
  get from the cores they share with everything else).
The engine runs on a Ray cluster this command starts on 127.0.0.1 and stops at
the end. Writes JSON and a plot under bench/results/. Measures only.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results"
SOURCES = ("fim/context.py", "denoiser/engine.py", "lsp_server/server.py", "denoiser/sampler.py",
           "lsp_server/worker.py", "fim/postprocess.py")
HOP_TARGET_MS = 5.0  # p50 of the hop on loopback
SCALING_TARGET = 1.7  # requests/s of 2 replicas over 1, at 16 clients


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parafill bench --engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory or name (default: the embedded model)")
    p.add_argument("--tiny", action="store_true", help="a small random model instead (for development)")
    p.add_argument("--replicas", default="1,2", help="comma-separated replica counts (default 1,2)")
    p.add_argument("--clients", default="1,4,16", help="comma-separated concurrent clients (default 1,4,16)")
    p.add_argument("--requests", type=int, default=24, help="requests per client per measurement (default 24)")
    p.add_argument("--hop-requests", type=int, default=100,
                   help="fills timed in this process and through the engine, and no-op round trips (default 100)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of each replica (default 1)")
    p.add_argument("--num-cpus", type=float, default=None,
                   help="CPUs of the Ray cluster this command starts (default: this machine's)")
    p.add_argument("--quick", action="store_true", help="CI size: 2 requests per client, 1 and 4 clients, 10 hops")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/<machine>__<model>__engine.json)")
    return p


def say(message: str) -> None:
    print(f"parafill bench --engine: {message}", file=sys.stderr, flush=True)


def percentiles(values: list[float]) -> dict:
    from denoiser.engine import percentiles as nearest_rank

    return {**nearest_rank(values, (50, 90, 99)), "n": len(values),
            "mean": round(statistics.fmean(values), 3) if values else None}


def cursors(count: int, salt: str, source: str | None = None) -> list[tuple[str, int, int]]:
    """(text, line, character) of `count` requests in one document, moving down it as a user
    does: mid-line in lines of code of a real file (`source`, default: one picked by `salt`).
    `salt` heads the text, so two clients' documents differ for every cache."""
    existing = [name for name in SOURCES if (REPO / name).exists()]
    if not existing:
        raise SystemExit("parafill bench --engine: no source files to place cursors in")
    name = source or existing[sum(map(ord, salt)) % len(existing)]
    text = f"# {salt}\n" + (REPO / name).read_text(encoding="utf-8")
    lines = text.splitlines()
    code = [i for i, line in enumerate(lines) if len(line.strip()) > 16 and i > 30]
    picked = code[:: max(1, len(code) // max(1, count))][:count]
    while len(picked) < count:  # a short file: go round again, one character further in
        picked += code[: count - len(picked)]
    seen: dict[int, int] = {}
    out = []
    for i in picked:
        seen[i] = seen.get(i, 0) + 1
        out.append((text, i, max(1, len(lines[i]) - len(lines[i]) // 3 - seen[i] + 1)))
    return out


def timed_fills(engine, settings, requests: list[tuple[str, int, int]], document: str) -> list[float]:
    from lsp_server.suggest import suggest

    latencies = []
    for text, line, character in requests:
        started = time.perf_counter()
        found = suggest(engine, text, line, character, document=document, settings=settings)
        latencies.append((time.perf_counter() - started) * 1000)
        if found.source != "model":
            raise SystemExit(f"parafill bench --engine: a request was answered from {found.source}, not the model")
    return latencies


def paired_fills(local, remote, settings, requests: list[tuple[str, int, int]]) -> tuple[list[float], list[float]]:
    """Each request in this process and through the engine, one after the other, the order
    alternating: (in-process ms, through-engine ms), pair by pair."""
    here, there = [], []
    for i, request in enumerate(requests):
        for engine in ((local, remote) if i % 2 == 0 else (remote, local)):
            (here if engine is local else there).extend(timed_fills(engine, settings, [request], "file:///bench/hop.py"))
    return here, there


def noop_round_trips(url: str, token: str, count: int) -> list[float]:
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    latencies = []
    try:
        for _ in range(count + 3):
            started = time.perf_counter()
            connection.request("GET", "/v1/health", headers={"Authorization": f"Bearer {token}"})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit(f"parafill bench --engine: /v1/health answered {response.status}")
            latencies.append((time.perf_counter() - started) * 1000)
    finally:
        connection.close()
    return latencies[3:]  # the first round trips open the connection and warm the path


def requests_per_replica(statuses: list[dict]) -> dict[str, int]:
    """Requests each replica answered, summed over the clients' `teamEngine` statuses (every
    request counted, each client's first included): how evenly the routing spread the documents."""
    counts: dict[str, int] = {}
    for status in statuses:
        for name, figures in status["replicas"].items():
            counts[name] = counts.get(name, 0) + figures["requests"]
    return counts


def _plain_process(model: str | None, threads: int, settings, requests: int, salt: str, start, results) -> None:
    """One process filling in itself, no engine: a replica's work without Ray, proxy or clients."""
    import torch

    from denoiser.engine import Engine

    torch.set_num_threads(threads)
    engine = Engine.load(model, device="cpu")
    engine.set_threads(threads)
    work = cursors(requests + 1, salt)
    timed_fills(engine, settings, work[:1], f"file:///bench/{salt}.py")
    start.wait()
    began = time.perf_counter()
    timed_fills(engine, settings, work[1:], f"file:///bench/{salt}.py")
    results.put(requests / (time.perf_counter() - began))


def machine_ceiling(model: str | None, threads: int, settings, counts: list[int], requests: int) -> list[dict]:
    """Fills/s of 1, 2, ... plain processes at once, each filling its own document in itself:
    what this machine's cores give that many replicas when nothing else shares them."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # a fresh torch per process, as a replica has
    rows = []
    for count in counts:
        start, results = context.Barrier(count + 1), context.Queue()
        workers = [context.Process(target=_plain_process, args=(model, threads, settings, requests,
                                                                f"plain-{count}-{i}", start, results))
                   for i in range(count)]
        for worker in workers:
            worker.start()
        start.wait()
        rates = [results.get(timeout=3600) for _ in workers]
        for worker in workers:
            worker.join()
        rows.append({"processes": count, "fills_per_s": round(sum(rates), 3)})
        say(f"{count} plain process(es), no engine: {rows[-1]['fills_per_s']} fills/s")
    return rows


def clients_run(url: str, settings, clients: int, per_client: int, tag: str) -> dict:
    """`clients` threads, each its own server-side Engine + RemoteBackend and document; closed loop."""
    from lsp_server.engine_client import connect_engine

    engines = [connect_engine(url) for _ in range(clients)]
    work = [cursors(per_client + 1, f"{tag}-client-{c}") for c in range(clients)]
    for c, engine in enumerate(engines):  # one request each first: documents placed, connections open
        timed_fills(engine, settings, work[c][:1], f"file:///bench/{tag}/{c}.py")
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        start.wait()
        try:
            latencies[c] = timed_fills(engines[c], settings, work[c][1:], f"file:///bench/{tag}/{c}.py")
        except BaseException as exc:  # reported below, never lost in a thread
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - began
    if errors:
        raise SystemExit(f"parafill bench --engine: a client failed: {errors[0]}")
    per_replica = requests_per_replica([engine.backend.remote_status() for engine in engines])
    for engine in engines:
        engine.backend.close()
    flat = [v for row in latencies for v in row]
    return {"clients": clients, "requests": len(flat), "seconds": round(seconds, 3),
            "requests_per_s": round(len(flat) / seconds, 3), "latency_ms": percentiles(flat),
            "replicas_used": len(per_replica), "requests_per_replica": sorted(per_replica.values(), reverse=True)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.requests, args.hop_requests = min(args.requests, 2), min(args.hop_requests, 10)
        if args.clients == "1,4,16":
            args.clients = "1,4"
    replica_counts = [int(r) for r in args.replicas.split(",") if r]
    client_counts = [int(c) for c in args.clients.split(",") if c]
    token = secrets.token_urlsafe(24)
    os.environ["PARAFILL_ENGINE_TOKEN"] = token  # the server side reads it as an editor's server would
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    with tempfile.TemporaryDirectory(prefix="parafill-engine-bench-") as tmp:
        model = args.model
        if args.tiny:
            from tools.bench import TINY_SHAPE_QUICK
            from tools.tiny_native import make_tiny_model

            model = str(make_tiny_model(Path(tmp) / "tiny-model", **TINY_SHAPE_QUICK))
        from team_engine.cluster import EngineStartError

        try:
            results = run(args, model, token, replica_counts, client_counts)
        except EngineStartError as exc:
            print(f"parafill bench --engine: error: {exc}", file=sys.stderr)
            return 1
    results["command"] = "parafill bench --engine " + " ".join(argv if argv is not None else sys.argv[1:])
    from tools.bench import cpu_name, slug

    name = "tiny-random" if args.tiny else results["model"]
    out = Path(args.out) if args.out else DEFAULT_OUT / f"{slug(cpu_name())[:48]}__{slug(name)}__engine" \
                                                        f"{'__quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot(results, out.with_suffix(".png"))
    print(json.dumps(results["headline"], indent=2))
    print(f"parafill bench --engine: wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)
    return 0


def run(args, model: str | None, token: str, replica_counts: list[int], client_counts: list[int]) -> dict:
    import torch

    from denoiser.engine import Engine
    from lsp_server.engine_client import connect_engine
    from lsp_server.settings import Settings
    from team_engine.app import APP_NAME, EngineOptions, build_application
    from team_engine.auth import digest
    from team_engine.cluster import free_ports, serve_engine, start_local_cluster
    from team_engine.placement import IDLE_S
    from tools.bench import cpu_name

    # The product's decoding, without the latency budget: every fill does its whole work
    # (--quick: short spans and few steps, as the other benchmarks' CI size).
    settings = Settings(latency_budget_ms=0, min_confidence=0)
    if args.quick:
        settings = Settings(latency_budget_ms=0, min_confidence=0, steps=4, span_tokens_line=8, span_tokens_block=8,
                            context_tokens=256)

    # The same model in this process, at the same thread count, for the hop's in-process side.
    torch.set_num_threads(args.threads)
    local = Engine.load(model, device="cpu")
    local.set_threads(args.threads)
    model_name = local.backend.name
    hop_work = cursors(args.hop_requests + 2, "hop")
    timed_fills(local, settings, hop_work[:2], "file:///bench/warm.py")

    ceiling = machine_ceiling(model, args.threads, settings, replica_counts, max(2, args.requests * 2))
    cpus = args.num_cpus or float(os.cpu_count() or 1)
    cluster = start_local_cluster(cpus, 0.0, digest(token))
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    rows, hop = [], {}
    try:
        for replicas in replica_counts:
            options = EngineOptions(model=model, device="cpu", replicas=replicas, threads=args.threads)
            say(f"deploying {replicas} replica(s)")
            serve_engine(build_application(options, digest(token)), "127.0.0.1", port, app_name=APP_NAME)
            if not hop:
                engine = connect_engine(url)
                timed_fills(engine, settings, hop_work[:2], "file:///bench/warm.py")
                in_process, remote = paired_fills(local, engine, settings, hop_work[2:])
                outside = engine.backend.remote_status()["hopMs"]
                engine.backend.close()
                local = None  # its memory back before the throughput runs
                noop = noop_round_trips(url, token, args.hop_requests)
                added = [r - i for r, i in zip(remote, in_process)]
                hop = {"in_process_ms": percentiles(in_process), "through_engine_ms": percentiles(remote),
                       "added_ms": percentiles(added), "outside_model_ms": outside,
                       "noop_round_trip_ms": percentiles(noop)}
                say(f"hop: no-op round trip p50 {hop['noop_round_trip_ms']['p50']} ms, fills "
                    f"{hop['through_engine_ms']['p50']} ms through the engine vs {hop['in_process_ms']['p50']} ms here "
                    f"(added p50 {hop['added_ms']['p50']} ms, of which outside the replica's model "
                    f"p50 {outside['p50']} ms)")
            for n, clients in enumerate(client_counts):
                if replicas > 1 and n:
                    time.sleep(IDLE_S + 1)  # the last clients' documents stop counting
                row = {"replicas": replicas, **clients_run(url, settings, clients, args.requests,
                                                           f"r{replicas}c{clients}")}
                rows.append(row)
                say(f"{replicas} replica(s), {clients} client(s): {row['requests_per_s']} requests/s, "
                    f"p50 {row['latency_ms']['p50']} ms, p99 {row['latency_ms']['p99']} ms")
    finally:
        cluster.stop()

    def rps(replicas: int, clients: int):
        return next((r["requests_per_s"] for r in rows if r["replicas"] == replicas and r["clients"] == clients),
                    None)

    most = max(client_counts)
    scaling = None
    if rps(1, most) and rps(2, most):
        scaling = round(rps(2, most) / rps(1, most), 3)
    plain = {row["processes"]: row["fills_per_s"] for row in ceiling}
    plain_scaling = round(plain[2] / plain[1], 3) if plain.get(1) and plain.get(2) else None
    headline = {
        "hop_noop_p50_ms": hop["noop_round_trip_ms"]["p50"], "hop_noop_p99_ms": hop["noop_round_trip_ms"]["p99"],
        "hop_added_p50_ms": hop["added_ms"]["p50"], "hop_added_p99_ms": hop["added_ms"]["p99"],
        "hop_outside_model_p50_ms": hop["outside_model_ms"]["p50"],
        "hop_target_p50_ms": HOP_TARGET_MS,
        "hop_target_met": hop["noop_round_trip_ms"]["p50"] is not None
        and hop["noop_round_trip_ms"]["p50"] <= HOP_TARGET_MS,
        f"replica_scaling_at_{most}_clients": scaling, "scaling_target": SCALING_TARGET,
        "scaling_target_met": scaling is not None and scaling >= SCALING_TARGET,
        # The same ratio for plain processes without the engine: what the machine allows.
        "plain_process_scaling": plain_scaling,
    }
    from importlib.metadata import version

    return {"machine": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "ray": version("ray"),
            "model": model_name, "threads_per_replica": args.threads, "requests_per_client": args.requests,
            "settings": {"steps": settings.steps, "span_tokens_line": settings.span_tokens_line,
                         "span_tokens_block": settings.span_tokens_block, "context_tokens": settings.context_tokens,
                         "latency_budget_ms": 0},
            "note": "clients, replicas, Ray and this process share the machine's cores",
            "hop": hop, "throughput": rows, "plain_processes": ceiling, "headline": headline}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    hop = results["hop"]
    names = ["no-op round trip", "fill in process", "fill via engine"]
    keys = ["noop_round_trip_ms", "in_process_ms", "through_engine_ms"]
    x = range(len(names))
    left.bar([i - 0.2 for i in x], [hop[k]["p50"] for k in keys], width=0.4, label="p50")
    left.bar([i + 0.2 for i in x], [hop[k]["p99"] for k in keys], width=0.4, label="p99")
    left.axhline(HOP_TARGET_MS, color="gray", linestyle=":", label=f"hop target {HOP_TARGET_MS:g} ms")
    left.set_xticks(list(x), names)
    left.set_ylabel("ms")
    left.set_title("the hop to the engine (loopback)")
    left.legend(fontsize=8)
    for replicas in sorted({r["replicas"] for r in results["throughput"]}):
        rows = [r for r in results["throughput"] if r["replicas"] == replicas]
        right.plot([r["clients"] for r in rows], [r["requests_per_s"] for r in rows], "-o",
                   label=f"{replicas} replica(s)")
    right.set_xscale("log", base=2)
    right.set_xlabel("concurrent clients")
    right.set_ylabel("requests/s")
    right.set_title("throughput")
    right.legend(fontsize=8)
    fig.suptitle(f"{results['model']} on {results['machine']} ({results['cores']} cores), "
                 f"{results['threads_per_replica']} thread(s) per replica", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
