"""`parafill bench --typing [FILE]`: a real file typed forward through a real server.

Starts `python -m lsp_server serve`, opens FILE (default: the standard library's
`textwrap.py`, the same text for everyone on one Python version) with a hole
cut from a line in its middle, and types the hole's text back a few characters
per request (`--chars`, default 3): each insertion a `didChange`, then an
automatic `inlineCompletion` at the cursor, answered before the next insertion
(`debounceMs` 0: the debounce is a deliberate wait, not latency). After every
answer it reads `parafill/status`, whose `engine.contextTokens` sums tell what
this answer's context held and how much of it came from the context K/V cache,
and whose counts tell who answered (the model, the completion cache, or the
suggestion typed ahead).

Reports the share of context tokens reused (the server's own `contextKvReuse`;
target at least 90%), p50/p99 latency, and both per request, as JSON and a plot
under bench/results/. Measures only.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results"
DEFAULT_FILE = Path(textwrap.__file__)
REUSE_TARGET = 0.9
SOURCES = ("model", "completion_cache", "typed_ahead")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parafill bench --typing", description=__doc__.split("\n\n")[0])
    p.add_argument("file", nargs="?", default=str(DEFAULT_FILE),
                   help=f"the file to type (default: {DEFAULT_FILE})")
    p.add_argument("--model", default=None, help="model directory or name (default: the server's default model)")
    p.add_argument("--requests", type=int, default=200, help="insertions, each followed by a request (default 200)")
    p.add_argument("--chars", type=int, default=3, help="characters typed per request (default 3)")
    p.add_argument("--start", type=float, default=0.5,
                   help="where typing starts, as a fraction of the file's lines (default 0.5)")
    p.add_argument("--setting", action="append", default=[], metavar="NAME=JSON",
                   help="a server setting, camelCase, e.g. --setting contextTokens=512 (repeatable)")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/<machine>__typing.json)")
    return p


def parse_settings(pairs: list[str]) -> dict:
    settings = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"parafill bench --typing: --setting takes NAME=VALUE, got {pair!r}")
        try:
            settings[name] = json.loads(value)
        except json.JSONDecodeError:
            settings[name] = value
    return settings


def typing_plan(text: str, start_fraction: float, requests: int, chars: int) -> tuple[int, list[str]]:
    """(offset where typing starts: a line start, the pieces typed there one request each)."""
    lines = text.splitlines(keepends=True)
    first = min(len(lines) - 1, max(0, int(len(lines) * start_fraction)))
    start = sum(len(line) for line in lines[:first])
    typed = text[start:start + requests * chars]
    return start, [typed[i:i + chars] for i in range(0, len(typed), chars)]


def lsp_position(text: str):
    """The LSP position (UTF-16 character) at the end of `text`."""
    from lsprotocol import types

    row = text[text.rfind("\n") + 1:]
    return types.Position(line=text.count("\n"), character=len(row.encode("utf-16-le")) // 2)


async def replay(file_text: str, uri: str, start: int, pieces: list[str], settings: dict) -> dict:
    from lsprotocol import types
    from pygls.lsp.client import LanguageClient

    from tools.bench import plain_json

    client = LanguageClient("parafill-typing-bench", "0.1")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    await client.start_io(sys.executable, "-m", "lsp_server", "serve", "--device", "cpu", "--log-level", "error",
                          env=env)

    async def status() -> dict:
        return plain_json(await client.protocol.send_request_async("parafill/status", {}))

    try:
        await client.initialize_async(types.InitializeParams(
            capabilities=types.ClientCapabilities(text_document=types.TextDocumentClientCapabilities(
                inline_completion=types.InlineCompletionClientCapabilities())),
            initialization_options={"parafill": settings}))
        client.initialized(types.InitializedParams())
        loading = time.perf_counter()
        now = await status()
        while now.get("state") not in ("ready", "error") and time.perf_counter() - loading < 300:
            await asyncio.sleep(0.1)
            now = await status()
        if now.get("state") != "ready":
            raise RuntimeError(f"the server did not load the model: {now.get('message')}")

        hole = sum(len(piece) for piece in pieces)
        before, after = file_text[:start], file_text[start + hole:]
        client.text_document_did_open(types.DidOpenTextDocumentParams(text_document=types.TextDocumentItem(
            uri=uri, language_id="python", version=1, text=before + after)))
        rows = []
        for i, piece in enumerate(pieces):
            at = lsp_position(before)
            client.text_document_did_change(types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=i + 2),
                content_changes=[types.TextDocumentContentChangePartial(range=types.Range(start=at, end=at),
                                                                         text=piece)]))
            before += piece
            started = time.perf_counter()
            await client.text_document_inline_completion_async(types.InlineCompletionParams(
                text_document=types.TextDocumentIdentifier(uri=uri), position=lsp_position(before),
                context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic)))
            ms = (time.perf_counter() - started) * 1000
            previous, now = now, await status()
            rows.append(request_row(i, ms, previous, now))
        return {"status": now, "rows": rows}
    finally:
        try:
            await asyncio.wait_for(client.shutdown_async(None), 30)
            client.exit(None)
        finally:
            await client.stop()


def request_row(i: int, ms: float, previous: dict, now: dict) -> dict:
    """One request: its latency, who answered, and its context tokens (model answers only)."""
    answered = {k: now["engine"]["answered"].get(k, 0) - previous["engine"]["answered"].get(k, 0) for k in SOURCES}
    source = next((k for k in SOURCES if answered[k]), "none")
    tokens = {k: now["engine"]["contextTokens"][k] - previous["engine"]["contextTokens"][k]
              for k in ("total", "reused")}
    return {"request": i, "ms": round(ms, 3), "source": source, "context_tokens": tokens["total"],
            "reused_tokens": tokens["reused"]}


def summarise(rows: list[dict], status: dict) -> dict:
    from tools.bench import percentiles

    model_rows = [r for r in rows if r["source"] == "model"]
    total = sum(r["context_tokens"] for r in model_rows)
    warm = model_rows[1:]  # the first model answer computes the whole context: the cold open
    warm_total = sum(r["context_tokens"] for r in warm)
    reuse = round(sum(r["reused_tokens"] for r in model_rows) / total, 4) if total else None
    return {
        "context_kv_reuse": reuse,
        "server_context_kv_reuse": status["hitRates"].get("contextKvReuse"),
        "context_kv_reuse_after_first": round(sum(r["reused_tokens"] for r in warm) / warm_total, 4) if warm_total else None,
        "meets_target": reuse is not None and reuse >= REUSE_TARGET,
        "latency_ms": {"all": percentiles([r["ms"] for r in rows]),
                       "model": percentiles([r["ms"] for r in model_rows])},
        "answered_by": {k: sum(r["source"] == k for r in rows) for k in (*SOURCES, "none")},
        "mean_context_tokens": round(total / len(model_rows), 1) if model_rows else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from tools.bench import cpu_name, slug

    path = Path(args.file).expanduser()
    if not path.is_file():
        raise SystemExit(f"parafill bench --typing: {path}: no such file")
    if args.requests < 1 or args.chars < 1:
        raise SystemExit("parafill bench --typing: --requests and --chars must be at least 1")
    text = path.read_text(encoding="utf-8")
    start, pieces = typing_plan(text, args.start, args.requests, args.chars)
    settings = {"debounceMs": 0, **({"model": str(args.model)} if args.model else {}), **parse_settings(args.setting)}
    # The server sees the file under its own name: the path in the preamble is what an editor sends.
    session = asyncio.run(replay(text, path.resolve().as_uri(), start, pieces, settings))
    summary = summarise(session["rows"], session["status"])
    status = session["status"]
    machine = slug(cpu_name())[:48]
    results = {
        "machine": machine, "cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
        "python": sys.version.split()[0], "model": status.get("model"),
        "file": {"path": str(path), "sha256": hashlib.sha256(text.encode()).hexdigest()[:16], "chars": len(text),
                 "start_line": text.count("\n", 0, start) + 1},
        "chars_per_request": args.chars, "requests": len(pieces), "settings": settings,
        "threads": status["engine"].get("threads"),
        **summary,
        "command": "parafill bench --typing " + " ".join(sys.argv[1:] if argv is None else argv),
        "per_request": session["rows"],
    }
    out = Path(args.out) if args.out else DEFAULT_OUT / f"{machine}__typing.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot(results, out.with_suffix(".png"))
    lat = summary["latency_ms"]["all"]
    print(f"typed {results['requests']} x {args.chars} chars of {path.name}: context K/V reuse "
          f"{summary['context_kv_reuse']} (target {REUSE_TARGET}), p50 {lat['p50']} ms, p99 {lat['p99']} ms; "
          f"answered by {summary['answered_by']}", file=sys.stderr)
    print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)
    return 0


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["per_request"]
    fig, (lat, reuse) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    for k, source in enumerate((*SOURCES, "none")):
        mine = [r for r in rows if r["source"] == source]
        if mine:
            lat.scatter([r["request"] for r in mine], [r["ms"] for r in mine], s=8, color=f"C{k}",
                        label=source.replace("_", " "))
    p50, p99 = results["latency_ms"]["all"]["p50"], results["latency_ms"]["all"]["p99"]
    lat.axhline(p50, color="gray", linestyle=":", linewidth=1)
    lat.axhline(p99, color="gray", linestyle="--", linewidth=1)
    lat.set_ylabel("latency (ms)")
    lat.set_yscale("log")
    lat.legend(fontsize=8)
    lat.set_title(f"{results['model']}: {Path(results['file']['path']).name} typed {results['chars_per_request']} "
                  f"chars per request; p50 {p50:.0f} ms, p99 {p99:.0f} ms", fontsize=9)
    model = [r for r in rows if r["source"] == "model" and r["context_tokens"]]
    reuse.plot([r["request"] for r in model], [r["reused_tokens"] / r["context_tokens"] for r in model], ".-",
               markersize=3, linewidth=0.8)
    reuse.axhline(REUSE_TARGET, color="red", linestyle=":", linewidth=1, label=f"target {REUSE_TARGET:.0%}")
    reuse.set_ylim(-0.02, 1.02)
    reuse.set_ylabel("context reused")
    reuse.set_xlabel("request")
    reuse.legend(fontsize=8, loc="lower right")
    reuse.set_title(f"context K/V reuse {results['context_kv_reuse']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
