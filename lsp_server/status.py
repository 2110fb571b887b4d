"""What `parafill/status` and `parafill status` report: state, latency, caches, counts.

`ServerStats` counts requests as the server sees them and keeps a window of
end-to-end latencies (request in → reply out, debounce excluded); the engine
contributes model latency and cache hit rates. Pure bookkeeping: no LSP, no
tensors, no source text.
"""
from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any

# waitedForModel: requests that arrived while the model loaded and were answered by it.
# engineUnavailable: requests answered empty because the team engine was away (reported once).
COUNTS = ("inline", "completion", "answered", "empty", "superseded", "cancelled", "notReady", "waitedForModel",
          "errors", "engineUnavailable")


def percentiles(values, points=(50, 90, 99)) -> dict[str, float | None]:
    """Nearest-rank percentiles (an observed value, never an interpolation)."""
    ordered = sorted(values)
    if not ordered:
        return {f"p{p}": None for p in points}
    n = len(ordered)
    return {f"p{p}": round(ordered[min(n - 1, max(0, -(-p * n // 100) - 1))], 3) for p in points}


class ServerStats:
    def __init__(self, window: int = 1000) -> None:
        self.counts: Counter[str] = Counter({name: 0 for name in COUNTS})
        self.latency_ms: deque[float] = deque(maxlen=window)
        self.started = time.monotonic()

    def count(self, name: str) -> None:
        self.counts[name] += 1

    def answered(self, elapsed_ms: float) -> None:
        self.counts["answered"] += 1
        self.latency_ms.append(elapsed_ms)


def _camel_keys(data: dict[str, Any]) -> dict[str, Any]:
    def camel(key: str) -> str:
        head, *rest = key.split("_")
        return head + "".join(part.title() for part in rest)

    return {camel(k): v for k, v in data.items()}


def status_report(
    *, state: str, message: str, model: str, device: str, stats: ServerStats, engine_status: dict | None,
    settings: dict[str, Any] | None = None, drafts_index: dict[str, Any] | None = None,
    caches: dict[str, dict[str, int]] | None = None, open_documents: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The `parafill/status` result (camelCase, JSON-ready).

    `caches` are the server's own caches (name -> entries, bytes, max_bytes), shown
    beside the engine's under "caches".
    """
    engine = engine_status or {}
    hit_rates = _camel_keys(engine.get("hit_rates") or {})
    report: dict[str, Any] = {
        "model": engine.get("model") or model or "default",
        "device": engine.get("device") or device,
        "state": state,
        "message": message,
        "parameters": engine.get("parameters"),
        "latency": percentiles(stats.latency_ms),
        "modelLatency": engine.get("model_latency_ms") or percentiles(()),
        "engineLatency": engine.get("latency_ms") or percentiles(()),
        "cacheHitRate": round(hit_rates.get("typedAhead", 0.0) + hit_rates.get("completionCache", 0.0), 4),
        "hitRates": hit_rates,
        "requests": dict(stats.counts),
        "engine": {
            "requests": engine.get("requests", 0),
            "answered": engine.get("answered", {}),
            "cancelled": engine.get("cancelled", 0),
            "errors": engine.get("errors", 0),
            "fallbacks": engine.get("fallbacks", 0),
            # Answers the latency budget stopped early (a hole-free start of the model's answer).
            "budgetCuts": engine.get("budget_cuts", 0),
            "threads": engine.get("threads"),
            # CPU span steps compiled in the background: the shapes ready so far (null: not compiling).
            "compiledSteps": engine.get("compiled_steps"),
            # Context tokens of the model's answers, and how many of them came from the K/V cache.
            "contextTokens": engine.get("context_tokens") or {"total": 0, "reused": 0},
            "lastError": engine.get("last_error"),
            # Shared denoising steps (a batching backend only): how concurrent requests met.
            "batching": _camel_keys(engine.get("batching") or {}),
        },
        # Drafts from your code: how the model judged them, and what the index holds.
        "drafts": {**(engine.get("drafts") or {"proposed": 0, "accepted": 0, "repaired": 0, "rejected": 0}),
                   "index": drafts_index or {}},
        "stepsPerRequest": engine.get("steps_per_request"),
        # What each cache holds and may hold, in bytes; and the open documents' text.
        "caches": {name: _camel_keys(figures)
                   for name, figures in _camel_keys({**(engine.get("caches") or {}), **(caches or {})}).items()},
        "openDocuments": open_documents or {"count": 0, "bytes": 0},
        "uptimeS": round(time.monotonic() - stats.started, 1),
        "settings": settings or {},
    }
    return report
