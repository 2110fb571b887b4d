"""Regions of other open documents that look like the code around the cursor.

Each other document is cut into windows of `window_lines` lines that start every
`window_lines // 2` lines; a window's score is the Jaccard similarity between
its set of identifiers and the set of identifiers in the lines before the
cursor. The best non-overlapping windows become `Snippet`s, which the context
builder writes into the preamble as comments.

Work is bounded (a cap on documents, characters per document and characters per
line) and the result is deterministic: ties go to the earlier document, then the
earlier window. A document's windows are cached by its text, so a keystroke in
one file does not re-scan every other open file. Both caches are bounded in
bytes as well as entries, and neither keeps a document's text: a text is keyed
by its length and hash (which Python keeps with the string, so a lookup costs
nothing), so a closed document, or an old version of one, pins no memory.

This module does not count tokens or format the preamble: `fim.context` does.
"""
from __future__ import annotations

import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice

from fim.positions import normalize_line_endings
from fim.request import Snippet

MAX_DOCUMENTS = 32
MAX_DOCUMENT_CHARS = 256_000
MAX_LINE_CHARS = 400  # minified lines: look at their start only
MIN_SIMILARITY = 0.12
WINDOWS_CACHE_ENTRIES, WINDOWS_CACHE_BYTES = 64, 24 << 20
SELECT_CACHE_ENTRIES, SELECT_CACHE_BYTES = 32, 16 << 20

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


class ByteBoundedCache:
    """A least-recently-used memo bounded in entries and in bytes (as the caller weighs
    each entry); safe to use from several threads."""

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict = OrderedDict()  # key -> (value, bytes)
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key, default=None):
        with self._lock:
            found = self._items.get(key)
            if found is None:
                return default
            self._items.move_to_end(key)
            return found[0]

    def put(self, key, value, size: int) -> None:
        if size > self.max_bytes:
            return  # would push out everything else
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, size)
            self._bytes += size
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._items), "bytes": self._bytes, "max_bytes": self.max_bytes}


_WINDOWS = ByteBoundedCache(WINDOWS_CACHE_ENTRIES, WINDOWS_CACHE_BYTES)
_SELECTED = ByteBoundedCache(SELECT_CACHE_ENTRIES, SELECT_CACHE_BYTES)


def cache_stats() -> dict[str, dict[str, int]]:
    """Entries, bytes and byte bound of the two snippet caches (for `parafill/status`)."""
    return {"snippet_windows": _WINDOWS.stats(), "snippet_choices": _SELECTED.stats()}


@dataclass(frozen=True)
class _Window:
    start: int  # first line
    end: int  # one past the last line
    words: frozenset[str]


def _text_key(text: str) -> tuple[int, int]:
    return len(text), hash(text)


def _windows(text: str, window_lines: int) -> tuple[tuple[str, ...], tuple[_Window, ...]]:
    """The windows of `text` (at most its first MAX_DOCUMENT_CHARS characters), cached by that text."""
    key = (*_text_key(text), window_lines)
    found = _WINDOWS.get(key)
    if found is None:
        found = _scan_windows(text[:MAX_DOCUMENT_CHARS], window_lines)
        lines, windows = found
        # Its lines, and each window's set of identifiers (whose strings come to about the lines' size again).
        line_bytes = sum(sys.getsizeof(line) for line in lines)
        size = 2 * line_bytes + sum(sys.getsizeof(w.words) + 64 for w in windows)
        _WINDOWS.put(key, found, size)
    return found


def _scan_windows(text: str, window_lines: int) -> tuple[tuple[str, ...], tuple[_Window, ...]]:
    lines = tuple(normalize_line_endings(text).split("\n"))
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
    # Keystrokes on one line ask the same question again: answer from the cache.
    key = (wanted, tuple((p, *_text_key(t)) for p, t in documents), max_snippets, window_lines, min_similarity)
    found = _SELECTED.get(key)
    if found is None:
        found = _select(wanted, documents, max_snippets, window_lines, min_similarity)
        size = (sys.getsizeof(wanted) + sum(sys.getsizeof(w) for w in wanted)
                + sum(sys.getsizeof(p) + 64 for p, _ in documents)
                + sum(sys.getsizeof(s.path) + sys.getsizeof(s.text) for s in found) + 256)
        _SELECTED.put(key, found, size)
    return found


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
