"""Regions of other open documents that look like the code around the cursor.

Each other document is cut into windows of `window_lines` lines that start every
`window_lines // 2` lines; a window's score is the Jaccard similarity between
its set of identifiers and the set of identifiers in the lines before the
cursor. The best non-overlapping windows become `Snippet`s, which the context
builder writes into the preamble as comments.

Work is bounded (a cap on documents, characters per document and characters per
line) and the result is deterministic: ties go to the earlier document, then the
earlier window. A document's windows are cached by its text, so a keystroke in
one file does not re-scan every other open file.

This module does not count tokens or format the preamble: `fim.context` does.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice

from fim.positions import normalize_line_endings
from fim.request import Snippet

MAX_DOCUMENTS = 32
MAX_DOCUMENT_CHARS = 256_000
MAX_LINE_CHARS = 400  # minified lines: look at their start only
MIN_SIMILARITY = 0.12

_IDENTIFIER = re.compile(r"[^\W\d]\w*")
# Keywords shared by most languages say nothing about which region is related.
_STOP_WORDS = frozenset(
    """
    a an and as async await break case catch class const continue def default del do elif else
    end enum export extends false final finally fn for from func function go if impl import in
    is let match mut new nil none not null of or package pass private protected pub public
    raise return self static struct super switch this throw true try type use var void while
    with yield int str bool string
    """.split()
)


def identifiers(text: str) -> frozenset[str]:
    """The identifiers in `text` that carry meaning (keywords left out)."""
    return frozenset(w for w in _IDENTIFIER.findall(text) if w.lower() not in _STOP_WORDS)


@dataclass(frozen=True)
class _Window:
    start: int  # first line
    end: int  # one past the last line
    words: frozenset[str]


@lru_cache(maxsize=64)
def _windows(text: str, window_lines: int) -> tuple[tuple[str, ...], tuple[_Window, ...]]:
    lines = tuple(normalize_line_endings(text[:MAX_DOCUMENT_CHARS]).split("\n"))
    words = [identifiers(line[:MAX_LINE_CHARS]) for line in lines]
    stride = max(1, window_lines // 2)
    windows = []
    for start in range(0, max(1, len(lines) - window_lines + stride), stride):
        end = min(start + window_lines, len(lines))
        union = frozenset().union(*words[start:end])
        if union:
            windows.append(_Window(start, end, union))
    return lines, tuple(windows)


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a ∩ b| / |a ∪ b|, 0 for two empty sets."""
    if not a or not b:
        return 0.0
    common = len(a & b)
    return common / (len(a) + len(b) - common)


def select_snippets(
    query: str,
    documents: Iterable[tuple[str, str]],
    *,
    max_snippets: int = 2,
    window_lines: int = 10,
    min_similarity: float = MIN_SIMILARITY,
) -> tuple[Snippet, ...]:
    """The `max_snippets` windows of `documents` most similar to `query`.

    `documents` are (path, text) pairs; only the first MAX_DOCUMENTS are read.
    Windows scoring below `min_similarity` are never chosen, so unrelated files
    add nothing to the context.
    """
    if max_snippets <= 0 or window_lines <= 0:
        return ()
    wanted = identifiers(query)
    if not wanted:
        return ()
    documents = tuple(islice(((str(p), str(t)) for p, t in documents), MAX_DOCUMENTS))
    return _select(wanted, documents, max_snippets, window_lines, min_similarity)


# Keystrokes on one line ask the same question again: answer from the cache.
@lru_cache(maxsize=32)
def _select(
    wanted: frozenset[str],
    documents: tuple[tuple[str, str], ...],
    max_snippets: int,
    window_lines: int,
    min_similarity: float,
) -> tuple[Snippet, ...]:
    scored: list[tuple[float, int, int, str, tuple[str, ...], _Window]] = []
    for doc_index, (path, text) in enumerate(documents):
        if not text:
            continue
        lines, windows = _windows(text, window_lines)
        for window in windows:
            score = jaccard(wanted, window.words)
            if score >= min_similarity:
                scored.append((score, doc_index, window.start, path, lines, window))
    scored.sort(key=lambda item: (-item[0], item[1], item[2]))

    chosen: list[tuple[int, _Window]] = []
    snippets: list[Snippet] = []
    for _, doc_index, _, path, lines, window in scored:
        if len(snippets) >= max_snippets:
            break
        if any(i == doc_index and w.start < window.end and window.start < w.end for i, w in chosen):
            continue
        text = "\n".join(line[:MAX_LINE_CHARS].rstrip() for line in lines[window.start : window.end]).strip("\n")
        if any(s.text == text for s in snippets):
            continue
        chosen.append((doc_index, window))
        snippets.append(Snippet(path=path, text=text))
    return tuple(snippets)
