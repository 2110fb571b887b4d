"""Turn the denoiser's raw fill into the text an editor shows, or into nothing.

Rules, in the order they run:

1. Clean: line endings become "\\n"; control characters other than tab and
   newline are dropped (an editor buffer is no place for them).
2. End of span: a "line" span stops at its first newline; a "block" span keeps
   whole lines and stops at the first line dedented below the block it started
   in (a line back at the cursor line's indentation that only closes brackets
   ends a block the cursor line opened, and is kept).
3. Trailing whitespace is trimmed on every line and at the end; the only
   exception is the indentation that the last line gives to text the suffix
   still has on the cursor line.
4. Brackets: a closer in the completion that does not close one of the
   completion's own openers is cut off, with everything after it, when the
   brackets of the surrounding code balance better without it (the suffix
   already supplies it).
5. Suffix overlap: whole lines at the end of the completion that repeat the
   first lines of the suffix are dropped, and so is text at the end of the last
   line that repeats the start of the suffix ("x)" before ")" becomes "x"),
   unless that would unbalance brackets or quotes.
6. Useless: nothing left, only whitespace, or text the suffix already starts
   with gives None (no item).
7. Python strings (`leaves_a_string_open`, read over the whole document by the
   caller, since a window may start inside a docstring): a completion that leaves
   a triple-quoted string open, where the document had none open, gives no item:
   it would turn the code after it into a string (a lone \"\"\" on an empty line in a
   function body is what a small model most often writes with confidence).

This module sees text only: no tokens, no model. Bracket counting is a cheap
line-based scan (strings and line comments skipped), good enough to compare two
variants of the same code, not a parser.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from fim.languages import line_comment_marker
from fim.positions import normalize_line_endings
from fim.request import FimRequest

_OPENERS = "([{"
_CLOSERS = ")]}"
_MATCHING = {")": "(", "]": "[", "}": "{"}
_DEFAULT_QUOTES = "\"'`"
# Languages where an apostrophe is not (only) a string delimiter (lifetimes,
# primes, quoting, prose).
_QUOTES_BY_LANGUAGE = {
    "rust": '"', "haskell": '"', "elm": '"', "ocaml": '"', "lisp": '"', "clojure": '"',
    "plaintext": '"', "markdown": '"', "latex": "", "python": "\"'", "c": "\"'", "cpp": "\"'",
    "java": "\"'", "csharp": "\"'",
}
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# How much surrounding code the bracket comparison reads, each side.
_SCAN_LINES = 40
_SCAN_CHARS = 3000
# Longest repeat of the suffix's start looked for (keeps the search linear-ish).
_MAX_OVERLAP = 400


@dataclass(frozen=True)
class _Surroundings:
    prefix_line: str  # cursor line before the cursor
    suffix_line: str  # cursor line after the cursor
    prefix_tail: str  # the last lines of the prefix, for bracket counting
    suffix_head: str  # the first lines of the suffix, for bracket counting
    suffix: str
    comment: str | None
    quotes: str

    def imbalance(self, completion: str) -> int:
        return _imbalance(self.prefix_tail + completion + self.suffix_head, self.comment, self.quotes)


def postprocess(raw: str, request: FimRequest) -> str | None:
    """The suggestion to show for the model's fill `raw`, or None when there is none."""
    if not raw:
        return None
    text = _CONTROL.sub("", normalize_line_endings(raw))
    around = _surroundings(request)

    if request.span.mode == "line":
        text = text.split("\n", 1)[0]
    else:
        text = _stop_at_dedent(text, around.prefix_line)
    text = _trim_trailing_space(text, around)
    text = _cut_duplicate_closer(text, around)
    text = _drop_repeated_lines(text, around)
    text = _drop_repeated_suffix_start(text, around)
    if not text.strip() or _suffix_starts_with(around.suffix, text):
        return None
    return text


def leaves_a_string_open(before: str, completion: str, after: str) -> bool:
    """Python: True when `before + after` has no triple-quoted string left open and
    `before + completion + after` has one (the completion would swallow the code after it)."""
    if _open_triple_quote(before + after) is not None:
        return False  # already open (a document being written): nothing to judge by
    return _open_triple_quote(before + completion + after) is not None


# Python's string and comment tokens, enough to track triple quotes: a triple quote, a
# comment, or a one-line string (possibly unterminated at the line end).
_PY_TOKEN = re.compile(r'"""|\'\'\'|#[^\n]*|"(?:\\.|[^"\\\n])*"?|\'(?:\\.|[^\'\\\n])*\'?')


def _open_triple_quote(code: str) -> str | None:
    """The triple quote left open at the end of Python `code` (None: none); escapes honoured."""
    i = 0
    while True:
        found = _PY_TOKEN.search(code, i)
        if found is None:
            return None
        i = found.end()
        quote = found.group()
        if quote not in ('"""', "'''"):
            continue
        close = code.find(quote, i)
        while close >= 0 and _escaped(code, close):
            close = code.find(quote, close + 1)
        if close < 0:
            return quote
        i = close + 3


def _escaped(code: str, at: int) -> bool:
    """Whether the character at `at` follows an odd run of backslashes."""
    start = at
    while start > 0 and code[start - 1] == "\\":
        start -= 1
    return (at - start) % 2 == 1


def _surroundings(request: FimRequest) -> _Surroundings:
    prefix, suffix = normalize_line_endings(request.prefix), normalize_line_endings(request.suffix)
    # The last whole lines of the prefix, at most about _SCAN_CHARS characters.
    cut = prefix.rfind("\n", 0, max(0, len(prefix) - _SCAN_CHARS)) + 1
    if len(prefix) - cut > 2 * _SCAN_CHARS:
        cut = len(prefix) - _SCAN_CHARS  # one giant line
    lines = prefix[cut:].split("\n")[-_SCAN_LINES:]
    prefix_tail = "\n".join(lines)
    head = suffix[:_SCAN_CHARS].split("\n")[:_SCAN_LINES]
    quotes = _QUOTES_BY_LANGUAGE.get(request.language, _DEFAULT_QUOTES)
    return _Surroundings(
        prefix_line=prefix[prefix.rfind("\n") + 1 :],
        suffix_line=suffix.split("\n", 1)[0],
        prefix_tail=prefix_tail,
        suffix_head="\n".join(head),
        suffix=suffix,
        comment=line_comment_marker(request.language),
        quotes=quotes,
    )


def _indent_width(line: str) -> int:
    stripped = line.lstrip(" \t")
    return len(line[: len(line) - len(stripped)].expandtabs(4))


def _only_closers(line: str) -> bool:
    body = line.strip()
    return bool(body) and all(ch in _CLOSERS or ch in ",;" for ch in body)


def _stop_at_dedent(text: str, prefix_line: str) -> str:
    """Whole lines of a block completion, up to the first that leaves the block."""
    lines = text.split("\n")
    cursor_indent = _indent_width(prefix_line)
    if lines[0].strip():
        if not prefix_line.strip():
            # The cursor sits in the indentation: the first line's own leading
            # whitespace adds to it.
            cursor_indent = _indent_width(prefix_line + lines[0])
        base, first_body, closing_allowed = cursor_indent, 1, False
    else:
        # The completion ends the cursor line first ("def f():" + "\n    body"):
        # the block is as deep as its first non-blank line.
        body = next((i for i in range(1, len(lines)) if lines[i].strip()), None)
        if body is None:
            return text
        base, first_body = _indent_width(lines[body]), body + 1
        closing_allowed = bool(prefix_line.strip())
        not_nested = closing_allowed and base == cursor_indent and not _only_closers(lines[body])
        if base < cursor_indent or not_nested:
            return "\n".join(lines[:body])
    for i in range(first_body, len(lines)):
        line = lines[i]
        if not line.strip():
            continue
        width = _indent_width(line)
        if width >= base:
            continue
        if closing_allowed and width == cursor_indent and _only_closers(line):
            return "\n".join(lines[: i + 1])
        return "\n".join(lines[:i])
    return text


def _trim_trailing_space(text: str, around: _Surroundings) -> str:
    lines = text.split("\n")
    trimmed = "\n".join(line.rstrip() for line in lines).rstrip()
    last = lines[-1]
    if trimmed and len(lines) > 1 and last and not last.strip() and around.suffix_line.strip():
        # "y = 1\n    " before "return x": the last line indents the suffix's text.
        return trimmed + "\n" + last
    return trimmed


def _foreign_closer(text: str, comment: str | None, quotes: str) -> int | None:
    """Index of the first closer in `text` that closes no opener of `text` itself."""
    stack: list[str] = []
    offset = 0
    for line in text.split("\n"):
        for index, ch in _scan_line(line, comment, quotes)[0]:
            if ch in _OPENERS:
                stack.append(ch)
            elif stack and stack[-1] == _MATCHING[ch]:
                stack.pop()
            else:
                return offset + index
        offset += len(line) + 1
    return None


def _cut_duplicate_closer(text: str, around: _Surroundings) -> str:
    at = _foreign_closer(text, around.comment, around.quotes)
    if at is None:
        return text
    shorter = text[:at].rstrip()
    if around.imbalance(shorter) < around.imbalance(text):
        return shorter
    return text


def _drop_repeated_lines(text: str, around: _Surroundings) -> str:
    """Drop the completion's last lines when the suffix's first lines say the same."""
    lines = text.split("\n")
    suffix_lines = around.suffix.split("\n")
    if not around.suffix_line.strip():
        # Cursor line ends at the cursor: compare with the lines after it.
        targets, keep_last = suffix_lines[1:], False
    elif len(lines) > 1 and not lines[-1].strip():
        # The completion ends by indenting the suffix's text: compare the lines
        # before that indentation with the suffix from the cursor on.
        targets, keep_last = suffix_lines, True
        lines = lines[:-1]
    else:
        return text
    for k in range(min(len(lines), len(targets)), 0, -1):
        tail = lines[len(lines) - k :]
        if any(a.strip() for a in tail) and all(
            a.strip() == b.strip() for a, b in zip(tail, targets)
        ):
            kept = lines[: len(lines) - k]
            if keep_last:
                kept.append(text.split("\n")[-1])
            return "\n".join(kept)
    return text


def _drop_repeated_suffix_start(text: str, around: _Surroundings) -> str:
    """Drop text at the end of the completion that the suffix's line starts with."""
    suffix_line = around.suffix_line
    last = text[text.rfind("\n") + 1 :]
    for size in range(min(len(last), len(suffix_line), _MAX_OVERLAP), 0, -1):
        overlap = suffix_line[:size]
        if not last.endswith(overlap) or not overlap.strip():
            continue
        shorter = text[: len(text) - size]
        if any(ch in _OPENERS or ch in _CLOSERS or ch in around.quotes for ch in overlap):
            if around.imbalance(shorter) >= around.imbalance(text):
                continue
        return shorter
    return text


def _suffix_starts_with(suffix: str, text: str) -> bool:
    """True when the code right after the cursor already is `text` (ignoring indentation)."""
    wanted = text.strip()
    rest = suffix.lstrip()
    if not rest.startswith(wanted):
        return False
    following = rest[len(wanted) : len(wanted) + 1]
    return not (following and _is_word(following) and _is_word(wanted[-1]))


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _scan_line(line: str, comment: str | None, quotes: str) -> tuple[list[tuple[int, str]], bool]:
    """The brackets of one line outside strings and comments, as (index, bracket),
    and whether the line ends inside a string (template literals may span lines)."""
    brackets: list[tuple[int, str]] = []
    quote = None
    i, n = 0, len(line)
    while i < n:
        ch = line[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch in quotes:
            quote = ch
        elif comment and line.startswith(comment, i):
            break
        elif ch in _OPENERS or ch in _CLOSERS:
            brackets.append((i, ch))
        i += 1
    return brackets, quote is not None and quote != "`"


def _imbalance(code: str, comment: str | None, quotes: str) -> int:
    """Unmatched brackets plus unterminated strings: 0 for balanced code."""
    stack: list[str] = []
    bad = 0
    for line in code.split("\n"):
        brackets, unterminated = _scan_line(line, comment, quotes)
        for _, ch in brackets:
            if ch in _OPENERS:
                stack.append(ch)
            elif stack and stack[-1] == _MATCHING[ch]:
                stack.pop()
            else:
                bad += 1
        bad += unterminated
    return bad + len(stack)
