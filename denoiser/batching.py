"""Dynamic batching of span denoising: concurrent requests share denoising steps.

Requests (several documents, several editors) call `SpanBatcher.denoise` from
their own threads. The first becomes the driver: it runs denoising steps for
every request in the batch while the others wait; requests arriving while a
step runs join at the next one; each request leaves as soon as its span is
done, and a cancelled one leaves at the next step. When the driver's own span
is done it hands the wheel to a waiting request, so nobody waits for a slower
neighbour's span. A request whose latency budget (`DecodeSettings.deadline`)
runs out leaves after the step in which it did, with the tokens decoded before
its first still-masked position.

Requests whose spans share a length bucket share a forward pass: their
contexts are copied once, on joining, into rows of one K/V tensor per bucket
(`ContextRows`), and the span attention reads each row up to its own ctx_len.
Different buckets run as separate forwards in the same step (never padded
into each other: a padded span key would change the others' attention).
A request alone runs on its own cached K/V with no copy, exactly as before.

The step's decisions (`apply_commits`, `span_status`) are tensor operations
with no host sync, identical in rule to `denoiser.sampler` (which stays the
single-request reference), so `denoiser.step_graph` can capture them in a
CUDA graph. This module does not tokenize, build prompts or cache contexts.
"""
from __future__ import annotations

import threading
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import Tensor

from denoiser.backend import Cancelled, DecodeSettings
from denoiser.config import EOS_ID, MASK_ID, PAD_ID
from denoiser.model import KVBuffers
from denoiser.sampler import (NEVER_WRITTEN, SpanResult, SpanStart, budget_cut_result, result_if_finished,
                              scored_confidence)

# Pooled context rows grow in steps of this many positions: few reallocations, and a
# batch of the few hundred tokens the server sends holds no rows sized for thousands.
CAPACITY_STEP = 256
DEFAULT_MAX_BATCH = 16
# Pooled rows left with no request are kept for the next batch while all pools together
# stay under this many bytes, and freed otherwise (a batch of 16 long contexts once must
# not hold its rows for the rest of the day).
POOL_BYTES = 32 << 20


# --- the step's decisions, on device ------------------------------------------------
@dataclass
class StepState:
    """Per-row state of a batch of spans: span/masked [B, L]; steps, live, threshold, max_steps [B].

    ctx_len: int (one context for all rows) or int tensor [B].
    live: rows still being denoised (a finished row in a CUDA graph stays put).
    committed: [B, L] fp32, the probability each position had when it was
    committed (None: not tracked).
    """

    span: Tensor
    masked: Tensor
    steps: Tensor
    live: Tensor
    threshold: Tensor
    max_steps: Tensor
    ctx_len: int | Tensor
    committed: Tensor | None = None


def apply_commits(tokens: Tensor, confidence: Tensor, state: StepState) -> None:
    """Commit this step's positions in place, the rule of `denoiser.sampler` for every row.

    A live row commits every masked position whose confidence passes its
    threshold, and at least its `commit_count` most confident ones (stable
    ordering: ties go to the lowest position); masked positions after its first
    committed end token become committed <pad>.
    """
    span, masked = state.span, state.masked
    length = span.shape[1]
    open_ = masked & state.live[:, None]
    remaining = open_.sum(1)
    steps_left = (state.max_steps - state.steps).clamp(min=1)
    spread = torch.div(remaining + steps_left - 1, steps_left, rounding_mode="floor")
    at_least = torch.where(state.max_steps > 0, spread, torch.ones_like(spread)).clamp(min=1)
    scores = torch.where(open_, confidence, torch.full_like(confidence, -1.0))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    positions = torch.arange(length, device=span.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    commit = open_ & ((confidence >= state.threshold[:, None]) | (rank < at_least[:, None]))
    span.copy_(torch.where(commit, tokens, span))
    if state.committed is not None:
        state.committed.copy_(torch.where(commit, confidence, state.committed))
    masked.logical_and_(~commit)
    # Past the first committed end token nothing reaches the text: <pad>, committed.
    _, first = first_end(span, masked)
    after = (positions[:1] > first[:, None]) & masked & state.live[:, None]
    span.masked_fill_(after, PAD_ID)
    masked.logical_and_(~after)
    state.steps.add_(state.live.to(state.steps.dtype))


def first_end(span: Tensor, masked: Tensor) -> tuple[Tensor, Tensor]:
    """(has_end, first) per row: a committed <eos>/<pad> exists, and the index of the first (L if none)."""
    is_end = ~masked & ((span == EOS_ID) | (span == PAD_ID))
    has_end = is_end.any(1)
    first = torch.where(has_end, is_end.to(torch.int32).argmax(1),
                        torch.full_like(has_end, span.shape[1], dtype=torch.long))
    return has_end, first


def span_status(span: Tensor, masked: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(done, ended, first_end) per row, the rule of `denoiser.sampler.finished_at`.

    ended: a committed end token with every position before it committed;
    done: ended, or nothing left masked; first_end: index of the first
    committed end token (L when none).
    """
    has_end, first = first_end(span, masked)
    before = torch.arange(span.shape[1], device=span.device)[None, :] < first[:, None]
    ended = has_end & ~(masked & before).any(1)
    return ended | ~masked.any(1), ended, first


class StepRunner(Protocol):
    """Runs one step of a batch in place; returns span_status's (done, ended, first_end)."""

    pooled_when_alone: bool

    def __call__(self, model, state: StepState, kv: KVBuffers, rows: int,
                 banned: Tensor, vocab_limit: int | None) -> tuple[Tensor, Tensor, Tensor]: ...


class EagerStep:
    """The step as plain op-by-op calls (CPU, or CUDA without graphs)."""

    pooled_when_alone = False

    def __call__(self, model, state, kv, rows, banned, vocab_limit):
        view = kv if kv.k.shape[1] == rows else KVBuffers(kv.k[:, :rows], kv.v[:, :rows])
        # On the CPU the LM head runs only where a token is still wanted (exact: the
        # commit rule reads nothing else); on CUDA the gather's host sync costs more.
        only = state.masked & state.live[:, None] if state.span.device.type == "cpu" else None
        tokens, confidence = model.span_tokens(state.span, view, state.ctx_len, banned_ids=banned,
                                               vocab_limit=vocab_limit, only=only)
        apply_commits(tokens, confidence, state)
        return span_status(state.span, state.masked)


# --- requests and the rows that hold their contexts ---------------------------------
@dataclass(eq=False)
class SpanJob:
    """One request's span: its context, settings, step state, and its answer once done."""

    kv: KVBuffers
    ctx_len: int
    span_len: int
    decode: DecodeSettings
    is_cancelled: Callable[[], bool]
    state: StepState
    row: int | None = None  # its row in the bucket's ContextRows, once batched
    result: SpanResult | None = None
    error: BaseException | None = None
    done: bool = False


class ContextRows:
    """Rows 0..n-1 of one K/V tensor, each holding one batched request's context.

    Rows stay contiguous (a leaving request's row is refilled from the last
    one), so a batch of n reads the view [:, :n]. `fixed_capacity` keeps the
    tensor's address for ever (CUDA graphs); otherwise it grows on demand.
    """

    def __init__(self, config, device, dtype, *, rows: int = 0, fixed_capacity: int | None = None,
                 max_rows: int | None = None):
        self.config, self.device, self.dtype = config, device, dtype
        self.max_rows = max_rows
        self.fixed = fixed_capacity is not None
        self.kv = KVBuffers.allocate(config, rows, fixed_capacity or 0, device, dtype)
        self.jobs: list[SpanJob] = []

    @property
    def rows(self) -> int:
        return self.kv.k.shape[1]

    @property
    def nbytes(self) -> int:
        return 2 * self.kv.k.numel() * self.kv.k.element_size()

    def _grow(self, rows: int, capacity: int) -> None:
        if self.fixed:
            raise RuntimeError(f"context rows are fixed at {self.rows} x {self.kv.capacity} positions; "
                               f"{rows} x {capacity} needed")
        grown = KVBuffers.allocate(self.config, rows, capacity, self.device, self.dtype)
        used = len(self.jobs)
        if used:
            have = self.kv.capacity
            grown.k[:, :used, :, :have] = self.kv.k[:, :used]
            grown.v[:, :used, :, :have] = self.kv.v[:, :used]
        self.kv = grown

    def admit(self, job: SpanJob) -> None:
        row = len(self.jobs)
        if row >= self.rows or job.ctx_len > self.kv.capacity:
            limit = self.config.max_positions
            capacity = max(self.kv.capacity, min(limit, -(-max(job.ctx_len, 1) // CAPACITY_STEP) * CAPACITY_STEP))
            rows = self.rows
            if row >= rows:  # rows double (up to max_rows): each growth copies every row so far
                rows = max(row + 1, min(2 * rows, self.max_rows or 0))
            self._grow(rows, capacity)
        n = job.ctx_len
        self.kv.k[:, row, :, :n] = job.kv.k[:, 0, :, :n]
        self.kv.v[:, row, :, :n] = job.kv.v[:, 0, :, :n]
        job.row = row
        self.jobs.append(job)

    def release(self, job: SpanJob) -> None:
        row, last = job.row, self.jobs[-1]
        if last is not job:
            n = last.ctx_len
            self.kv.k[:, row, :, :n] = self.kv.k[:, last.row, :, :n]
            self.kv.v[:, row, :, :n] = self.kv.v[:, last.row, :, :n]
            last.row = row
            self.jobs[row] = last
        self.jobs.pop()
        job.row = None


@dataclass
class BatchCounters:
    requests: int = 0
    steps: int = 0  # driver iterations (one per step, all buckets together)
    shared_steps: int = 0  # steps that served two requests or more
    request_steps: int = 0  # sum over steps of the requests they served
    forwards: int = 0  # span forward passes (one per bucket per step)
    max_batch: int = 0
    cancelled: int = 0
    budget_cuts: int = 0  # spans stopped by their latency budget
    per_batch_size: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        mean = self.request_steps / self.steps if self.steps else 0.0
        return {"requests": self.requests, "steps": self.steps, "shared_steps": self.shared_steps,
                "request_steps": self.request_steps, "forwards": self.forwards, "max_batch": self.max_batch,
                "mean_batch": round(mean, 3), "cancelled": self.cancelled, "budget_cuts": self.budget_cuts,
                "steps_by_batch_size": dict(sorted(self.per_batch_size.items()))}


def shared_failure(exc: BaseException) -> Exception:
    """The error a request gets when a step it shared with others failed."""
    error = RuntimeError(f"a shared denoising step failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


# --- the batcher -----------------------------------------------------------------------
class SpanBatcher:
    """Denoises spans for any number of threads at once, sharing steps between them."""

    def __init__(self, model, *, device, dtype, vocab_limit: int | None = None,
                 max_batch: int = DEFAULT_MAX_BATCH, step_runner: StepRunner | None = None,
                 fixed_capacity: int | None = None, pool_bytes: int = POOL_BYTES):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.device = torch.device(device)
        self.dtype = dtype
        self.vocab_limit = vocab_limit
        self.max_batch = max_batch
        self.step_runner: StepRunner = step_runner or EagerStep()
        self.fixed_capacity = fixed_capacity
        self.pool_bytes = pool_bytes
        self.banned = torch.tensor(NEVER_WRITTEN, dtype=torch.long, device=self.device)
        self.counters = BatchCounters()
        # The driver counts while it runs steps without `_cond`; `stats` reads under this.
        self._counting = threading.Lock()
        self._cond = threading.Condition()
        self._pending: list[SpanJob] = []
        self._active: list[SpanJob] = []
        self._driving = False
        self._rows: dict[int, ContextRows] = {}
        # Held around every step; the backend's prefill and draft checks take it too when they
        # must take turns with the steps (`NativeBackend.take_turns`). By default nobody waits.
        self.compute: AbstractContextManager = nullcontext()

    @property
    def pending(self) -> int:
        """Requests waiting to join the batch (read without the lock: a hint, for tests and stats)."""
        return len(self._pending)

    def stats(self) -> dict:
        with self._counting:
            return self.counters.as_dict()

    def pool_stats(self) -> dict[str, int]:
        """Span buckets with pooled rows, the bytes they hold, and the bytes kept between batches."""
        pools = list(self._rows.values())  # read without the lock: a figure for status
        return {"entries": len(pools), "bytes": sum(p.nbytes for p in pools), "max_bytes": self.pool_bytes}

    def _trim_pools(self) -> None:
        """Free pools no request uses while all pools together hold more than `pool_bytes`
        (driver only). CUDA-graph pools are never freed: their graphs read fixed addresses."""
        held = sum(p.nbytes for p in self._rows.values())
        for span_len, pool in list(self._rows.items()):
            if held <= self.pool_bytes:
                return
            if not pool.jobs and not pool.fixed:
                held -= pool.nbytes
                del self._rows[span_len]

    def denoise(self, kv: KVBuffers, ctx_len: int, span_len: int, decode: DecodeSettings,
                is_cancelled: Callable[[], bool] = lambda: False, *,
                start: SpanStart | None = None) -> SpanResult:
        """Fill span_len masks after ctx_len context tokens of kv (batch row 0); blocks until done.

        `start`: the span partly decided already (a checked draft); a start with
        nothing left to decide returns at once, without a step.
        Raises `Cancelled` if is_cancelled() turns true before the span is done.
        """
        job = self._new_job(kv, ctx_len, span_len, decode, is_cancelled, start)
        if start is not None:
            done = result_if_finished(job.state.span[0], job.state.masked[0], job.state.committed[0], start.steps)
            if done is not None:
                return done
        with self._cond:
            with self._counting:
                self.counters.requests += 1
            self._pending.append(job)
            while not job.done:
                if self._driving:
                    self._cond.wait()
                    continue
                self._driving = True
                try:
                    self._drive(job)
                finally:
                    self._driving = False
                    self._cond.notify_all()
        if job.error is not None:
            # Raised from this frame, the error's traceback holds `job`: unlinked, they make no
            # cycle, and a cancelled request's tensors go when its error does.
            error, job.error = job.error, None
            try:
                raise error
            finally:
                error = None
        return job.result

    def _new_job(self, kv, ctx_len, span_len, decode, is_cancelled, start: SpanStart | None = None) -> SpanJob:
        if span_len < 1:
            raise ValueError(f"span_len must be >= 1, got {span_len}")
        if ctx_len > kv.capacity:
            raise ValueError(f"ctx_len {ctx_len} exceeds the cache capacity {kv.capacity}")
        dev = self.device
        if start is None:
            span = torch.full((1, span_len), MASK_ID, dtype=torch.long, device=dev)
            masked = torch.ones((1, span_len), dtype=torch.bool, device=dev)
            committed = torch.zeros((1, span_len), dtype=torch.float32, device=dev)
        else:
            if len(start.span) != span_len:
                raise ValueError(f"the start holds {len(start.span)} positions, the span {span_len}")
            span, masked, committed = start.tensors(dev)
        state = StepState(
            span=span,
            masked=masked,
            steps=torch.full((1,), start.steps if start else 0, dtype=torch.long, device=dev),
            live=torch.ones(1, dtype=torch.bool, device=dev),
            threshold=torch.full((1,), decode.confidence_threshold, dtype=torch.float32, device=dev),
            max_steps=torch.full((1,), decode.steps, dtype=torch.long, device=dev),
            ctx_len=ctx_len,
            committed=committed,
        )
        return SpanJob(kv, ctx_len, span_len, decode, is_cancelled, state)

    def _drive(self, mine: SpanJob) -> None:
        """Run steps until `mine` is done. Called and returns with the lock held; steps run without it."""
        while not mine.done:
            while self._pending and len(self._active) < self.max_batch:
                self._active.append(self._pending.pop(0))
            batch = list(self._active)
            self._cond.release()
            try:
                with self.compute:
                    finished = self._step(batch)
            finally:
                self._cond.acquire()
            for job in finished:
                job.done = True
                self._active.remove(job)
            self._cond.notify_all()

    def _step(self, batch: list[SpanJob]) -> list[SpanJob]:
        """One step for every request of the batch; returns those that left (done, cancelled, failed)."""
        finished: list[SpanJob] = []
        running: list[SpanJob] = []
        for job in batch:
            try:
                cancelled = job.is_cancelled()
            except Exception as exc:  # a broken callback fails its own request only
                job.error, cancelled = exc, True
            if cancelled:
                if job.error is None:
                    job.error = Cancelled("span denoising cancelled")
                    with self._counting:
                        self.counters.cancelled += 1
                finished.append(job)
            else:
                running.append(job)
        for job in finished:  # before the forwards, so the rows left are 0..n-1
            if job.row is not None:
                self._rows[job.span_len].release(job)
        if running:
            with self._counting:
                counters = self.counters
                counters.steps += 1
                counters.request_steps += len(running)
                counters.shared_steps += len(running) > 1
                counters.max_batch = max(counters.max_batch, len(running))
                sizes = counters.per_batch_size
                sizes[len(running)] = sizes.get(len(running), 0) + 1
        buckets: dict[int, list[SpanJob]] = {}
        for job in running:
            buckets.setdefault(job.span_len, []).append(job)
        for span_len, jobs in buckets.items():
            try:
                finished += self._step_bucket(span_len, jobs)
            except BaseException as exc:
                # One request re-raises the failure itself; the others get their own
                # error that names it (same text, so a device fault still reads as one),
                # so one fault is not raised, logged and recovered N times as the same object.
                for i, job in enumerate(jobs):
                    job.error = exc if i == 0 else shared_failure(exc)
                finished += jobs
        finished += self._cut_past_deadline(running, finished)
        for job in finished:
            if job.row is not None:
                self._rows[job.span_len].release(job)
        if finished:
            self._trim_pools()
        return finished

    def _cut_past_deadline(self, running: list[SpanJob], finished: list[SpanJob]) -> list[SpanJob]:
        """Requests whose latency budget ran out during this step, with what they have so far
        (checked between steps: each request runs at least one)."""
        cut = []
        for job in running:
            if job in finished or not job.decode.past_deadline():
                continue
            state = job.state
            job.result = budget_cut_result(state.span[0], state.masked[0], state.committed[0], int(state.steps[0]))
            cut.append(job)
        if cut:
            with self._counting:
                self.counters.budget_cuts += len(cut)
        return cut

    def _rows_for(self, span_len: int) -> ContextRows:
        rows = self._rows.get(span_len)
        if rows is None:
            config = self.model.config
            if self.fixed_capacity is not None:
                rows = ContextRows(config, self.device, self.dtype, rows=self.max_batch,
                                   fixed_capacity=self.fixed_capacity)
            else:
                rows = ContextRows(config, self.device, self.dtype, max_rows=self.max_batch)
            self._rows[span_len] = rows
        return rows

    def _step_bucket(self, span_len: int, jobs: list[SpanJob]) -> list[SpanJob]:
        with self._counting:
            self.counters.forwards += 1
        runner = self.step_runner
        if len(jobs) == 1 and jobs[0].row is None and not runner.pooled_when_alone:
            # Alone: its own cached K/V and int ctx_len, no copy (the single-request path).
            job = jobs[0]
            done, ended, first = runner(self.model, job.state, job.kv, 1, self.banned, self.vocab_limit)
            return self._harvest(jobs, job.state, done, ended, first)
        pool = self._rows_for(span_len)
        for job in jobs:
            if job.row is None:
                pool.admit(job)
        jobs = sorted(jobs, key=lambda j: j.row)
        n = len(jobs)
        # The rows of a batch are 0..n-1 only when every admitted request runs this step.
        if [j.row for j in jobs] != list(range(n)) or len(pool.jobs) != n:
            raise RuntimeError("batched context rows out of order (a request left without releasing its row)")
        states = [j.state for j in jobs]
        state = StepState(
            span=torch.cat([s.span for s in states]),
            masked=torch.cat([s.masked for s in states]),
            steps=torch.cat([s.steps for s in states]),
            live=torch.cat([s.live for s in states]),
            threshold=torch.cat([s.threshold for s in states]),
            max_steps=torch.cat([s.max_steps for s in states]),
            ctx_len=torch.tensor([j.ctx_len for j in jobs], dtype=torch.int32, device=self.device),
            committed=torch.cat([s.committed for s in states]),
        )
        done, ended, first = runner(self.model, state, pool.kv, n, self.banned, self.vocab_limit)
        for i, job in enumerate(jobs):
            s = job.state
            s.span, s.masked, s.steps = state.span[i:i + 1], state.masked[i:i + 1], state.steps[i:i + 1]
            s.committed = state.committed[i:i + 1]
        return self._harvest(jobs, state, done, ended, first)

    @staticmethod
    def _harvest(jobs: list[SpanJob], state: StepState, done: Tensor, ended: Tensor, first: Tensor) -> list[SpanJob]:
        """The requests whose spans are done, with their results (the step's one host sync)."""
        flags = done.tolist()
        if not any(flags):
            return []
        ended_l, first_l, steps_l = ended.tolist(), first.tolist(), state.steps.tolist()
        out = []
        for i, job in enumerate(jobs):
            if not flags[i]:
                continue
            row = state.span[i]
            tokens = row[: first_l[i]] if ended_l[i] else row
            # The middle's tokens and, if written, the end token are what the suggestion rests on.
            scored = scored_confidence(state.committed[i], first_l[i] + 1 if ended_l[i] else row.numel())
            job.result = SpanResult(tuple(tokens.tolist()), int(steps_l[i]), bool(ended_l[i]), *scored)
            out.append(job)
        return out
