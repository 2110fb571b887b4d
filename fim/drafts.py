"""Drafts from the user's own code: continuations copied from lines seen elsewhere.

Code repeats itself (a call shape used three functions up, the same guard in
every method). `DraftIndex` keeps the lines of the user's code (open documents
and the files of the workspace folders) and, for a request, proposes the text
that followed the same start elsewhere:

- rest of a line: the last `KEY_CHARS` characters before the cursor are looked
  up anywhere in the indexed text, each match is extended backwards along the
  cursor line, and the draft is the rest of the best-matched line (a line that
  starts like the cursor line's stripped text matches whole; evidence shorter
  than `KEY_CHARS`, but at least `MIN_EVIDENCE`, must match a line whole);
- whole lines (block): the previous non-empty line is looked up among indexed
  lines equal to it; the draft is the lines that followed it, up to the end of
  their block, re-indented to the cursor.

Rest-of-line candidates rank by how many characters before the cursor they
match; whole-line matches and blocks then by how many lines before them also
match the lines before the cursor, then by how often they occur. A draft is cut where it runs into text the
document already has after the cursor, and the cursor line of the requesting
document never drafts itself.

The denoiser checks every draft (`denoiser.native_backend`): a draft is only a
proposal. Memory is bounded by `max_bytes`; documents are replaced whole
(`update`), so an edit costs one pass over that document. Pure Python: no
tokens, no I/O (the caller reads files, see `fim.repo_files`).
"""
from __future__ import annotations

import sys
import threading
from array import array
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable

MIN_EVIDENCE = 4  # characters before the cursor a rest-of-line draft needs
KEY_CHARS = 8  # characters before the cursor looked up anywhere in a line
MAX_MATCHES = 2048  # places a key is looked at (a very common key is weak evidence anyway)
MAX_BLOCK_LINES = 6  # lines a whole-line draft proposes at most
MAX_CONTEXT_LINES = 6  # preceding lines compared when ranking
MAX_OCCURRENCES = 64  # occurrences of one line looked at when ranking (common lines are common)
MAX_LINE_CHARS = 400  # longer lines are not indexed (data, not code)
# What one indexed line costs besides the strings of its text: list slots, its offset, its
# entry in the exact-line map (measured with tracemalloc: 90 to 290 bytes, by how repetitive the code is).
LINE_OVERHEAD_BYTES = 240


@dataclass(frozen=True)
class Draft:
    """A proposed continuation: `text` goes at the cursor; `source` names where it came from."""

    text: str
    source: str
    line: int  # 0-based line of the source the draft starts on
    matched_lines: int  # lines before it that also matched the lines before the cursor
    occurrences: int
    matched_chars: int = 0  # characters before the cursor (or of the anchor line) the source matched
    next_line: bool = False  # the source's next non-empty line is the one the document has after the draft
    rivals: int = 0  # other continuations the same lookup found


class _Document:
    __slots__ = ("text", "lines", "starts", "stripped", "bytes", "pinned")

    def __init__(self, text: str, pinned: bool):
        self.text = text  # searched whole by the rest-of-line lookup (str.find runs at C speed)
        self.lines = text.split("\n")
        self.starts = array("q", [0])  # offset of each line in `text`
        for line in self.lines[:-1]:
            self.starts.append(self.starts[-1] + len(line) + 1)
        self.stripped = [line.strip() if len(line) <= MAX_LINE_CHARS else "" for line in self.lines]
        # The text, each line's own copy and its stripped copy: what the index keeps alive.
        self.bytes = (sys.getsizeof(text) + sum(map(sys.getsizeof, self.lines))
                      + sum(map(sys.getsizeof, self.stripped)) + LINE_OVERHEAD_BYTES * len(self.lines))
        self.pinned = pinned

    def line_at(self, offset: int) -> int:
        return bisect_right(self.starts, offset) - 1


class DraftIndex:
    """Lines of the user's code, by document name; safe to use from several threads.

    Open documents are `pinned`: they are evicted last, and a workspace file
    read from disk never replaces an open document's text (`update(...,
    pinned=False)` is ignored for a name that is open).
    """

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._lock = threading.Lock()
        self._docs: OrderedDict[str, _Document] = OrderedDict()
        self._exact: dict[str, dict[str, list[int]]] = {}  # stripped line -> document -> line numbers

    # --- contents -----------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._docs

    def __len__(self) -> int:
        return len(self._docs)

    def is_pinned(self, name: str) -> bool:
        doc = self._docs.get(name)
        return doc is not None and doc.pinned

    def names(self) -> list[str]:
        with self._lock:
            return list(self._docs)

    def update(self, name: str, text: str, *, pinned: bool = False,
               unless: Callable[[], bool] | None = None) -> None:
        """Index `text` as document `name` (replacing what it held); pinned: an open document.

        `unless` is asked under the index's lock: if it says so, nothing is indexed. A
        completion passes its cancellation, so a document closed while the completion ran
        (whose close dropped it from the index) is not brought back, pinned, for good.
        """
        with self._lock:
            if unless is not None and unless():
                return
            old = self._docs.get(name)
            if old is not None:
                if old.pinned and not pinned:
                    return  # the editor's text wins over the file on disk
                if old.pinned == pinned and old.text == text:
                    self._docs.move_to_end(name)
                    return
                self._remove(name)
            doc = _Document(text, pinned)
            if doc.bytes > self.max_bytes:
                return
            self._docs[name] = doc
            self.bytes += doc.bytes
            for number, key in enumerate(doc.stripped):
                if key:
                    self._exact.setdefault(key, {}).setdefault(name, []).append(number)
            self._evict(keep=name)

    def unpin(self, name: str) -> None:
        """The document closed: its text stays, as a file's would, until the disk's replaces it."""
        with self._lock:
            doc = self._docs.get(name)
            if doc is not None:
                doc.pinned = False

    def remove(self, name: str) -> None:
        with self._lock:
            if name in self._docs:
                self._remove(name)

    def remove_under(self, prefix: str) -> None:
        """Forget every unpinned document whose name starts with `prefix` (a folder left the workspace)."""
        with self._lock:
            for name in [n for n, d in self._docs.items() if n.startswith(prefix) and not d.pinned]:
                self._remove(name)

    def _remove(self, name: str) -> None:
        doc = self._docs.pop(name)
        self.bytes -= doc.bytes
        for key in set(doc.stripped):
            if not key:
                continue
            where = self._exact.get(key)
            if where is None:
                continue
            where.pop(name, None)
            if not where:
                del self._exact[key]

    def _evict(self, keep: str) -> None:
        # Files read from disk go first (oldest first), open documents last.
        for pinned in (False, True):
            for name in [n for n, d in self._docs.items() if d.pinned == pinned]:
                if self.bytes <= self.max_bytes:
                    return
                if name != keep:
                    self._remove(name)

    # --- drafts -------------------------------------------------------------------
    def draft(self, name: str, text: str, offset: int, mode: str) -> Draft | None:
        """The best draft at character `offset` of `text` (document `name`), for span mode "line" or "block"."""
        start = text.rfind("\n", 0, offset) + 1
        end = text.find("\n", offset)
        end = len(text) if end < 0 else end
        before_line, after_line = text[start:offset], text[offset:end]
        cursor_line = text.count("\n", 0, start)
        previous = text[:start].split("\n")[:-1]
        if mode == "line":
            evidence = before_line.lstrip()
            if len(evidence) < MIN_EVIDENCE:
                return None
            return self._rest_of_line(name, cursor_line, evidence, previous, after_line,
                                      _next_non_empty(text, end + 1))
        before = [line.strip() for line in previous if line.strip()]
        if before_line.strip():
            # The cursor ends a line that opens a block: that line is the anchor, the draft starts a new line.
            before.append(before_line.strip())
            anchor_line, anchor_at, typed, lead = before_line, cursor_line, "", "\n"
        elif before:
            anchor_at = max(i for i, line in enumerate(previous) if line.strip())
            anchor_line, typed, lead = previous[anchor_at], before_line, ""
        else:
            return None
        found = self._next_lines(name, anchor_at, before, anchor_line, typed, lead, _next_non_empty(text, end + 1))
        if found is None:
            return None
        following = text[end + 1:].split("\n", 40)[:40] if end < len(text) else []
        return _cut_block(found, after_line, following)

    def _rest_of_line(self, name, cursor_line, evidence, previous, after_line, upcoming) -> Draft | None:
        wanted = [line.strip() for line in previous if line.strip()][-MAX_CONTEXT_LINES:]
        key = evidence[-KEY_CHARS:]
        whole_only = len(evidence) < KEY_CHARS  # a short key alone matches too much
        with self._lock:
            # proposed rest -> [characters matched, context score, next line matched, count, document, line]
            by_text: dict[str, list] = {}
            looked = 0
            for doc_name, doc in reversed(self._docs.items()):  # open and recent documents first
                text, at = doc.text, doc.text.find(key)
                while at >= 0 and looked < MAX_MATCHES:
                    looked += 1
                    line = doc.line_at(at)
                    line_start, after_key = doc.starts[line], at + len(key)
                    line_end = line_start + len(doc.lines[line])
                    at = text.find(key, at + 1)
                    if (doc_name == name and line == cursor_line) or after_key >= line_end:
                        continue
                    matched, whole = _matched_before(text[line_start:after_key], evidence)
                    if whole_only and not whole:
                        continue
                    rest = _cut_rest(text[after_key:line_end], after_line)
                    if rest is None:
                        continue
                    score = self._context_score(doc_name, line, wanted) if whole else -1
                    entry = by_text.get(rest)
                    if entry is not None and (matched, score) < (entry[0], entry[1]):
                        entry[3] += 1  # cannot replace the kept source: the next line need not be read
                        continue
                    follows = upcoming is not None and self._next_stripped(doc, line) == upcoming
                    if entry is None:
                        entry = by_text[rest] = [matched, score, follows, 0, doc_name, line]
                    entry[3] += 1
                    if (matched, score, follows) > (entry[0], entry[1], entry[2]):
                        entry[0], entry[1], entry[2], entry[4], entry[5] = matched, score, follows, doc_name, line
                if looked >= MAX_MATCHES:
                    break
        if not by_text:
            return None
        # Longest match first, then most context before and after, then most frequent, then
        # shortest (the common part of a family of lines).
        rest, (matched, score, follows, count, doc_name, line) = max(
            by_text.items(), key=lambda kv: (kv[1][0], kv[1][1], kv[1][2], kv[1][3], -len(kv[0])))
        return Draft(rest, doc_name, line, max(score, 0), count, matched, follows, len(by_text) - 1)

    @staticmethod
    def _next_stripped(doc: _Document, line: int) -> str | None:
        """The stripped text of the first non-empty line after `line` (None: none within a few lines)."""
        for stripped in doc.stripped[line + 1: line + 1 + MAX_CONTEXT_LINES]:
            if stripped:
                return stripped
        return None

    def _next_lines(self, name, anchor_at, before, anchor_line, typed, lead, upcoming) -> Draft | None:
        with self._lock:
            by_text: dict[str, list] = {}
            for doc_name, line in self._occurrences(before[-1], name, anchor_at):
                lines = self._block_after(doc_name, line)
                if not lines:
                    continue
                score = self._context_score(doc_name, line, before[:-1][-MAX_CONTEXT_LINES:])
                entry = by_text.setdefault("\n".join(lines), [0, 0, doc_name, line, lines])
                entry[1] += 1
                if score > entry[0]:
                    entry[0], entry[2], entry[3] = score, doc_name, line
            best = max(by_text.values(), key=lambda e: (e[0], e[1]), default=None)
            if best is None:
                return None
            score, count, doc_name, line, lines = best
            source_anchor = _indent(self._docs[doc_name].lines[line])
            follows = upcoming is not None and self._next_stripped(self._docs[doc_name], line + len(lines)) == upcoming
        # Re-indent: the draft's first line sits where the source's sat relative to its anchor line.
        first_indent = _indent(lines[0])
        target = typed or _shift(first_indent, source_anchor, _indent(anchor_line))
        out = []
        for i, source_line in enumerate(lines):
            indent = _shift(_indent(source_line), first_indent, target)
            out.append((indent[len(typed):] if i == 0 else indent) + source_line.strip())
        return Draft(lead + "\n".join(out), doc_name, line + 1, score, count, len(before[-1]), follows,
                     len(by_text) - 1)

    def _occurrences(self, key, name, own_line):
        """(document, line) where stripped line `key` occurs, line `own_line` of the requester left out."""
        found = []
        for doc_name, numbers in self._exact.get(key, {}).items():
            for number in numbers:
                if doc_name == name and number == own_line:
                    continue
                found.append((doc_name, number))
                if len(found) >= MAX_OCCURRENCES:
                    return found
        return found

    def _context_score(self, doc_name: str, line: int, wanted: list[str]) -> int:
        """How many of the lines before `line` (non-empty, stripped) equal `wanted`, from the nearest back."""
        stripped = self._docs[doc_name].stripped
        score, i = 0, line - 1
        for expected in reversed(wanted):
            while i >= 0 and not stripped[i]:
                i -= 1
            if i < 0 or stripped[i] != expected:
                break
            score += 1
            i -= 1
        return score

    def _block_after(self, doc_name: str, line: int) -> list[str]:
        """The lines after `line` up to the end of their block (a blank line or a dedent), at most MAX_BLOCK_LINES."""
        lines = self._docs[doc_name].lines
        out: list[str] = []
        first_indent = None
        for source in lines[line + 1: line + 1 + MAX_BLOCK_LINES]:
            if not source.strip() or len(source) > MAX_LINE_CHARS:
                break
            indent = len(_indent(source))
            if first_indent is None:
                first_indent = indent
            elif indent < first_indent:
                break
            out.append(source.rstrip())
        return out


def _matched_before(source: str, evidence: str) -> tuple[int, bool]:
    """(characters of `evidence` that end `source`, whether all of it matched from the line's indentation)."""
    n = 0
    limit = min(len(source), len(evidence))
    while n < limit and source[-1 - n] == evidence[-1 - n]:
        n += 1
    return n, n == len(evidence) and not source[: len(source) - n].strip()


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _shift(indent: str, old_base: str, new_base: str) -> str:
    """`indent` moved from under `old_base` to under `new_base` (same relative depth)."""
    if indent.startswith(old_base):
        return new_base + indent[len(old_base):]
    cut = len(old_base) - len(indent)
    return new_base[: max(0, len(new_base) - cut)]


def _cut_rest(rest: str, after_line: str) -> str | None:
    """A rest-of-line draft stops where the cursor line's own rest begins ("a, b)" before ")" → "a, b");
    None when it would not end where the line already does, or leaves nothing."""
    tail = after_line.strip()
    if tail:
        at = rest.rfind(tail)
        if at < 0:
            return None
        rest = rest[:at]
    rest = rest.rstrip()
    return rest or None


def _cut_block(draft: Draft, after_line: str, following: list[str]) -> Draft | None:
    """A block draft stops at the first line the document already has after the cursor."""
    if after_line.strip():
        return None
    upcoming = next((line.strip() for line in following if line.strip()), None)
    lines = draft.text.split("\n")
    follows = draft.next_line
    if upcoming is not None:
        for i, line in enumerate(lines):
            if line.strip() == upcoming:
                lines, follows = lines[:i], True
                break
    text = "\n".join(lines).rstrip()
    return replace(draft, text=text, next_line=follows) if text.strip() else None


def _next_non_empty(text: str, start: int) -> str | None:
    """The stripped text of the first non-empty line from offset `start` (None: none within a few lines).
    Reads line by line: the rest of a large document is never copied."""
    for _ in range(MAX_CONTEXT_LINES):
        if start > len(text):
            return None
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        line = text[start:end]
        if line.strip():
            return line.strip() if len(line) <= MAX_LINE_CHARS else ""
        start = end + 1
    return None
