"""Denoise one masked span inside a bidirectional model's prompt.

The prompt is `head + [mask]*L + tail` (head = prefix side, tail = suffix
side). Each step the model predicts every masked position; every position
whose top probability passes the threshold is committed (at least one, more
when a step budget demands it) — Fast-dLLM's parallel unmasking, greedy and
deterministic.

Cache modes:
- "none": every step is an exact full forward pass.
- "dual": Fast-dLLM's dual cache. A full pass records the keys/values of every
  position; the next `refresh_every - 1` steps recompute only the span (plus,
  for shifted families, the token just before it, whose output predicts the
  span's first token) against the cached prefix/suffix keys/values, which are
  therefore stale by at most `refresh_every - 1` steps of span changes.
  `refresh_every=0`: no refresh within a request. The request makes one full
  pass, and a grown span reuses the context's keys/values (the suffix's moved
  to their new positions) instead of starting with another.

Across keystrokes (`carry`, with the dual cache): the previous request's
keys/values for this document (`keystroke_cache.ContextSnapshot`) stand in
for the unchanged part of the context; the first pass computes only the rest
(`keystroke_cache.plan_reuse`), and `keep` is handed the new snapshot as soon
as a block's first pass is done, so a request cancelled afterwards still
leaves its keys/values for the next one.

Only the still-masked positions' logits are computed: the vocabulary
projection is a large share of a span-only pass.

Variable length: an editor never knows the true middle length. The span starts
at `initial` tokens; when it is fully decoded without an end token and may
still grow, `grow_by` fresh masks are appended (before the suffix) and decoding
continues. The result is cut at the first end token (eos / pad / end-of-text).

Drafts: a proposed span (`denoiser.drafts`) is laid in — its tokens, an end
token, end tokens after — and every position is scored while masked, in one
exact pass over two checkerboard rows; the positions whose greedy token is the
draft's stay, the rest are masked again and the usual steps fill them. A draft
rejected outright costs that pass and nothing else.

This module knows nothing of text or tokenizers beyond token ids.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from denoiser.backend import Cancelled
from denoiser.drafts import DraftCheck, Outcome, checkerboard, draft_positions, judge
from denoiser.open_models.keystroke_cache import ContextSnapshot, KeystrokeCachePolicy, ReusePlan, plan_reuse
from denoiser.open_models.network import BidirectionalTransformer, KVStore

CACHE_MODES = ("dual", "none")


@dataclass(frozen=True)
class SpanDecodeSettings:
    initial: int
    maximum: int
    grow_by: int
    threshold: float
    steps: int = 0  # 0 = as many as the span needs; else the most steps per span block
    cache_mode: str = "dual"
    refresh_every: int = 4  # a full pass every this many steps; 0 = only the request's first pass

    def __post_init__(self) -> None:
        if self.cache_mode not in CACHE_MODES:
            raise ValueError(f"cache_mode must be one of {CACHE_MODES}, not {self.cache_mode!r}")
        if not 1 <= self.initial <= self.maximum or self.grow_by < 1 or self.refresh_every < 0:
            raise ValueError("need 1 <= initial <= maximum, grow_by >= 1, refresh_every >= 0")


@dataclass
class SpanDecodeResult:
    tokens: list[int]   # the span, cut before the first end token
    steps: int          # forward passes (a draft's scoring pass counts one)
    full_passes: int    # of which exact full passes
    draft: Outcome | None = None  # how the model judged the draft; None: no draft
    reused_context_tokens: int = 0  # context tokens whose keys/values came from the previous request


class SpanDecoder:
    def __init__(self, model: BidirectionalTransformer, *, mask_id: int, stop_ids: frozenset[int],
                 shift_logits: bool, never_emit: frozenset[int] = frozenset(), end_id: int | None = None) -> None:
        self.model = model
        self.mask_id = mask_id
        self.stop_ids = stop_ids
        self.end_id = min(stop_ids) if end_id is None else end_id  # what ends a laid draft
        self.shift = 1 if shift_logits else 0
        self._banned = torch.tensor(sorted({mask_id} | set(never_emit)), dtype=torch.long, device=model.device)

    def _span_logits(self, seq: torch.Tensor, start: int, length: int, kv: KVStore | None, full: bool,
                     wanted: list[int] | None = None) -> torch.Tensor:
        """Logits predicting the span tokens `wanted` (indices into the span, default all; fp32, banned
        ids at -inf)."""
        # Shifted families predict token i from position i-1 (position 0 predicts itself).
        index = torch.arange(length, device=seq.device) if wanted is None else torch.tensor(wanted, device=seq.device)
        rows = (index + start - self.shift).clamp(min=0)
        if full:
            logits = self.model.full(seq, rows=rows, kv=kv)
        else:
            lo = max(start - self.shift, 0)
            logits = self.model.window(seq[lo:start + length], lo, kv, rows=rows - lo)
        logits[:, self._banned] = float("-inf")
        return logits

    def _reuse_logits(self, seq: torch.Tensor, start: int, wanted: list[int], plan: ReusePlan) -> torch.Tensor:
        """The first pass over reused keys/values: only `plan.fresh` positions are computed."""
        rows = (torch.tensor(wanted, device=seq.device) + start - self.shift).clamp(min=0)
        logits = self.model.recompute(seq[plan.fresh], plan.fresh, plan.kv,
                                      rows=torch.searchsorted(plan.fresh, rows))
        logits[:, self._banned] = float("-inf")
        return logits

    def check_draft(self, head: list[int], tail: list[int], draft: list[int], span_len: int) -> DraftCheck:
        """Score the draft laid into span_len positions while masked, in one pass of two rows."""
        device = self.model.device
        laid = torch.tensor(draft_positions(draft, span_len, end_id=self.end_id, pad_id=self.end_id),
                            dtype=torch.long, device=device)
        proposed = min(len(draft) + 1, span_len)
        rows = checkerboard(laid, proposed, self.mask_id)
        context = torch.tensor(head + tail, dtype=torch.long, device=device).repeat(2, 1)
        seq = torch.cat([context[:, :len(head)], rows, context[:, len(head):]], dim=1)
        start = len(head)
        positions = (torch.arange(start, start + span_len, device=device) - self.shift).clamp(min=0)
        logits = self.model.full(seq, rows=positions)
        logits[..., self._banned] = float("-inf")
        confidence, tokens = torch.softmax(logits, dim=-1).max(dim=-1)
        return judge(laid, proposed, tokens, confidence, mask_id=self.mask_id, end_id=self.end_id)

    def decode(self, head: list[int], tail: list[int], settings: SpanDecodeSettings,
               is_cancelled: Callable[[], bool] = lambda: False, *, draft: list[int] | None = None,
               carry: ContextSnapshot | None = None, policy: KeystrokeCachePolicy | None = None,
               keep: Callable[[ContextSnapshot], None] | None = None) -> SpanDecodeResult:
        """Fill the span between `head` and `tail`.

        `carry`: the previous request's keys/values for this document, reused as `policy` allows
        (dual cache only); `keep(snapshot)`: receives this request's keys/values for the next one."""
        device = self.model.device
        start = len(head)
        span: list[int] = [self.mask_id] * settings.initial
        steps = full_passes = 0
        verdict: Outcome | None = None
        if draft:
            if is_cancelled():
                raise Cancelled()
            # The span is as long as the draft and its end, within the most the request allows.
            length = min(settings.maximum, max(settings.initial, len(draft) + 1))
            check = self.check_draft(head, tail, draft, length)
            verdict = check.outcome
            if check.start is not None:  # rejected outright: the usual span, as if there were no draft
                span = list(check.start.span)
            steps = full_passes = 1
        dual = settings.cache_mode == "dual"
        prepared: ReusePlan | None = None
        if dual and carry is not None and policy is not None:
            prepared = plan_reuse(self.model, carry, head, tail, len(span), shift=self.shift,
                                  suffix=policy.suffix, min_reuse=policy.min_reuse)
        carried = prepared is not None  # the first block's plan comes from the previous request
        reused = age = 0
        spent = steps  # the scoring pass counts against the first block's step budget
        while True:
            seq = torch.tensor(head + span + tail, dtype=torch.long, device=device)
            kv = KVStore() if dual else None
            since_refresh = None  # a block starts with a full pass, or with the prepared reuse
            block_steps, spent = spent, 0
            while True:
                masked = [i for i, t in enumerate(span) if t == self.mask_id]
                if not masked or self._finished(span):
                    break
                if is_cancelled():
                    raise Cancelled()
                if since_refresh is None and prepared is not None:
                    kv, age = prepared.kv, prepared.reuses
                    reused = prepared.reused if carried else reused
                    logits = self._reuse_logits(seq, start, masked, prepared)
                    full = False
                else:
                    full = kv is None or since_refresh is None or (
                        settings.refresh_every > 0 and since_refresh >= settings.refresh_every)
                    logits = self._span_logits(seq, start, len(span), kv, full, masked)
                    age = 0 if full else age
                if keep is not None and kv is not None and (full or since_refresh is None):
                    keep(ContextSnapshot(head=head, tail=tail, span=len(span), kv=kv, reuses=age))
                prepared = None
                steps += 1
                block_steps += 1
                full_passes += int(full)
                since_refresh = 1 if full else (since_refresh or 0) + 1
                confidence, choice = torch.softmax(logits, dim=-1).max(dim=-1)
                order = torch.argsort(confidence, descending=True, stable=True).tolist()
                at_least = 1
                if settings.steps > 0:
                    left = max(settings.steps - block_steps + 1, 1)
                    at_least = math.ceil(len(masked) / left)
                commit = [j for j in order if confidence[j] >= settings.threshold]
                if len(commit) < at_least:
                    commit = order[:at_least]
                for j in commit:
                    pos = masked[j]
                    span[pos] = int(choice[j])
                    seq[start + pos] = span[pos]
            carried = False  # a grown block's plan reuses this request's own keys/values
            if self._has_stop(span) or len(span) >= settings.maximum:
                break
            grown = min(settings.grow_by, settings.maximum - len(span))
            if dual and settings.refresh_every == 0 and kv is not None and kv.keys:
                # One full pass per request: the grown block keeps the context's keys/values.
                current = ContextSnapshot(head=head, tail=tail, span=len(span), kv=kv, reuses=age)
                prepared = plan_reuse(self.model, current, head, tail, len(span) + grown, shift=self.shift, age=age)
            span = span + [self.mask_id] * grown
        cut = next((i for i, t in enumerate(span) if t in self.stop_ids), len(span))
        return SpanDecodeResult(tokens=[t for t in span[:cut] if t != self.mask_id], steps=steps,
                                full_passes=full_passes, draft=verdict, reused_context_tokens=reused)

    def _has_stop(self, span: list[int]) -> bool:
        return any(t in self.stop_ids for t in span)

    def _finished(self, span: list[int]) -> bool:
        # Once an end token is committed and everything before it is decoded, the rest is discarded anyway.
        for t in span:
            if t == self.mask_id:
                return False
            if t in self.stop_ids:
                return True
        return False
