"""The native span denoiser as a `Backend`: prompt layout, context cache, sampler.

`native_context_ids` tokenizes a request into the layout of
`denoiser/context_layout.py`, the one training lays out its examples with.
This module turns a `FimRequest` into tokens, keeps each document's context K/V (`ContextKVCache`), runs the sampler and decodes the
span. It does not cache completions, time requests or handle faults (the
engine does).
"""
from __future__ import annotations

import logging
import math
import os
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

import torch

from denoiser.backend import Cancelled, DecodeSettings, FillResult, resolve_device, setting_choice
from denoiser.batching import DEFAULT_MAX_BATCH, SpanBatcher
from denoiser.checkpoint import load_native_model
from denoiser.context_layout import context_ids
from denoiser.cpu_compile import resolve_cpu_compile
from denoiser.drafts import DraftCalibration, check_draft
from denoiser.kv_cache import ContextKVCache
from denoiser.model import cpu_has_native_bf16
from fim.request import FimRequest

log = logging.getLogger(__name__)

SPAN_BUCKETS = (16, 32, 64, 128)
# A span that ends full of content may grow once; never past this many tokens.
MAX_TOTAL_SPAN_TOKENS = 256
# What the per-document context K/V may hold (`ContextKVCache`, least recently used first out).
CONTEXT_CACHE_BYTES = 64 << 20


def span_bucket(max_tokens: int) -> int:
    """Span length L for a request: max_tokens rounded up to a bucket (few shapes, graph friendly)."""
    for bucket in SPAN_BUCKETS:
        if max_tokens <= bucket:
            return bucket
    return SPAN_BUCKETS[-1]


def native_context_ids(tokenizer, request: FimRequest, max_context_tokens: int) -> list[int]:
    """`<fim_suffix> suffix <fim_prefix> preamble prefix <fim_middle>` as token ids.

    Each piece is encoded on its own and the ids concatenated, never the joined
    text, so the cursor is always a token boundary. The budget is shared out by
    `denoiser.context_layout.context_ids`, the very function that lays out
    training examples: the suffix keeps its START (at most a quarter), the
    preamble its start, the prefix its END (the text at the cursor).
    """
    if max_context_tokens < 4:
        raise ValueError(f"max_context_tokens {max_context_tokens} leaves no room for text")
    return context_ids(
        tokenizer.encode(request.preamble),
        tokenizer.encode(request.prefix),
        tokenizer.encode(request.suffix),
        max_context_tokens,
    )


def cpu_threads_for(cores: int, busy: int = 0) -> int:
    """torch threads for a completion on a machine with `cores` cores while `busy` other
    tasks run: half the cores, at most 8, and never more than the cores the others leave.

    A completion's step is small, so threads beyond a few barely help it, while an
    OpenMP team that needs more cores than are free collapses: at every barrier its
    threads wait for one the OS has given to another job (on 2 cores beside a numeric
    job, `parafill complete` took a median 4.3 s at 2 threads and 105-139 ms at 1).
    Half the cores leaves the server's event loop a core of its own.
    """
    return max(1, min(cores // 2, 8, cores - busy))


def busy_tasks() -> int:
    """Tasks other than the caller running on the machine now.

    Linux: /proc/loadavg's count of runnable tasks, an instant rather than an
    average (a job that started a second ago counts), less the calling thread.
    Elsewhere: the 1-minute load average, which lags and counts parafill's own
    recent work; 0 where there is neither. Costs a file read (~10 µs).
    """
    try:
        with open("/proc/loadavg", "rb") as f:
            return max(0, int(f.read().split()[3].split(b"/")[0]) - 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0


def resolve_cpu_threads(threads: int = 0) -> int:
    """torch's CPU threads for a `threads` setting: itself, or for 0 the user's
    OMP_NUM_THREADS when set, else `cpu_threads_for` this machine as loaded now."""
    if threads > 0:
        return threads
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return cpu_threads_for(os.cpu_count() or 1, busy_tasks())


def limit_interop_threads() -> None:
    """One inter-op thread: parafill never runs torch ops side by side (no torch.jit.fork),
    so a pool of `cores` idle inter-op threads only adds threads. torch accepts this only
    before its first inter-op work; a process that has done some keeps its pool."""
    try:
        if torch.get_num_interop_threads() != 1:
            torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def configure_cpu_threads(threads: int = 0) -> int:
    """Set torch's CPU threads for the calling thread and threads started later
    (`resolve_cpu_threads`); returns the count."""
    limit_interop_threads()
    count = resolve_cpu_threads(threads)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def needs_more_span(text: str, mode: str) -> bool:
    """A span that filled up with no <eos>: grow it for a block, or for a line still open."""
    return mode == "block" or "\n" not in text


CPU_PRECISIONS = ("auto", "bf16", "fp32", "reference")


def resolve_cpu_precision(precision: str | None = None) -> str:
    """How span steps run on a CPU: `precision`, else PARAFILL_CPU_PRECISION, else "auto".

    "fp32": `CpuInference` in fp32, the reference's results up to rounding; "bf16": its
    linear layers in bf16 (as the model was trained, under bf16 autocast) and the output
    head screened in bf16 and rescored exactly; "auto": bf16 where the CPU multiplies bf16
    natively (`cpu_has_native_bf16`), fp32 elsewhere; "reference": the kernels' torch
    references op by op (slowest; for comparison).
    """
    value = setting_choice(precision, "PARAFILL_CPU_PRECISION", CPU_PRECISIONS, "CPU precision")
    if value == "auto":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return value


def cuda_graphs_wanted(device: torch.device) -> bool:
    """CUDA graphs for the step: on CUDA unless PARAFILL_CUDA_GRAPHS=0."""
    return device.type == "cuda" and os.environ.get("PARAFILL_CUDA_GRAPHS", "1").strip() not in ("0", "false", "no")


class NativeBackend:
    """A native parafill model directory, on one device, with a per-document context cache."""

    # The engine may call fill from several threads at once (dynamic batching).
    concurrent_fill = True

    def __init__(
        self,
        model_dir: str | Path,
        device: str | torch.device = "auto",
        *,
        dtype: torch.dtype | None = None,
        max_documents: int = 8,
        context_cache_bytes: int = CONTEXT_CACHE_BYTES,
        max_total_span_tokens: int = MAX_TOTAL_SPAN_TOKENS,
        max_context_tokens: int | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        cuda_graphs: bool | None = None,
        cpu_precision: str | None = None,
        cpu_compile: str | None = None,
        progress: Callable[[str, int], None] | None = None,
    ):
        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        # torch keeps its thread count per thread: each fill sets it on its own (`_use_threads`),
        # and with the `threads` setting at 0 (automatic) chooses it for the load at that moment.
        self.threads_setting = 0
        self.cpu_threads = configure_cpu_threads()
        # bf16 halves the bytes each step reads on a GPU; CPUs stay in fp32 (exact, and fast enough).
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        if progress:
            progress(f"loading {self.model_dir.name} on {self.device}", 20)
        self.model, self.tokenizer, self.config = load_native_model(self.model_dir, self.device, self.dtype)
        # Prefill and span steps on a CPU (fp32 weights) run on `CpuInference`, the steps in the precision
        # chosen here (None: a GPU, or the reference ops). Prefill and the context cache stay fp32 in every one.
        # Those span steps also compile in the background where a C++ compiler is found (cpu_compile.py).
        self.cpu_precision = None
        self.cpu_compiled = False
        if self.device.type == "cpu" and self.dtype == torch.float32:
            self.cpu_precision = resolve_cpu_precision(cpu_precision)
            if self.cpu_precision != "reference":
                matmul = torch.bfloat16 if self.cpu_precision == "bf16" else torch.float32
                self.cpu_compiled = resolve_cpu_compile(cpu_compile)
                self.model.prepare_cpu_inference(matmul, screen_head=self.cpu_precision == "bf16",
                                                 compiled=self.cpu_compiled)
        self.name = self.model_dir.name
        self.parameters = sum(p.numel() for p in self.model.parameters())
        # How far a draft from the user's code can be trusted with this model (None: the plain check).
        self.draft_calibration = DraftCalibration.load(self.model_dir)
        self.max_total_span_tokens = max_total_span_tokens
        # Context and the longest span (grown once) must both fit the model's positions.
        room = min(self.config.max_positions - max_total_span_tokens, self.config.context_tokens)
        self.max_context_tokens = min(max_context_tokens or room, room)
        self.context_cache = ContextKVCache(self.model, max_documents=max_documents, max_bytes=context_cache_bytes,
                                           device=self.device, dtype=self.dtype)
        self._cache_lock = threading.Lock()  # the context cache's entries and their prefill
        self._documents_lock = threading.Lock()
        self._document_locks: dict[str, list] = {}  # document -> [lock, holders]
        self.batcher = self._make_batcher(max_batch, cuda_graphs_wanted(self.device) if cuda_graphs is None else cuda_graphs)

    def _make_batcher(self, max_batch: int, cuda_graphs: bool) -> SpanBatcher:
        # Tokens the tokenizer cannot decode (the config may pad the vocabulary) are never written.
        options = dict(device=self.device, dtype=self.dtype, vocab_limit=self.tokenizer.vocab_size, max_batch=max_batch)
        if cuda_graphs:
            if self.device.type != "cuda":
                raise ValueError("cuda_graphs=True needs a CUDA device")
            from denoiser.step_graph import GraphStep

            # Graphs read fixed addresses: one context K/V tensor per span bucket, never reallocated.
            capacity = min(self.config.max_positions, self.max_context_tokens + self.max_total_span_tokens)
            # Capture must not overlap another thread's prefill (a cudaMalloc mid-capture
            # breaks it): it holds the cache lock, which every prefill takes.
            step = GraphStep(max_batch=max_batch, capture_lock=self._cache_lock)
            return SpanBatcher(self.model, step_runner=step, fixed_capacity=capacity, **options)
        return SpanBatcher(self.model, **options)

    @contextmanager
    def _document_turn(self, document: str):
        """Requests for one document take turns: its cached K/V changes between them."""
        with self._documents_lock:
            entry = self._document_locks.setdefault(document, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._documents_lock:
                entry[1] -= 1
                if entry[1] == 0:
                    self._document_locks.pop(document, None)

    def set_cpu_threads(self, threads: int = 0) -> int:
        """The `threads` setting (0 = automatic): every fill from now on runs with it."""
        self.threads_setting = threads
        self.cpu_threads = configure_cpu_threads(threads)
        return self.cpu_threads

    def take_turns(self, on: bool = True) -> None:
        """Prefill, draft checks and span steps run one at a time (on) or overlap (off, the default).

        A language server lets a new document's prefill run beside the batch's steps: two
        threads, more cores. A replica held to one CPU's reservation must not: there, the
        overlap only steals another replica's core. A CUDA device runs them on one stream
        anyway (and its graph capture takes the cache lock inside a step): CPU only.
        """
        if on and self.device.type != "cpu":
            raise ValueError(f"take_turns is for a CPU device, not {self.device}")
        self.batcher.compute = threading.Lock() if on else nullcontext()

    def _use_threads(self) -> None:
        # Automatic: chosen again for every fill, so a job that starts beside the editor
        # costs the next completion threads, not a collapse (`cpu_threads_for`).
        count = resolve_cpu_threads(self.threads_setting)
        self.cpu_threads = count
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)

    def compiled_steps(self) -> dict | None:
        """What of the CPU span steps runs compiled: the body as "rows@threads" (any span length),
        the output head's thread counts, and why compiling stopped if it failed; None where steps
        are not compiled (cpu_compile.py)."""
        cpu = self.model.cpu_inference
        compiled = cpu.compiled if cpu is not None else None
        if compiled is None:
            return None
        jobs = sorted(compiled.ready)
        return {"shapes": [f"{job[1]}@{job[2]}" for job in jobs if job[0] == "hidden"],
                "head": [job[1] for job in jobs if job[0] == "head"], "failed": compiled.disabled}

    def moved_to(self, device: str | torch.device) -> "NativeBackend":
        """The same model directory on another device (the engine's fallback after a CUDA fault)."""
        moved = NativeBackend(
            self.model_dir,
            device,
            max_documents=self.context_cache.max_documents,
            context_cache_bytes=self.context_cache.max_bytes,
            max_total_span_tokens=self.max_total_span_tokens,
            max_context_tokens=self.max_context_tokens,
            max_batch=self.batcher.max_batch,
            cpu_precision=self.cpu_precision,
            cpu_compile=None if self.cpu_compiled else "off",
        )
        moved.set_cpu_threads(self.threads_setting)
        return moved

    def context_ids(self, request: FimRequest) -> list[int]:
        return native_context_ids(self.tokenizer, request, self.max_context_tokens)

    def fill(
        self,
        request: FimRequest,
        decode: DecodeSettings,
        *,
        document: str = "",
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> FillResult:
        self._use_threads()
        ids = self.context_ids(request)
        span_len = span_bucket(request.span.max_tokens)
        with self._document_turn(document):
            # Waiting for the turn can outlast the request (typing on, or the document closed
            # and forgotten meanwhile: a prefill now would bring its entry back).
            if is_cancelled():
                raise Cancelled("cancelled while waiting for this document's turn")
            check = None
            with self._cache_lock, self.batcher.compute:
                slot = self.context_cache.prepare(document, ids)
                if request.draft:
                    # Under the lock: no prefill (or graph capture) overlaps the scoring pass.
                    check = check_draft(self.model, slot.kv, slot.length, span_len,
                                        self.tokenizer.encode(request.draft),
                                        banned_ids=self.batcher.banned, vocab_limit=self.tokenizer.vocab_size,
                                        calibration=self.draft_calibration, evidence=request.draft_evidence)
            # Another document's prefill may evict this entry meanwhile; the batch keeps its K/V alive.
            result = self.batcher.denoise(slot.kv, slot.length, span_len, decode, is_cancelled,
                                          start=check.start if check else None)
            # A draft rejected outright cost its scoring pass and nothing else.
            middle, steps = list(result.tokens), result.steps + (check is not None and check.start is None)
            log_confidence, scored = result.log_confidence, result.scored
            budget_cut = result.cut
            grow = (not result.ended and not result.cut and span_len * 2 <= self.max_total_span_tokens
                    and needs_more_span(self.tokenizer.decode(middle), request.span.mode))
            if grow and decode.past_deadline():
                grow, budget_cut = False, True  # the latency budget is spent: the span stands as it is
            if grow:
                # Simplest exact way to write on: the committed span becomes context
                # (the model also learnt middle tokens causally), then a fresh span follows.
                with self._cache_lock, self.batcher.compute:
                    if document in self.context_cache:
                        grown = self.context_cache.extend(document, middle)
                    else:  # evicted by other documents meanwhile: rebuild it (exact, just slower)
                        grown = self.context_cache.prepare(document, ids + middle)
                more = self.batcher.denoise(grown.kv, grown.length, span_len, decode, is_cancelled)
                middle += more.tokens
                steps += more.steps
                log_confidence, scored = log_confidence + more.log_confidence, scored + more.scored
                budget_cut = more.cut
        return FillResult(
            text=self.tokenizer.decode(middle),
            tokens=len(middle),
            steps=steps,
            context_tokens=len(ids),
            reused_context_tokens=slot.reused,
            confidence=math.exp(log_confidence / scored) if scored else None,
            draft=check.outcome if check else None,
            budget_cut=budget_cut,
        )

    def draft_features(self, request: FimRequest, document: str = "") -> dict[str, float] | None:
        """What `DraftCalibration` rates for the request's draft (None: no draft), without decoding."""
        if not request.draft:
            return None
        self._use_threads()
        ids = self.context_ids(request)
        draft_ids = self.tokenizer.encode(request.draft)
        with self._document_turn(document), self._cache_lock, self.batcher.compute:
            slot = self.context_cache.prepare(document, ids)
            check = check_draft(self.model, slot.kv, slot.length, span_bucket(request.span.max_tokens), draft_ids,
                                banned_ids=self.batcher.banned, vocab_limit=self.tokenizer.vocab_size)
        return DraftCalibration.features(check, request.draft_evidence, len(draft_ids))

    def forget(self, document: str) -> None:
        with self._document_turn(document), self._cache_lock:
            self.context_cache.forget(document)

    def release_device_memory(self) -> None:
        """After a device fault: drop cached contexts and return freed blocks to the driver,
        under the cache lock (no prefill, and no graph capture, runs meanwhile)."""
        with self._cache_lock:
            self.context_cache.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def batching_stats(self) -> dict:
        return self.batcher.stats()

    def cache_stats(self) -> dict[str, dict[str, int]]:
        """Entries, bytes and byte bound of the context K/V cache and of the batch's pooled rows.
        Read without the cache lock (a prefill, or a graph capture, may hold it for long): figures."""
        cache = self.context_cache
        context = {"entries": len(cache), "bytes": cache.bytes, "max_bytes": cache.max_bytes}
        return {"context_kv": context, "batch_rows": self.batcher.pool_stats()}
