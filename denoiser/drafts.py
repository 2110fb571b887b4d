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
own mask and end ids).

A small model agrees with little it did not write itself, even when the draft is
right, and a repair of a right draft is usually wrong. So a model directory may
carry a `DraftCalibration` (drafts.json): the probability that a draft is right,
from the model's check and from how well the draft's source matched the cursor's
surroundings, fitted on code the model never trained on (`parafill eval
--fit-drafts`). With one, every draft is decided whole, and that probability is
its confidence: the suggestion's gate then means what it always does. This module
does not tokenize or pick drafts.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from denoiser.config import EOS_ID, MASK_ID, PAD_ID
from denoiser.model import KVBuffers
from denoiser.sampler import SpanStart
from fim.request import DraftEvidence

CALIBRATION_FILE = "drafts.json"

Outcome = Literal["accepted", "repaired", "rejected"]


@dataclass(frozen=True)
class DraftCheck:
    """How the model judged a draft: `start` is the span to go on from (None: rejected outright)."""

    outcome: Outcome
    accepted: int  # positions kept (draft tokens and the end token)
    proposed: int  # positions the draft filled (its tokens and the end token, if it fits)
    start: SpanStart | None
    mean_log_prob: float = 0.0  # the model's mean log-probability of the draft's tokens (0: not scored)


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


def judge(laid: Tensor, proposed: int, tokens: Tensor, confidence: Tensor, *, mask_id: int, end_id: int,
          draft_prob: Tensor | None = None) -> DraftCheck:
    """The verdict on a laid draft from the greedy tokens / probabilities [2, L] of its checkerboard rows
    (`draft_prob` [2, L]: the probability each row gave the draft's own token, when known)."""
    span_len = laid.numel()
    position = torch.arange(span_len, device=laid.device)
    inside = position < proposed
    odd = inside & (position % 2 == 1)
    greedy = torch.where(odd, tokens[0], tokens[1])
    probability = torch.where(odd, confidence[0], confidence[1])
    mean_log_prob = 0.0
    if draft_prob is not None:
        own = torch.where(odd, draft_prob[0], draft_prob[1])[:proposed]
        mean_log_prob = float(own.double().clamp(min=1e-30).log().mean())
    agree = inside & (greedy == laid)
    accepted = int(agree.sum())
    if accepted == 0:
        return DraftCheck("rejected", 0, proposed, None, mean_log_prob)
    open_ = inside & ~agree
    if int(laid[proposed - 1]) == end_id and bool(open_[proposed - 1]):
        open_ |= position >= proposed - 1  # the end was rejected: where the text ends is open again
    span = torch.where(open_, torch.full_like(laid, mask_id), laid)
    committed = torch.where(inside, probability.float(), torch.ones_like(probability, dtype=torch.float32))
    outcome: Outcome = "accepted" if accepted == proposed else "repaired"
    return DraftCheck(outcome, accepted, proposed,
                      SpanStart(tuple(span.tolist()), tuple(committed.tolist()), steps=1), mean_log_prob)


@dataclass(frozen=True)
class DraftCalibration:
    """P(draft right) = sigmoid(bias + sum of weight * feature): a checked draft's confidence."""

    weights: dict[str, float]
    bias: float
    about: dict = field(default_factory=dict, compare=False)  # what it was fitted on

    FEATURES = ("mean_log_prob", "agreement", "log_matched_chars", "matched_lines", "log_occurrences",
                "log_tokens", "next_line", "log_rivals", "same_document")

    @staticmethod
    def features(check: DraftCheck, evidence: DraftEvidence, draft_tokens: int) -> dict[str, float]:
        return {
            "mean_log_prob": check.mean_log_prob,
            "agreement": check.accepted / max(1, check.proposed),
            "log_matched_chars": math.log1p(evidence.matched_chars),
            "matched_lines": float(min(evidence.matched_lines, 3)),
            "log_occurrences": math.log(max(1, evidence.occurrences)),
            "log_tokens": math.log1p(draft_tokens),
            "next_line": float(evidence.next_line),
            "log_rivals": math.log1p(evidence.rivals),
            "same_document": float(evidence.same_document),
        }

    def probability(self, features: dict[str, float]) -> float:
        z = self.bias + sum(w * features[name] for name, w in self.weights.items())
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))

    @classmethod
    def load(cls, model_dir: str | Path) -> "DraftCalibration | None":
        path = Path(model_dir) / CALIBRATION_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        unknown = set(data["weights"]) - set(cls.FEATURES)
        if unknown:
            raise ValueError(f"{path}: unknown draft features {sorted(unknown)}; known: {', '.join(cls.FEATURES)}")
        return cls({k: float(v) for k, v in data["weights"].items()}, float(data["bias"]), data.get("about", {}))

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / CALIBRATION_FILE
        path.write_text(json.dumps({"weights": self.weights, "bias": self.bias, "about": self.about}, indent=2)
                        + "\n", encoding="utf-8")
        return path


def kept_whole(laid: Tensor, check: DraftCheck, probability: float) -> DraftCheck:
    """The draft decided as laid, each of its positions carrying the calibrated `probability`."""
    position = torch.arange(laid.numel())
    committed = torch.where(position < check.proposed, probability, 1.0)
    return DraftCheck("accepted", check.proposed, check.proposed,
                      SpanStart(tuple(laid.tolist()), tuple(committed.tolist()), steps=1), check.mean_log_prob)


@torch.no_grad()
def check_draft(model, kv: KVBuffers, ctx_len: int, span_len: int, draft_ids: list[int], *,
                banned_ids: Tensor | None = None, vocab_limit: int | None = None,
                calibration: DraftCalibration | None = None,
                evidence: DraftEvidence = DraftEvidence()) -> DraftCheck:
    """Score every position of the draft while it is masked (one forward of two rows) and keep the agreed
    ones; with a `calibration`, the whole draft, its rating as its confidence."""
    laid = torch.tensor(draft_positions(draft_ids, span_len), dtype=torch.long, device=kv.k.device)
    proposed = min(len(draft_ids) + 1, span_len)
    rows = checkerboard(laid, proposed, MASK_ID)
    # Both rows read the same context: a broadcast view, no copy.
    one = KVBuffers(kv.k[:, :1].expand(-1, 2, -1, -1, -1), kv.v[:, :1].expand(-1, 2, -1, -1, -1))
    logits = model.span_logits(rows, one, ctx_len).float()  # two rows of L: the full head is cheap here
    if vocab_limit is not None:
        logits[..., vocab_limit:] = float("-inf")
    if banned_ids is not None:
        logits[..., banned_ids] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    confidence, tokens = probs.max(dim=-1)
    draft_prob = probs.gather(-1, laid.expand(2, -1).unsqueeze(-1)).squeeze(-1)
    check = judge(laid, proposed, tokens, confidence, mask_id=MASK_ID, end_id=EOS_ID, draft_prob=draft_prob)
    if calibration is not None:
        return kept_whole(laid, check, calibration.probability(DraftCalibration.features(check, evidence,
                                                                                         len(draft_ids))))
    return check
