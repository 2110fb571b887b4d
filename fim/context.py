"""Build the model's fill-in-the-middle request from a document and a cursor.

`build_request` cuts the document at the cursor into a prefix window (whole lines
before the cursor line, then the cursor line up to the cursor) and a suffix
window (the rest of the cursor line, then whole lines after it), fits both under
a token budget, writes a preamble (a comment with the file path, then snippets of
other open documents as comments) and plans the span.

Window boundaries are chosen so that they stay put while the user types, which
is what lets the denoiser reuse the context's cached keys and values:

- the prefix window starts at a line whose number is a multiple of `line_step`:
  the smallest such line whose window still fits. Typing at the cursor only
  extends the prefix, so its start moves only when the budget overflows, and
  then by `line_step` lines at once;
- the suffix window depends only on the text after the cursor, which typing at
  the cursor does not change, so it keeps as many whole lines as fit.

Line endings are normalised to "\\n" (what the model was trained on) and lone
surrogates, which no tokenizer accepts, become U+FFFD. Work is bounded: a window
never looks at more than `budget * MAX_CHARS_PER_TOKEN` characters, and a giant
line is cut by characters at fixed steps.

This module never imports torch and never tokenizes: it counts tokens through the
`count_tokens` callable it is given (or an estimate).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

from fim.languages import CommentSyntax, comment_syntax, resolve_language
from fim.positions import normalize_line_endings, resolve_position
from fim.request import FimRequest, Snippet, SpanPlan
from fim.snippets import select_snippets

CHARS_PER_TOKEN_ESTIMATE = 3.5
# No token covers more characters than this (except long whitespace runs, which
# only make the bound looser): a budget of N tokens never needs more text.
MAX_CHARS_PER_TOKEN = 16
# A line too long for the budget is cut at a multiple of this many characters.
LINE_CUT_STEP = 64
SNIPPET_QUERY_LINES = 10
MAX_PATH_PARTS = 3
MAX_PATH_CHARS = 160

TokenCounter = Callable[[str], int]

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_PATH_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
_PYTHON_BLOCK_START = re.compile(
    r"^\s*(?:async\s+)?(?:def|class|if|elif|else|for|while|try|except|finally|with|match|case)\b.*:$"
)


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate: one token per 3.5 characters, rounded up."""
    return math.ceil(len(text) / CHARS_PER_TOKEN_ESTIMATE)


@dataclass(frozen=True)
class ContextOptions:
    """How much context the model sees and how long a span may be."""

    context_tokens: int = 1024  # preamble + prefix + suffix
    suffix_fraction: float = 0.25  # of what the preamble leaves
    line_step: int = 16  # the prefix window starts on a multiple of this many lines
    max_span_tokens_line: int = 32
    max_span_tokens_block: int = 64
    snippet_tokens: int = 256  # at most this much of the budget goes to snippets
    max_snippets: int = 2

    def __post_init__(self) -> None:
        for name in (
            "context_tokens", "line_step", "max_span_tokens_line", "max_span_tokens_block",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ContextOptions.{name} must be a whole number >= 1, got {value!r}")
        for name in ("snippet_tokens", "max_snippets"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ContextOptions.{name} must be a whole number >= 0, got {value!r}")
        fraction = self.suffix_fraction
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction <= 1:
            raise ValueError(
                f"ContextOptions.suffix_fraction must be a number from 0 to 1, got {fraction!r}"
            )


def build_request(
    text: str,
    line: int,
    character: int,
    *,
    path: str = "",
    language_id: str = "",
    options: ContextOptions = ContextOptions(),
    other_documents: Iterable[tuple[str, str]] = (),
    count_tokens: TokenCounter | None = None,
) -> FimRequest:
    """The request for the model at LSP position (line, character) of `text`.

    `line`/`character` are LSP positions (UTF-16 units) and are clamped into the
    document. `other_documents` are (path, text) of other open documents; one
    with the same `path` as this document is skipped. `count_tokens` counts the
    model's tokens in a string (default: `estimate_tokens`). The preamble,
    prefix and suffix together never count more than `options.context_tokens`.
    """
    count = count_tokens or estimate_tokens
    language = resolve_language(language_id, path)
    shown_path = display_path(path)
    if not text.isascii():
        text = _LONE_SURROGATE.sub("\ufffd", text)

    cursor_line, offset = resolve_position(text, line, character)
    before = normalize_line_endings(text[:offset])
    after = normalize_line_endings(text[offset:])

    comment = comment_syntax(language)
    others = [(p, t) for p, t in other_documents if not (path and p == path)]
    snippets: tuple[Snippet, ...] = ()
    if comment is not None and others and options.max_snippets and options.snippet_tokens:
        query = _last_lines(before, SNIPPET_QUERY_LINES)
        snippets = select_snippets(query, others, max_snippets=options.max_snippets)
    preamble, snippets = _preamble(shown_path, comment, snippets, options, count)

    code_budget = max(0, options.context_tokens - count(preamble))
    suffix = _suffix_window(after, int(code_budget * options.suffix_fraction), count)
    prefix_budget = max(0, code_budget - count(suffix))
    prefix = _prefix_window(before, cursor_line, prefix_budget, options.line_step, count)

    mode = plan_span_mode(before, after, language)
    max_tokens = options.max_span_tokens_line if mode == "line" else options.max_span_tokens_block
    return FimRequest(
        preamble=preamble,
        prefix=prefix,
        suffix=suffix,
        span=SpanPlan(mode=mode, max_tokens=max_tokens),
        language=language,
        path=path,
        snippets=snippets,
    )


def plan_span_mode(before: str, after: str, language: str) -> str:
    """ "line" to finish the cursor line, "block" to write whole lines.

    Block when the cursor line holds only whitespace before the cursor, or when
    the cursor ends a line that opens a block ("def f():", "if (x) {"), where
    the useful completion is the block's body.
    """
    line_before = before[before.rfind("\n") + 1 :]
    if not line_before.strip():
        return "block"
    nl = after.find("\n")
    rest = after if nl < 0 else after[:nl]
    if not rest.strip():
        stripped = line_before.rstrip()
        if language == "python" and _PYTHON_BLOCK_START.match(stripped):
            return "block"
        if language != "python" and stripped.endswith("{"):
            return "block"
    return "line"


def display_path(path: str) -> str:
    """The path as written in the header: a file URI becomes a path, and only its
    last few parts are kept (the model knows repository-relative paths)."""
    if not path:
        return ""
    if path.startswith("file:"):
        path = unquote(urlparse(path).path)
    elif re.match(r"^[a-zA-Z][\w+.-]+:", path) and not re.match(r"^[a-zA-Z]:[\\/]", path):
        path = path.split(":", 1)[1]  # untitled:Untitled-1 and other non-file schemes
    path = _PATH_UNSAFE.sub("", path.replace("\\", "/"))
    parts = [p for p in path.split("/") if p and p != "."]
    shown = "/".join(parts[-MAX_PATH_PARTS:])
    return shown[-MAX_PATH_CHARS:]


def _preamble(
    shown_path: str,
    comment: CommentSyntax | None,
    snippets: tuple[Snippet, ...],
    options: ContextOptions,
    count: TokenCounter,
) -> tuple[str, tuple[Snippet, ...]]:
    """Header and snippet comments, each snippet cut by whole lines to fit its budget."""
    if comment is None:
        return "", ()
    header = comment.line(f"path: {shown_path}") + "\n" if shown_path else ""
    if count(header) > options.context_tokens:
        header = ""
    budget = min(options.snippet_tokens, options.context_tokens - count(header))
    blocks: list[str] = []
    kept: list[Snippet] = []
    for snippet in snippets:
        title = comment.line(f"snippet from {display_path(snippet.path) or 'another file'}:") + "\n"
        lines = snippet.text.split("\n")
        while lines:
            block = title + "".join(comment.line(x) + "\n" for x in lines)
            used = count(block)
            if used <= budget:
                blocks.append(block)
                kept.append(Snippet(path=snippet.path, text="\n".join(lines)))
                budget -= used
                break
            # Drop lines from the end; halve first when far over, to bound the work.
            lines = lines[: len(lines) // 2] if used > 2 * budget else lines[:-1]
    return header + "".join(blocks), tuple(kept)


def _prefix_window(
    before: str, cursor_line: int, budget: int, line_step: int, count: TokenCounter
) -> str:
    """The end of `before` that fits `budget`, starting on a stable line boundary."""
    line_start = before.rfind("\n") + 1
    cursor_text = before[line_start:]
    if count(cursor_text) > budget:
        return _cut_line_keep_end(cursor_text, budget, count)

    # starts[i] is the offset where line (cursor_line - i) starts; walk back no
    # further than the text the budget could possibly hold.
    limit = len(before) - budget * MAX_CHARS_PER_TOKEN
    starts = [line_start]
    pos = line_start
    while pos > 0:
        previous = before.rfind("\n", 0, pos - 1) + 1
        if previous < limit:
            break
        starts.append(previous)
        pos = previous
    lowest = cursor_line - (len(starts) - 1)

    def fits(line_no: int) -> bool:
        return count(before[starts[cursor_line - line_no] :]) <= budget

    step = line_step
    while True:
        first = -(-lowest // step) * step  # smallest multiple of step >= lowest
        best = _first_true(range(first, cursor_line + 1, step), fits)
        if best is not None and (best < cursor_line or step == 1):
            return before[starts[cursor_line - best] :]
        if step == 1:
            return cursor_text
        # No earlier boundary at this step fits (very long lines): use finer steps.
        step = max(1, step // 2)


def _suffix_window(after: str, budget: int, count: TokenCounter) -> str:
    """The start of `after` that fits `budget`: whole lines after the cursor line."""
    nl = after.find("\n")
    rest = after if nl < 0 else after[:nl]
    if count(rest) > budget:
        return _cut_line_keep_start(rest, budget, count)
    limit = budget * MAX_CHARS_PER_TOKEN
    ends = [len(rest)]
    while nl >= 0 and nl + 1 <= limit:
        ends.append(nl + 1)
        nl = after.find("\n", nl + 1)
    if nl < 0 and len(after) <= limit and ends[-1] != len(after):
        ends.append(len(after))  # the last line, which has no line break
    best = _last_true(ends, lambda end: count(after[:end]) <= budget)
    return after[:best]


def _cut_line_keep_end(line: str, budget: int, count: TokenCounter) -> str:
    """The end of one long line that fits, starting at a multiple of LINE_CUT_STEP."""
    if budget <= 0:
        return ""
    low = max(0, len(line) - budget * MAX_CHARS_PER_TOKEN)
    first = -(-low // LINE_CUT_STEP) * LINE_CUT_STEP
    starts = list(range(first, len(line), LINE_CUT_STEP))
    best = _first_true(starts, lambda start: count(line[start:]) <= budget)
    return "" if best is None else line[best:]


def _cut_line_keep_start(line: str, budget: int, count: TokenCounter) -> str:
    """The start of one long line that fits, ending at a multiple of LINE_CUT_STEP."""
    if budget <= 0:
        return ""
    high = min(len(line), budget * MAX_CHARS_PER_TOKEN)
    ends = list(range(0, high + 1, LINE_CUT_STEP))
    best = _last_true(ends, lambda end: count(line[:end]) <= budget)
    return line[:best] if best else ""


def _first_true(candidates, predicate) -> int | None:
    """First candidate where `predicate` holds, for a predicate false…false true…true."""
    lo, hi = 0, len(candidates)
    while lo < hi:
        mid = (lo + hi) // 2
        if predicate(candidates[mid]):
            hi = mid
        else:
            lo = mid + 1
    return candidates[lo] if lo < len(candidates) else None


def _last_true(candidates, predicate) -> int:
    """Last candidate where `predicate` holds (true…true false…false); the first
    candidate when none does."""
    lo, hi = 0, len(candidates)
    while lo < hi:
        mid = (lo + hi) // 2
        if predicate(candidates[mid]):
            lo = mid + 1
        else:
            hi = mid
    return candidates[max(0, lo - 1)]


def _last_lines(before: str, n: int) -> str:
    """The last `n` whole lines before the cursor line (the cursor line itself changes
    with every keystroke, so it is left out to keep the snippet choice stable)."""
    end = before.rfind("\n")
    if end < 0:
        return ""
    start = end
    for _ in range(n):
        if start <= 0:
            break
        start = before.rfind("\n", 0, start)
    return before[max(0, start + 1) : end]
