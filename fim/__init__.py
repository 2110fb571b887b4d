"""Fill-in-the-middle text handling: pure Python, never imports torch.

The public API: `build_request` turns a document and an LSP cursor into a
`FimRequest`; `postprocess` turns the model's raw fill into the suggestion.
"""
from fim.context import ContextOptions, build_request, estimate_tokens
from fim.languages import comment_syntax, resolve_language
from fim.positions import LineIndex, line_ending, offset_at, position_at, utf16_length
from fim.postprocess import postprocess
from fim.request import FimRequest, Snippet, SpanMode, SpanPlan
from fim.snippets import select_snippets

__all__ = [
    "ContextOptions",
    "FimRequest",
    "LineIndex",
    "Snippet",
    "SpanMode",
    "SpanPlan",
    "build_request",
    "comment_syntax",
    "estimate_tokens",
    "line_ending",
    "offset_at",
    "position_at",
    "postprocess",
    "resolve_language",
    "select_snippets",
    "utf16_length",
]
