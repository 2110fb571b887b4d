"""The engine between the server and a backend: caches, serialisation, stats, faults.

Answers come from the fastest source that is exact (DESIGN.md, "Caches"):
1. typed-ahead: the user typed the start of the last suggestion → its remainder;
2. the completion cache (LRU + TTL) keyed by what the model would see;
3. the backend, whose own context K/V cache makes a keystroke cheap.
`complete` is safe from any thread (the server calls it from its worker,
never on the event loop): one lock serialises a backend, unless it batches
concurrent requests itself (`concurrent_fill`, the native backend). A CUDA
fault is retried down a list of fallbacks and counted. This module knows no
tokens, tensors of the model or LSP.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable, Literal

from cachetools import LRUCache, TTLCache

from denoiser.backend import Backend, Cancelled, DecodeSettings, FillResult
from fim.request import FimRequest

Source = Literal["model", "completion_cache", "typed_ahead"]
Fill = Callable[[Backend, FimRequest], FillResult]

# What the engine's own caches may hold, in bytes: an entry keeps the whole context
# the model saw (up to the contextTokens setting), so a count of entries says little.
COMPLETION_CACHE_BYTES = 8 << 20
TYPED_AHEAD_BYTES = 4 << 20
ENTRY_OVERHEAD_BYTES = 512  # the tuples, dataclasses and cache links around an entry's text


def held_bytes(value) -> int:
    """Bytes of the strings `value` holds (in tuples, lists and dataclasses, however nested)."""
    if isinstance(value, str):
        return sys.getsizeof(value)
    if isinstance(value, (tuple, list)):
        return sum(held_bytes(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(held_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 0


def _entry_bytes(value) -> int:
    return held_bytes(value) + ENTRY_OVERHEAD_BYTES


def _weighed_bytes(entry: tuple) -> int:
    return entry[1]


def _store(cache, key, value) -> None:
    """cache[key] = value, unless the entry alone outweighs the whole cache (then it is not kept)."""
    try:
        cache[key] = value
    except ValueError:  # cachetools: "value too large"
        cache.pop(key, None)


@dataclass(frozen=True)
class Completion:
    text: str
    source: Source
    tokens: int
    steps: int
    context_tokens: int
    reused_context_tokens: int
    elapsed_ms: float
    confidence: float | None = None  # the fill's FillResult.confidence (typed-ahead: the fill it continues)
    draft: str | None = None  # the fill's FillResult.draft: how the model judged the request's draft
    budget_cut: bool = False  # the latency budget stopped the model: a hole-free start of its answer
    shortened: bool = False  # a device-fault fallback cut the span (not worth caching by a client)


@dataclass(frozen=True)
class _Suggestion:
    """The last answer for a document, for typed-ahead."""

    request: FimRequest
    text: str
    confidence: float | None = None  # of the fill it came from: its remainder is gated alike


def typed_ahead_remainder(last: _Suggestion, request: FimRequest) -> str | None:
    """The rest of the last suggestion if the user has typed its start since, else None."""
    before = last.request
    if request.suffix != before.suffix or request.preamble != before.preamble:
        return None
    if not request.prefix.startswith(before.prefix):
        return None
    typed = request.prefix[len(before.prefix):]
    if not typed or not last.text.startswith(typed):
        return None
    return last.text[len(typed):]


def is_device_fault(exc: BaseException) -> bool:
    """Out of GPU memory, or another CUDA runtime failure worth a fallback."""
    torch = sys.modules.get("torch")  # not loaded: no model ran here, so no device failed
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and ("CUDA" in str(exc) or "cuda" in str(exc))


def percentiles(values, points=(50, 90, 99)) -> dict[str, float | None]:
    ordered = sorted(values)
    if not ordered:
        return {f"p{p}": None for p in points}
    # Nearest rank: an observed value, never an interpolation.
    return {f"p{p}": round(ordered[min(len(ordered) - 1, max(0, -(-p * len(ordered) // 100) - 1))], 3) for p in points}


class Engine:
    def __init__(self, backend: Backend, cache_bytes: int = COMPLETION_CACHE_BYTES, cache_ttl_s: float = 600,
                 typed_ahead_bytes: int = TYPED_AHEAD_BYTES, latency_window: int = 1000):
        self.backend = backend
        self._backend_lock = threading.Lock()
        self._state_lock = threading.Lock()
        # Entries are (FillResult, bytes of its key and itself): the key is the context the model saw.
        self._completions: TTLCache = TTLCache(maxsize=cache_bytes, ttl=cache_ttl_s, getsizeof=_weighed_bytes)
        # One entry per open document; dropped when it closes (`forget`).
        self._last: LRUCache[str, _Suggestion] = LRUCache(maxsize=typed_ahead_bytes, getsizeof=_entry_bytes)
        self._latency_ms: deque[float] = deque(maxlen=latency_window)
        self._model_latency_ms: deque[float] = deque(maxlen=latency_window)
        self._counts = dict(requests=0, model=0, completion_cache=0, typed_ahead=0, cancelled=0, errors=0, fallbacks=0,
                            budget_cuts=0)
        self._context_tokens = 0
        self._model_steps = 0  # denoising passes over all model answers (a draft's check counts one)
        self._drafts = dict(proposed=0, accepted=0, repaired=0, rejected=0)
        self._reused_context_tokens = 0
        self.last_error: str | None = None
        # Tried in order when the backend hits a device fault; each returns a new
        # way to fill or None if it does not apply. Add more handlers here.
        self.fallbacks: list[Callable[[BaseException, FimRequest], Fill | None]] = [
            self._fallback_smaller_span,
            self._fallback_cpu,
        ]

    @classmethod
    def load(cls, model=None, device: str = "auto", progress=None, *, open_model_weights: str = "auto",
             **options) -> "Engine":
        from denoiser.loading import load_backend

        return cls(load_backend(model, device, progress, open_model_weights=open_model_weights), **options)

    # --- answering ------------------------------------------------------------
    @property
    def max_context_tokens(self) -> int | None:
        """The most context tokens the model keeps; the server plans its windows for this."""
        return getattr(self.backend, "max_context_tokens", None)

    def complete(
        self,
        request: FimRequest,
        decode: DecodeSettings = DecodeSettings(),
        *,
        document: str = "",
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> Completion:
        started = time.perf_counter()
        with self._state_lock:
            self._counts["requests"] += 1
            last = self._last.get(document)
            remainder = typed_ahead_remainder(last, request) if last else None
            key = (request.context_key(), decode.steps, decode.confidence_threshold)
            entry = self._completions.get(key) if remainder is None else None
            cached: FillResult | None = entry[0] if entry is not None else None
        if remainder is not None:
            return self._answer(document, request, remainder, "typed_ahead", None, started,
                                confidence=last.confidence, is_cancelled=is_cancelled)
        if cached is not None:
            return self._answer(document, request, cached.text, "completion_cache", cached, started,
                                is_cancelled=is_cancelled)
        if is_cancelled():
            self._count("cancelled")
            raise Cancelled("cancelled before the model ran")
        result = self._fill(request, decode, document, is_cancelled)
        with self._state_lock:
            # A fallback's shorter answer must not outlive the fault, nor a budget-cut one
            # stand in for the full answer a later request (or a faster moment) would get.
            if not result.shortened and not result.budget_cut:
                _store(self._completions, key, (result, held_bytes(key) + _entry_bytes(result)))
            self._context_tokens += result.context_tokens
            self._model_steps += result.steps
            self._counts["budget_cuts"] += result.budget_cut
            if result.draft is not None:
                self._drafts["proposed"] += 1
                self._drafts[result.draft] = self._drafts.get(result.draft, 0) + 1
            self._reused_context_tokens += result.reused_context_tokens
        return self._answer(document, request, result.text, "model", result, started, is_cancelled=is_cancelled)

    def _answer(self, document, request, text, source: Source, result: FillResult | None, started,
                confidence: float | None = None, is_cancelled: Callable[[], bool] = lambda: False) -> Completion:
        elapsed_ms = (time.perf_counter() - started) * 1000
        if result is not None:
            confidence = result.confidence
        with self._state_lock:
            self._counts[source] += 1
            self._latency_ms.append(elapsed_ms)
            if source == "model":
                self._model_latency_ms.append(elapsed_ms)
            # A request superseded meanwhile (an edit, a newer request, the document closed and
            # forgotten) leaves no typed-ahead state: after a close it would stay for good.
            if not is_cancelled():
                _store(self._last, document, _Suggestion(request, text, confidence))
        return Completion(
            text=text,
            source=source,
            tokens=result.tokens if result else 0,
            steps=result.steps if result else 0,
            context_tokens=result.context_tokens if result else 0,
            reused_context_tokens=result.reused_context_tokens if result else 0,
            elapsed_ms=elapsed_ms,
            confidence=confidence,
            draft=result.draft if result else None,
            budget_cut=result.budget_cut if result else False,
            shortened=result.shortened if result else False,
        )

    def _fill(self, request: FimRequest, decode: DecodeSettings, document: str, is_cancelled) -> FillResult:
        def fill(backend: Backend, req: FimRequest) -> FillResult:
            return backend.fill(req, decode, document=document, is_cancelled=is_cancelled)

        backend = self.backend
        # A backend that batches concurrent requests (NativeBackend) is called
        # without the lock, so requests from several threads share its steps.
        concurrent = getattr(backend, "concurrent_fill", False)
        with contextlib.nullcontext() if concurrent else self._backend_lock:
            try:
                if is_cancelled():  # it may have waited for the lock while the user typed on
                    raise Cancelled("cancelled while waiting for the model")
                return fill(backend, request)
            except Cancelled:
                self._count("cancelled")
                raise
            except Exception as exc:
                if not is_device_fault(exc):
                    self._record_error(exc)
                    raise
                if not concurrent:
                    return self._recover(exc, request, fill, backend)
                fault = exc
        with self._backend_lock:
            return self._recover(fault, request, fill, backend)

    def _recover(self, exc: BaseException, request: FimRequest, fill: Callable, failed: Backend) -> FillResult:
        """Called with the backend lock held, after `failed` hit a device fault."""
        if self.backend is not failed:
            # Another request's recovery already replaced the backend (moved it to the
            # CPU): this one simply runs again there, with nothing more to undo.
            self._count("fallbacks")
            return fill(self.backend, request)
        self._record_error(exc)
        for handler in self.fallbacks:
            retry = handler(exc, request)
            if retry is None:
                continue
            self._count("fallbacks")
            try:
                return retry(fill)
            except Cancelled:
                self._count("cancelled")
                raise
            except Exception as again:
                if not is_device_fault(again):
                    self._record_error(again)
                    raise
                exc = again
                self._record_error(again)
        raise exc

    def _fallback_smaller_span(self, exc: BaseException, request: FimRequest):
        """Free cached GPU memory and retry with half the span (the answer is not cached)."""
        if request.span.max_tokens <= 16:
            return None
        self._release_device_memory()
        smaller = replace(request, span=replace(request.span, max_tokens=request.span.max_tokens // 2))
        return lambda fill: replace(fill(self.backend, smaller), shortened=True)

    def _fallback_cpu(self, exc: BaseException, request: FimRequest):
        """Move the model to the CPU for good: slower, but the editor keeps getting answers."""
        moved_to = getattr(self.backend, "moved_to", None)
        if moved_to is None or getattr(self.backend.device, "type", "cpu") == "cpu":
            return None
        self._release_device_memory()

        def retry(fill):
            self.backend = moved_to("cpu")
            return fill(self.backend, request)

        return retry

    def _release_device_memory(self) -> None:
        # The backend's own method takes its cache lock: other threads may be filling.
        release = getattr(self.backend, "release_device_memory", None)
        if release is not None:
            release()
            return
        clear = getattr(getattr(self.backend, "context_cache", None), "clear", None)
        if clear:
            clear()  # a backend that does not batch: the engine's lock is held, nobody else is in it
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def set_threads(self, threads: int) -> None:
        """The `threads` setting (0 = automatic) for a backend that runs on CPU threads."""
        apply = getattr(self.backend, "set_cpu_threads", None)
        if apply is not None:
            apply(threads)

    # --- bookkeeping ------------------------------------------------------------
    def _count(self, name: str) -> None:
        with self._state_lock:
            self._counts[name] += 1

    def _record_error(self, exc: BaseException) -> None:
        with self._state_lock:
            self._counts["errors"] += 1
            self.last_error = f"{type(exc).__name__}: {exc}"

    def forget(self, document: str) -> None:
        """The document closed: drop its typed-ahead state and its context K/V."""
        with self._state_lock:
            self._last.pop(document, None)
        with self._backend_lock:
            self.backend.forget(document)

    def cache_stats(self) -> dict[str, dict[str, int]]:
        """Entries, bytes held and the byte bound of every cache: the engine's and its backend's."""
        backend_caches = getattr(self.backend, "cache_stats", None)
        with self._state_lock:
            self._completions.expire()
            caches = {
                "completion_cache": {"entries": len(self._completions), "bytes": int(self._completions.currsize),
                                     "max_bytes": int(self._completions.maxsize)},
                "typed_ahead": {"entries": len(self._last), "bytes": int(self._last.currsize),
                                "max_bytes": int(self._last.maxsize)},
            }
        return {**caches, **(backend_caches() if backend_caches else {})}

    def status(self) -> dict:
        batching = getattr(self.backend, "batching_stats", None)
        caches = self.cache_stats()
        with self._state_lock:
            counts = dict(self._counts)
            answered = counts["model"] + counts["completion_cache"] + counts["typed_ahead"]
            context = self._context_tokens

            def rate(n: int, of: int) -> float:
                return round(n / of, 4) if of else 0.0

            return {
                "model": self.backend.name,
                "device": str(self.backend.device),
                "parameters": self.backend.parameters,
                "requests": counts["requests"],
                "answered": {k: counts[k] for k in ("model", "completion_cache", "typed_ahead")},
                "latency_ms": percentiles(self._latency_ms),
                "model_latency_ms": percentiles(self._model_latency_ms),
                "hit_rates": {
                    "typed_ahead": rate(counts["typed_ahead"], answered),
                    "completion_cache": rate(counts["completion_cache"], answered),
                    "context_kv_reuse": rate(self._reused_context_tokens, context),
                },
                "cancelled": counts["cancelled"],
                "errors": counts["errors"],
                "fallbacks": counts["fallbacks"],
                "budget_cuts": counts["budget_cuts"],
                "threads": getattr(self.backend, "cpu_threads", None),
                "compiled_steps": self.backend.compiled_steps() if hasattr(self.backend, "compiled_steps") else None,
                # The sums behind context_kv_reuse, so a client can tell what one request reused.
                "context_tokens": {"total": context, "reused": self._reused_context_tokens},
                "steps_per_request": round(self._model_steps / counts["model"], 3) if counts["model"] else None,
                "drafts": dict(self._drafts),
                "last_error": self.last_error,
                "caches": caches,
                **({"batching": batching()} if batching else {}),
            }
