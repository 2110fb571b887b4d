"""Confidence-threshold parallel unmasking of one span (Fast-dLLM style), deterministic.

Each step runs the model over the span only (against cached context K/V),
takes the greedy token and its probability at every position, and commits
every still-masked position whose probability passes the threshold, and at
least the most confident one. Positions after the first committed <eos> (or
<pad>) can no longer reach the text: they become <pad> at once, as in training,
and stop costing steps. The span ends at that end token once everything before
it is committed. Past the decode's deadline (the latency budget) it stops
between steps and keeps the tokens before the first still-masked position.
No randomness: ties go to the lowest position. This module
does not tokenize, cache or touch the context.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from denoiser.backend import Cancelled, DecodeSettings
from denoiser.config import EOS_ID, FIM_MIDDLE_ID, FIM_PREFIX_ID, FIM_SUFFIX_ID, MASK_ID, PAD_ID
from denoiser.model import KVBuffers

# Tokens a span may never hold: the mask itself and the prompt's structure markers.
NEVER_WRITTEN = (MASK_ID, FIM_PREFIX_ID, FIM_SUFFIX_ID, FIM_MIDDLE_ID)
END_TOKENS = (EOS_ID, PAD_ID)


@dataclass(frozen=True)
class SpanResult:
    """tokens: the middle (before the first end token); ended: an end token was written.

    log_confidence: the sum of log-probabilities the model gave each token of the
    middle, and the end token, when it committed them; `scored` counts them. They
    tell how sure the model was of the whole suggestion (compared approximately:
    a batched forward may differ from a lone one in the last bits).
    """

    tokens: tuple[int, ...]
    steps: int
    ended: bool
    log_confidence: float = field(default=0.0, compare=False)
    scored: int = field(default=0, compare=False)
    # The latency budget stopped it: `tokens` end before the first still-masked position.
    cut: bool = False


@dataclass(frozen=True)
class SpanStart:
    """A span partly decided before its first step (a checked draft, `denoiser.drafts`).

    span: L token ids, MASK_ID where still open; committed: the probability each
    decided position had when the model scored it (ignored where masked);
    steps: forward passes already spent on it (they count against the step budget).
    """

    span: tuple[int, ...]
    committed: tuple[float, ...]
    steps: int = 0

    def __post_init__(self) -> None:
        if len(self.span) != len(self.committed):
            raise ValueError(f"span has {len(self.span)} positions but committed {len(self.committed)}")

    def tensors(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(span [1, L] int64, masked [1, L] bool, committed [1, L] fp32) on `device`."""
        span = torch.tensor([self.span], dtype=torch.long, device=device)
        committed = torch.tensor([self.committed], dtype=torch.float32, device=device)
        return span, span == MASK_ID, committed


def result_if_finished(span: torch.Tensor, masked: torch.Tensor, committed: torch.Tensor, steps: int) -> SpanResult | None:
    """The SpanResult of a span row [L] that needs no further step (ended, or nothing masked), else None."""
    end = finished_at(span, masked)
    if end is not None:
        return SpanResult(tuple(span[:end].tolist()), steps, True, *scored_confidence(committed, end + 1))
    if not bool(masked.any()):
        return SpanResult(tuple(span.tolist()), steps, False, *scored_confidence(committed, span.numel()))
    return None


def budget_cut_result(span: torch.Tensor, masked: torch.Tensor, committed: torch.Tensor, steps: int) -> SpanResult:
    """A span row [L] stopped by the latency budget: the committed tokens before its first
    still-masked position (never a hole), scored over those tokens alone."""
    open_at = torch.nonzero(masked).flatten()
    end = int(open_at[0]) if open_at.numel() else span.numel()
    return SpanResult(tuple(span[:end].tolist()), steps, False, *scored_confidence(committed, end), cut=True)


def scored_confidence(committed: torch.Tensor, length: int) -> tuple[float, int]:
    """(sum of log p, count) over the first `length` commit-time probabilities of a span row."""
    values = committed[:length].double().clamp(min=1e-30)
    return float(values.log().sum()), int(values.numel())


def commit_count(remaining: int, steps_used: int, max_steps: int) -> int:
    """Fewest positions this step must commit so the span finishes within max_steps (0 = no cap)."""
    if max_steps <= 0:
        return 1
    steps_left = max(1, max_steps - steps_used)
    return max(1, math.ceil(remaining / steps_left))


def choose_commits(confidence: torch.Tensor, masked: torch.Tensor, threshold: float, at_least: int) -> torch.Tensor:
    """Positions to commit: masked ones with confidence >= threshold, plus the `at_least` most confident.

    confidence, masked: [L]. Ties go to the lowest index (stable sort).
    """
    scores = torch.where(masked, confidence, torch.full_like(confidence, -1.0))
    commit = masked & (confidence >= threshold)
    order = torch.sort(scores, descending=True, stable=True).indices
    top = order[: min(at_least, int(masked.sum()))]
    commit[top] = True
    return commit


def first_committed_end(span: torch.Tensor, masked: torch.Tensor) -> int | None:
    """Index of the first committed <eos> or <pad>, else None."""
    ends = torch.nonzero(~masked & ((span == EOS_ID) | (span == PAD_ID))).flatten()
    return int(ends[0]) if ends.numel() else None


def pad_after_first_end(span: torch.Tensor, masked: torch.Tensor) -> None:
    """In place: masked positions after the first committed end token become committed <pad>."""
    first = first_committed_end(span, masked)
    if first is None:
        return
    after = torch.arange(span.shape[0], device=span.device) > first
    span[after & masked] = PAD_ID
    masked &= ~after


def finished_at(span: torch.Tensor, masked: torch.Tensor) -> int | None:
    """Index of the first committed end token with every position before it committed, else None."""
    first = first_committed_end(span, masked)
    return first if first is not None and not bool(masked[:first].any()) else None


@torch.no_grad()
def denoise_span(
    model,
    kv: KVBuffers,
    ctx_len: int,
    span_len: int,
    decode: DecodeSettings,
    is_cancelled: Callable[[], bool] = lambda: False,
    *,
    vocab_limit: int | None = None,
    start: SpanStart | None = None,
) -> SpanResult:
    """Fill span_len masks after ctx_len cached context tokens (batch 1), from `start` if given."""
    device = kv.k.device
    if start is None:
        span = torch.full((1, span_len), MASK_ID, dtype=torch.long, device=device)
        masked = torch.ones(span_len, dtype=torch.bool, device=device)
        committed = torch.zeros(span_len, dtype=torch.float32, device=device)  # probability at commit
        steps = 0
    else:
        if len(start.span) != span_len:
            raise ValueError(f"the start holds {len(start.span)} positions, the span {span_len}")
        span, masked, committed = start.tensors(device)
        masked, committed, steps = masked[0], committed[0], start.steps
        done = result_if_finished(span[0], masked, committed, steps)
        if done is not None:
            return done
    while True:
        if is_cancelled():
            raise Cancelled("span denoising cancelled")
        logits = model.span_logits(span, kv, ctx_len)[0].float()
        logits[:, list(NEVER_WRITTEN)] = float("-inf")
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits[:, vocab_limit:] = float("-inf")
        confidence, tokens = torch.softmax(logits, dim=-1).max(dim=-1)
        at_least = commit_count(int(masked.sum()), steps, decode.steps)
        commit = choose_commits(confidence, masked, decode.confidence_threshold, at_least)
        span[0, commit] = tokens[commit]
        committed[commit] = confidence[commit]
        masked &= ~commit
        pad_after_first_end(span[0], masked)
        steps += 1
        done = result_if_finished(span[0], masked, committed, steps)
        if done is not None:
            return done
        if decode.past_deadline():
            return budget_cut_result(span[0], masked, committed, steps)
