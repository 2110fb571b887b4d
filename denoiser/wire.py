"""The team engine's wire format: a fill request and its answer as JSON objects.

The language server builds the `FimRequest` (documents, windows, snippets and
drafts stay with it) and a team engine (`team_engine/`) fills it with its own
`Engine`; both ends read and write these objects with the functions here, so
the format lives in one place. The latency budget travels as the milliseconds
left when the request leaves (`budget_ms`), never as a clock reading: the two
ends may be different machines. This module holds no networking and no model.
"""
from __future__ import annotations

import time
from dataclasses import asdict, fields
from typing import Any

from denoiser.backend import DecodeSettings, FillResult
from fim.request import DraftEvidence, FimRequest, Snippet, SpanPlan

PROTOCOL = 1  # bumped when a field changes meaning; the client checks it on connecting


class WireError(ValueError):
    """A JSON object that is not a valid fill request; the message names the field."""


def request_to_json(request: FimRequest) -> dict[str, Any]:
    return {
        "preamble": request.preamble,
        "prefix": request.prefix,
        "suffix": request.suffix,
        "span": {"mode": request.span.mode, "max_tokens": request.span.max_tokens},
        "language": request.language,
        "path": request.path,
        "snippets": [{"path": s.path, "text": s.text} for s in request.snippets],
        "draft": request.draft,
        "draft_evidence": asdict(request.draft_evidence),
    }


def _text(data: dict, name: str, default: str | None = None) -> str:
    value = data.get(name, default)
    if not isinstance(value, str):
        raise WireError(f"{name} must be a string")
    return value


def request_from_json(data: Any) -> FimRequest:
    if not isinstance(data, dict):
        raise WireError("request must be an object")
    span = data.get("span")
    if not isinstance(span, dict) or span.get("mode") not in ("line", "block"):
        raise WireError('span.mode must be "line" or "block"')
    max_tokens = span.get("max_tokens")
    if type(max_tokens) is not int or not 1 <= max_tokens <= 1024:
        raise WireError("span.max_tokens must be a whole number from 1 to 1024")
    snippets = data.get("snippets", [])
    if not isinstance(snippets, list) or not all(isinstance(s, dict) for s in snippets):
        raise WireError("snippets must be a list of objects")
    return FimRequest(
        preamble=_text(data, "preamble"),
        prefix=_text(data, "prefix"),
        suffix=_text(data, "suffix"),
        span=SpanPlan(mode=span["mode"], max_tokens=max_tokens),
        language=_text(data, "language", "plaintext"),
        path=_text(data, "path", ""),
        snippets=tuple(Snippet(path=_text(s, "path"), text=_text(s, "text")) for s in snippets),
        draft=_text(data, "draft", ""),
        draft_evidence=_evidence(data.get("draft_evidence", {})),
    )


def _evidence(data: Any) -> DraftEvidence:
    if not isinstance(data, dict):
        raise WireError("draft_evidence must be an object")
    counts = {}
    for name in (f.name for f in fields(DraftEvidence)):
        value = data.get(name, 0)
        if type(value) is not int or not 0 <= value <= 1 << 20:
            raise WireError(f"draft_evidence.{name} must be a whole number from 0 to {1 << 20}")
        counts[name] = value
    return DraftEvidence(**counts)


def decode_to_json(decode: DecodeSettings, now: float | None = None) -> dict[str, Any]:
    """`decode` with its deadline as the milliseconds left at `now` (time.monotonic(); default: now)."""
    left = None
    if decode.deadline is not None:
        left = round(max(0.0, decode.deadline - (time.monotonic() if now is None else now)) * 1000, 3)
    return {"steps": decode.steps, "confidence_threshold": decode.confidence_threshold, "budget_ms": left}


def decode_from_json(data: Any, now: float | None = None) -> DecodeSettings:
    """The decode settings of a request that arrived at `now` (time.monotonic(); default: now)."""
    if not isinstance(data, dict):
        raise WireError("decode must be an object")
    steps, threshold, budget = data.get("steps", 0), data.get("confidence_threshold", 0.9), data.get("budget_ms")
    if type(steps) is not int or not 0 <= steps <= 1024:
        raise WireError("decode.steps must be a whole number from 0 to 1024")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise WireError("decode.confidence_threshold must be a number greater than 0 and at most 1")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0):
        raise WireError("decode.budget_ms must be null or a number of milliseconds, at least 0")
    deadline = None if budget is None else (time.monotonic() if now is None else now) + budget / 1000
    return DecodeSettings(steps=steps, confidence_threshold=float(threshold), deadline=deadline)


FILL_FIELDS = ("text", "tokens", "steps", "context_tokens", "reused_context_tokens", "shortened", "confidence",
               "draft", "budget_cut")


def fill_to_json(result: Any) -> dict[str, Any]:
    """The fields of a `FillResult` (or an engine `Completion`, which carries the same ones)."""
    return {name: getattr(result, name, False if name in ("shortened", "budget_cut") else None) for name in FILL_FIELDS}


def fill_from_json(data: Any) -> FillResult:
    if not isinstance(data, dict) or not isinstance(data.get("text"), str):
        raise WireError("a fill answer must be an object with a text")
    confidence = data.get("confidence")
    return FillResult(
        text=data["text"],
        tokens=int(data.get("tokens") or 0),
        steps=int(data.get("steps") or 0),
        context_tokens=int(data.get("context_tokens") or 0),
        reused_context_tokens=int(data.get("reused_context_tokens") or 0),
        shortened=bool(data.get("shortened")),
        confidence=None if confidence is None else float(confidence),
        draft=data.get("draft") if data.get("draft") in ("accepted", "repaired", "rejected") else None,
        budget_cut=bool(data.get("budget_cut")),
    )
