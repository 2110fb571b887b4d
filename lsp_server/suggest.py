"""One suggestion at a cursor: fim.build_request → Engine.complete → fim.postprocess.

This is the single path shared by the language server and `parafill complete`,
so what the terminal shows is what the editor gets. It runs on the model worker
thread (it calls the engine, which runs torch); it knows no LSP transport and
no tensors, and it never changes a document.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

from fim import ContextOptions, FimRequest, LineIndex, build_request, postprocess
from fim.drafts import DraftIndex
from fim.positions import normalize_line_endings
from fim.postprocess import leaves_a_string_open
from fim.request import DraftEvidence
from lsp_server.settings import Settings, latency_budget_ms

# Documents up to this size are read whole for the string check (`leaves_a_string_open`): a few ms.
STRING_CHECK_CHARS = 1 << 20

Position = tuple[int, int]  # LSP (line, UTF-16 character)


@dataclass(frozen=True)
class Suggestion:
    """What the model suggests at a cursor, and how it got there."""

    text: str | None  # after post-processing; None = nothing worth showing
    raw: str  # the engine's fill before post-processing
    request: FimRequest
    source: str  # "model" | "completion_cache" | "typed_ahead"
    tokens: int
    steps: int
    model_ms: float  # time inside the engine
    total_ms: float  # build_request + engine + postprocess
    confidence: float | None = None  # the model's own certainty (engine Completion.confidence)
    # Why `text` is None: "empty" (the model wrote nothing), "postprocess" (nothing was
    # left after post-processing), "unsure" (confidence under minConfidence).
    dropped: str | None = None
    # How the model judged the draft from the user's code: "accepted", "repaired", "rejected"; None: no draft.
    draft: str | None = None
    budget_cut: bool = False  # the latency budget stopped the model: `raw` is the start of its answer


def context_options(settings: Settings, model_context: int | None = None) -> ContextOptions:
    """The window options for a request; `model_context` is the most context tokens the model keeps.

    Windows are planned for what the model really sees: a window planned for more
    would be cut again token by token, at a place that moves with every keystroke.
    """
    return ContextOptions(
        context_tokens=min(settings.context_tokens, model_context or settings.context_tokens),
        max_span_tokens_line=settings.span_tokens_line,
        max_span_tokens_block=settings.span_tokens_block,
        max_snippets=settings.max_snippets,
    )


def engine_device(engine: Any) -> str:
    """The device the engine's model runs on ("cpu", "cuda:0"; "cpu" when it does not say)."""
    return str(getattr(getattr(engine, "backend", None), "device", "cpu"))


def decode_settings(settings: Settings, device: str = "cpu", budget_started: float | None = None):
    """How the span is denoised; the latency budget counts from `budget_started` (time.monotonic(), default now)."""
    from denoiser.backend import DecodeSettings  # the worker thread has torch loaded already

    budget_ms = latency_budget_ms(settings, device)
    started = time.monotonic() if budget_started is None else budget_started
    return DecodeSettings(steps=settings.steps, confidence_threshold=settings.confidence_threshold,
                          deadline=started + budget_ms / 1000 if budget_ms else None)


def suggest(
    engine: Any,
    text: str,
    line: int,
    character: int,
    *,
    document: str,
    path: str = "",
    language_id: str = "",
    settings: Settings = Settings(),
    other_documents: Iterable[tuple[str, str]] = (),
    is_cancelled: Callable[[], bool] = lambda: False,
    drafts: DraftIndex | None = None,
    budget_started: float | None = None,
) -> Suggestion:
    """The suggestion at LSP position (line, character) of `text` (clamped into it).

    `document` keys the engine's per-document caches (the URI in the server).
    `drafts`: the index of the user's code; with `settings.repo_drafts` the best
    draft it holds rides along with the request, for the model to check.
    The latency budget (`settings.latency_budget_ms`) counts from `budget_started`
    (a `time.monotonic()` instant; default: now): past it, the model stops between
    steps and the suggestion is what it decoded so far, gated like any other.
    Raises the engine's `Cancelled` when `is_cancelled` turns true.
    """
    started = time.perf_counter()
    budget_started = time.monotonic() if budget_started is None else budget_started
    request = build_request(
        text,
        line,
        character,
        path=path,
        language_id=language_id,
        options=context_options(settings, getattr(engine, "max_context_tokens", None)),
        other_documents=other_documents,
        count_tokens=getattr(engine, "count_tokens", None),
    )
    if drafts is not None and settings.repo_drafts:
        request = with_draft(request, drafts, text, line, character, document, is_cancelled=is_cancelled)
    decode = decode_settings(settings, engine_device(engine), budget_started)
    completion = engine.complete(request, decode, document=document, is_cancelled=is_cancelled)
    final = postprocess(completion.text, request)
    if final is not None and request.language == "python" and len(text) <= STRING_CHECK_CHARS:
        whole = normalize_line_endings(text)
        cursor = LineIndex.of(whole).offset_at(line, character)
        if leaves_a_string_open(whole[:cursor], final, whole[cursor:]):
            final = None
    dropped = None
    if final is None:
        dropped = "postprocess" if completion.text.strip() else "empty"
    elif completion.confidence is not None and completion.confidence < settings.min_confidence:
        final = None  # the model itself doubts it: showing it would only teach the user to ignore suggestions
        dropped = "unsure"
    return Suggestion(
        text=final,
        raw=completion.text,
        request=request,
        source=completion.source,
        tokens=completion.tokens,
        steps=completion.steps,
        model_ms=completion.elapsed_ms,
        total_ms=(time.perf_counter() - started) * 1000,
        confidence=completion.confidence,
        dropped=dropped,
        draft=getattr(completion, "draft", None),
        budget_cut=getattr(completion, "budget_cut", False),
    )


def with_draft(request: FimRequest, drafts: DraftIndex, text: str, line: int, character: int,
               document: str, *, is_cancelled: Callable[[], bool] = lambda: False) -> FimRequest:
    """`request` with the index's best draft at the cursor (the document's own text indexed first).

    A request cancelled by then (its document closed, or edited) indexes nothing: the
    close has taken the document out of the index, and its text must not come back.
    """
    text = normalize_line_endings(text)  # the index and the request read "\n" line ends
    drafts.update(document, text, pinned=True, unless=is_cancelled)
    found = drafts.draft(document, text, LineIndex.of(text).offset_at(line, character), request.span.mode)
    if found is None:
        return request
    evidence = DraftEvidence(found.matched_chars, found.matched_lines, found.occurrences, int(found.next_line),
                             found.rivals, int(found.source == document))
    return replace(request, draft=found.text, draft_evidence=evidence)


def clamp_position(index: LineIndex, line: int, character: int) -> Position:
    """The position the editor meant, clamped into the document."""
    return index.position_at(index.offset_at(line, character))


def with_selected_completion(
    text: str, start: Position, end: Position, inserted: str
) -> tuple[str, Position, Position, Position]:
    """`text` as if the completion menu's selected item were inserted over [start, end).

    Returns (new text, clamped start, clamped end, cursor after the insertion),
    all positions in LSP units; start/end refer to the original text.
    """
    index = LineIndex.of(text)
    a = index.offset_at(*start)
    b = max(a, index.offset_at(*end))
    new_text = text[:a] + inserted + text[b:]
    cursor = LineIndex.of(new_text).position_at(a + len(inserted))
    return new_text, index.position_at(a), index.position_at(b), cursor


@dataclass(frozen=True)
class Placed:
    """A suggestion placed in the document: insert `insert_text` over [start, end)."""

    insert_text: str | None  # None = no item
    start: Position
    end: Position
    suggestion: Suggestion


def place_suggestion(
    engine: Any,
    text: str,
    line: int,
    character: int,
    *,
    selected: tuple[Position, Position, str] | None = None,
    **options: Any,
) -> Placed:
    """`suggest` at a cursor, with the range an editor item needs.

    `selected` is the completion menu's selected item (start, end, text): the
    request is built as if its text were already inserted, and the item
    replaces its range with that text followed by the suggestion (LSP 3.18
    `selectedCompletionInfo`). `options` are passed on to `suggest`.
    """
    if selected is not None:
        sel_start, sel_end, sel_text = selected
        new_text, start, end, cursor = with_selected_completion(text, sel_start, sel_end, sel_text)
        found = suggest(engine, new_text, *cursor, **options)
        insert = None if found.text is None else sel_text + found.text
        return Placed(insert, start, end, found)
    cursor = clamp_position(LineIndex.of(text), line, character)
    found = suggest(engine, text, *cursor, **options)
    return Placed(found.text, cursor, cursor, found)
