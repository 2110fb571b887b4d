"""Check a draft against the denoiser in one pass and keep what the model agrees with.

A draft (text the user's own code suggests, `fim.drafts`) is laid into the
span: its tokens, then <eos>, then <pad>. The model was trained to predict
masked positions only, so a position is judged while it is masked: one forward
of two rows, a checkerboard (row 0 masks the odd positions with the even draft
tokens visible, row 1 the reverse). A position is accepted when the model's
greedy token there is the draft's token, and it keeps the probability the model
gave it, so the suggestion's confidence means what it always does. Rejected
positions are masked again and the usual steps fill them from that state
(`SpanStart`); if the end token is rejected, everything from it on is open.
The pass counts as one step. `checkerboard` and `judge` are the same check for
any masked-diffusion model (the open families' `SpanDecoder` uses them with its
own mask and end ids). This module does not tokenize or pick drafts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from denoiser.config import EOS_ID, MASK_ID, PAD_ID
from denoiser.model import KVBuffers
from denoiser.sampler import SpanStart

Outcome = Literal["accepted", "repaired", "rejected"]


@dataclass(frozen=True)
class DraftCheck:
    """How the model judged a draft: `start` is the span to go on from (None: rejected outright)."""

    outcome: Outcome
    accepted: int  # positions kept (draft tokens and the end token)
    proposed: int  # positions the draft filled (its tokens and the end token, if it fits)
    start: SpanStart | None


def draft_positions(draft_ids: list[int], span_len: int, *, end_id: int = EOS_ID, pad_id: int = PAD_ID) -> list[int]:
    """The draft laid into a span: its tokens, <eos>, then <pad> (cut to span_len, then no end token)."""
    ids = list(draft_ids[:span_len])
    if len(ids) < span_len:
        ids.append(end_id)
    return ids + [pad_id] * (span_len - len(ids))


def checkerboard(laid: Tensor, proposed: int, mask_id: int) -> Tensor:
    """Two rows of the laid span [L]: row 0 masks the odd positions of the first `proposed`, row 1 the even."""
    position = torch.arange(laid.numel(), device=laid.device)
    inside = position < proposed
    rows = laid.repeat(2, 1)
    rows[0, inside & (position % 2 == 1)] = mask_id
    rows[1, inside & (position % 2 == 0)] = mask_id
    return rows


def judge(laid: Tensor, proposed: int, tokens: Tensor, confidence: Tensor, *, mask_id: int, end_id: int) -> DraftCheck:
    """The verdict on a laid draft from the greedy tokens / probabilities [2, L] of its checkerboard rows."""
    span_len = laid.numel()
    position = torch.arange(span_len, device=laid.device)
    inside = position < proposed
    odd = inside & (position % 2 == 1)
    greedy = torch.where(odd, tokens[0], tokens[1])
    probability = torch.where(odd, confidence[0], confidence[1])
    agree = inside & (greedy == laid)
    accepted = int(agree.sum())
    if accepted == 0:
        return DraftCheck("rejected", 0, proposed, None)
    open_ = inside & ~agree
    if int(laid[proposed - 1]) == end_id and bool(open_[proposed - 1]):
        open_ |= position >= proposed - 1  # the end was rejected: where the text ends is open again
    span = torch.where(open_, torch.full_like(laid, mask_id), laid)
    committed = torch.where(inside, probability.float(), torch.ones_like(probability, dtype=torch.float32))
    outcome: Outcome = "accepted" if accepted == proposed else "repaired"
    return DraftCheck(outcome, accepted, proposed,
                      SpanStart(tuple(span.tolist()), tuple(committed.tolist()), steps=1))


@torch.no_grad()
def check_draft(model, kv: KVBuffers, ctx_len: int, span_len: int, draft_ids: list[int], *,
                banned_ids: Tensor | None = None, vocab_limit: int | None = None) -> DraftCheck:
    """Score every position of the draft while it is masked (one forward of two rows) and keep the agreed ones."""
    laid = torch.tensor(draft_positions(draft_ids, span_len), dtype=torch.long, device=kv.k.device)
    proposed = min(len(draft_ids) + 1, span_len)
    rows = checkerboard(laid, proposed, MASK_ID)
    # Both rows read the same context: a broadcast view, no copy.
    one = KVBuffers(kv.k[:, :1].expand(-1, 2, -1, -1, -1), kv.v[:, :1].expand(-1, 2, -1, -1, -1))
    tokens, confidence = model.span_tokens(rows, one, ctx_len, banned_ids=banned_ids, vocab_limit=vocab_limit)
    return judge(laid, proposed, tokens, confidence, mask_id=MASK_ID, end_id=EOS_ID)
