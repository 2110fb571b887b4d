"""LSP positions (line, UTF-16 code unit) to Python string offsets and back.

LSP counts a position's `character` in UTF-16 code units, while a Python `str`
is indexed by code points: every character outside the Basic Multilingual Plane
(emoji, rare CJK) is one code point but two UTF-16 units. Lines end at "\\n",
"\\r\\n" or "\\r", as the LSP specification says (not at the extra separators
that `str.splitlines` knows, such as U+2028 or form feed).

Conversions never raise on out-of-range input: a negative line or character is
0, a character past the end of its line is the end of that line (before the
line ending), a line past the end of the document is the end of the document,
and a character that falls between the two halves of a surrogate pair snaps to
the start of the pair. A lone surrogate in the text (possible in a Python str)
counts as one unit, as it would in UTF-16.

This module knows nothing of the model, tokens or windows.
"""
from __future__ import annotations

import re
from bisect import bisect_right
from itertools import islice
from dataclasses import dataclass

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# Code points that take two UTF-16 code units.
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def utf16_length(text: str) -> int:
    """Length of `text` in UTF-16 code units."""
    if text.isascii():
        return len(text)
    return len(text) + sum(1 for _ in _ASTRAL.finditer(text))


def utf16_to_index(line_text: str, character: int) -> int:
    """Index into `line_text` of the UTF-16 `character`, clamped to [0, len]."""
    if character <= 0:
        return 0
    if line_text.isascii():
        return min(character, len(line_text))
    extra = 0  # astral characters seen so far: each adds one unit beyond its index
    for match in _ASTRAL.finditer(line_text):
        start_units = match.start() + extra
        if character <= start_units:
            break
        if character == start_units + 1:
            # Inside the surrogate pair: snap to the pair's start.
            return match.start()
        extra += 1
    return min(character - extra, len(line_text))


def index_to_utf16(line_text: str, index: int) -> int:
    """UTF-16 column of `index` in `line_text`, clamped to the line."""
    index = max(0, min(index, len(line_text)))
    return utf16_length(line_text[:index])


def line_ending(text: str) -> str:
    """The line ending a document uses: its first one, or "\\n" when it has none."""
    match = _LINE_BREAK.search(text)
    return match.group() if match else "\n"


def normalize_line_endings(text: str) -> str:
    """Turn "\\r\\n" and lone "\\r" into "\\n" (the model sees only "\\n")."""
    if "\r" not in text:
        return text
    return text.replace("\r\n", "\n").replace("\r", "\n")


@dataclass(frozen=True)
class LineIndex:
    """Start offsets of every line of one document, for repeated conversions."""

    text: str
    starts: tuple[int, ...]

    @classmethod
    def of(cls, text: str) -> "LineIndex":
        starts = [0]
        starts.extend(m.end() for m in _LINE_BREAK.finditer(text))
        return cls(text, tuple(starts))

    @property
    def line_count(self) -> int:
        """Number of lines; a document ending in a line break has an empty last line."""
        return len(self.starts)

    def line_bounds(self, line: int) -> tuple[int, int]:
        """(start, end) offsets of a line's content, without its line ending."""
        line = max(0, min(line, len(self.starts) - 1))
        start = self.starts[line]
        if line + 1 < len(self.starts):
            end = self.starts[line + 1] - 1
            if end > start and self.text[end] == "\n" and self.text[end - 1] == "\r":
                end -= 1
        else:
            end = len(self.text)
        return start, end

    def line_text(self, line: int) -> str:
        start, end = self.line_bounds(line)
        return self.text[start:end]

    def offset_at(self, line: int, character: int) -> int:
        """Offset of an LSP position, clamped into the document."""
        if line < 0:
            return 0
        if line >= len(self.starts):
            return len(self.text)
        start, end = self.line_bounds(line)
        return start + utf16_to_index(self.text[start:end], character)

    def position_at(self, offset: int) -> tuple[int, int]:
        """LSP (line, character) of an offset, clamped into the document.

        An offset between "\\r" and "\\n" (not a valid LSP position) maps to the
        end of that line.
        """
        offset = max(0, min(offset, len(self.text)))
        line = bisect_right(self.starts, offset) - 1
        start, end = self.line_bounds(line)
        return line, index_to_utf16(self.text[start:end], min(offset, end) - start)


def resolve_position(text: str, line: int, character: int) -> tuple[int, int]:
    """(line, offset) of an LSP position: the line clamped into the document and the
    offset clamped into that line (or the document's end for a line past it).

    Cheaper than building a `LineIndex` for one conversion: only the lines up to
    `line` are scanned.
    """
    if line <= 0 or not text:
        start, reached = 0, 0
    elif "\r" not in text:
        parts = text.split("\n", line)
        reached, start = len(parts) - 1, len(text) - len(parts[-1])
    else:
        reached, start = 0, 0
        for match in islice(_LINE_BREAK.finditer(text), line):
            reached, start = reached + 1, match.end()
    if line > reached:
        return reached, len(text)
    brk = _LINE_BREAK.search(text, start)
    end = brk.start() if brk else len(text)
    return reached, start + utf16_to_index(text[start:end], character)


def offset_at(text: str, line: int, character: int) -> int:
    """Offset in `text` of the LSP position (line, character), clamped."""
    return resolve_position(text, line, character)[1]


def position_at(text: str, offset: int) -> tuple[int, int]:
    """LSP (line, character) of offset `offset` in `text`, clamped."""
    if "\r" in text:
        return LineIndex.of(text).position_at(offset)
    offset = max(0, min(offset, len(text)))
    start = text.rfind("\n", 0, offset) + 1
    return text.count("\n", 0, offset), utf16_length(text[start:offset])
