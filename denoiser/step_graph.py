"""The denoising step as a CUDA graph, one per (span bucket, batch-size bucket).

A step over a 16-128-token span is launch-bound on a GPU: a few hundred small
kernels whose launch costs more than their work. Captured once into a CUDA
graph, it replays with one launch. What the graph needs, and this module
provides:
- static addresses: the span state lives in buffers allocated at capture, and
  the context K/V are the fixed-capacity rows of `batching.ContextRows`
  (the batcher is built with `fixed_capacity`), never reallocated;
- shapes fixed per graph: the span length is a bucket already; the batch is
  rounded up to a power of two, spare rows idle (live = False, ctx_len 0);
- no host sync inside: the forward, the argmax/confidence and the commit
  decisions (`batching.apply_commits`, `span_status`) are all device ops, and
  ctx_len is a device tensor read by the kernels. The host reads the done
  flags once per step, after the replay, to let finished requests leave
  (the step loop stops as soon as every position is committed).

Only on CUDA: `GraphStep` refuses other devices, and the CPU runs
`batching.EagerStep`. If a capture fails, it logs why and runs eager from
then on, so a graph problem costs speed, never an answer. This module holds
no policy: which requests run together is the batcher's business.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from denoiser.batching import EagerStep, StepState, apply_commits, span_status
from denoiser.config import MASK_ID
from denoiser.model import KVBuffers

log = logging.getLogger(__name__)

WARMUP_STEPS = 2  # eager runs on a side stream before capture: compiles Triton kernels, settles the allocator


def batch_bucket(rows: int, max_batch: int) -> int:
    """Rows a graph is captured for: the next power of two, at most max_batch (and at least rows)."""
    bucket = 1
    while bucket < rows:
        bucket *= 2
    return max(rows, min(bucket, max_batch))


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    state: StepState  # static inputs/outputs, [rows] / [rows, L]
    done: Tensor
    ended: Tensor
    first: Tensor


class GraphStep:
    """A `batching.StepRunner` that replays a captured CUDA graph per shape."""

    # Even a lone request runs from the static rows (one context copy on joining).
    pooled_when_alone = True

    def __init__(self, *, max_batch: int, capture_lock=None):
        self.max_batch = max_batch
        # Held while capturing: other threads' CUDA work (a prefill) must wait meanwhile.
        self._capture_lock = capture_lock if capture_lock is not None else contextlib.nullcontext()
        self._graphs: dict[tuple, _Captured] = {}
        self._eager = EagerStep()
        self.disabled: str | None = None  # why graphs are off, once a capture failed
        self.captures = 0
        self.replays = 0

    def __call__(self, model, state: StepState, kv: KVBuffers, rows: int, banned: Tensor, vocab_limit):
        if self.disabled is not None:
            return self._eager(model, state, kv, rows, banned, vocab_limit)
        if kv.k.device.type != "cuda":
            raise ValueError("GraphStep runs on CUDA only; the CPU uses batching.EagerStep")
        bucket = batch_bucket(rows, self.max_batch)
        if bucket > kv.k.shape[1]:
            raise RuntimeError(f"{rows} rows need a graph of {bucket}, but the context rows hold {kv.k.shape[1]}")
        key = (state.span.shape[1], bucket, kv.k.data_ptr(), kv.v.data_ptr(), kv.capacity, vocab_limit)
        captured = self._graphs.get(key)
        if captured is None:
            try:
                with self._capture_lock:
                    captured = self._capture(model, state.span.shape[1], bucket, kv, banned, vocab_limit)
            except Exception as exc:  # never lose an answer to a graph problem
                self.disabled = f"{type(exc).__name__}: {exc}"
                log.warning("CUDA graph capture failed, running the step eagerly from now on: %s", self.disabled)
                return self._eager(model, state, kv, rows, banned, vocab_limit)
            self._graphs[key] = captured
        return self._replay(captured, state, rows)

    def _capture(self, model, span_len: int, rows: int, kv: KVBuffers, banned: Tensor, vocab_limit) -> _Captured:
        device = kv.k.device
        static = StepState(
            span=torch.full((rows, span_len), MASK_ID, dtype=torch.long, device=device),
            masked=torch.zeros((rows, span_len), dtype=torch.bool, device=device),
            steps=torch.zeros(rows, dtype=torch.long, device=device),
            live=torch.zeros(rows, dtype=torch.bool, device=device),
            threshold=torch.ones(rows, dtype=torch.float32, device=device),
            max_steps=torch.zeros(rows, dtype=torch.long, device=device),
            ctx_len=torch.zeros(rows, dtype=torch.int32, device=device),
            committed=torch.zeros((rows, span_len), dtype=torch.float32, device=device),
        )
        view = KVBuffers(kv.k[:, :rows], kv.v[:, :rows])

        def step():
            tokens, confidence = model.span_tokens(static.span, view, static.ctx_len, banned_ids=banned,
                                                   vocab_limit=vocab_limit)
            apply_commits(tokens, confidence, static)
            done, ended, first = span_status(static.span, static.masked)
            # A finished row stays put until the host lets it leave.
            static.live.logical_and_(~done)
            return done, ended, first

        # Warm up on a side stream, as torch's CUDA graph notes advise; rows are idle
        # (live False), so the warm-up commits nothing.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads neither join nor break this capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            done, ended, first = step()
        self.captures += 1
        log.info("captured the denoising step: span %d, batch %d, context capacity %d", span_len, rows, kv.capacity)
        return _Captured(graph, static, done, ended, first)

    def _replay(self, captured: _Captured, state: StepState, rows: int):
        static = captured.state
        # Device-to-device copies into the static inputs (no sync); spare rows idle.
        for name in ("span", "masked", "steps", "live", "threshold", "max_steps", "committed"):
            getattr(static, name)[:rows].copy_(getattr(state, name))
        ctx = state.ctx_len
        if isinstance(ctx, Tensor):
            static.ctx_len[:rows].copy_(ctx)
        else:
            static.ctx_len[:rows].fill_(ctx)
        if rows < static.span.shape[0]:
            static.live[rows:].fill_(False)
            static.masked[rows:].fill_(False)
            static.ctx_len[rows:].fill_(0)
        captured.graph.replay()
        self.replays += 1
        for name in ("span", "masked", "steps", "live", "committed"):
            getattr(state, name).copy_(getattr(static, name)[:rows])
        # Outputs of the graph's own memory: cloned before the next replay overwrites them.
        return captured.done[:rows].clone(), captured.ended[:rows].clone(), captured.first[:rows].clone()
