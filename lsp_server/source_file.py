"""How `parafill complete` reads the file it completes in: bytes on disk to text.

An editor sends the server text; from a terminal the bytes must be read as an
editor would read them. A file with NUL bytes is binary and refused. A
byte-order mark says UTF-8, UTF-16 or UTF-32. Otherwise a coding declaration
on line 1 or 2 (`# -*- coding: latin-1 -*-`, PEP 263, as Python, Emacs and Vim
read it) names the encoding, and without one the file is UTF-8; bytes that are
not get U+FFFD and a warning that says how many and where the first one is.
This module reads one file; it knows nothing of models or LSP.
"""
from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from pathlib import Path

# PEP 263: a comment on line 1 or 2 holding "coding: NAME" or "coding=NAME".
_CODING = re.compile(rb"^[ \t\f]*#.*?coding[:=][ \t]*([-\w.]+)")
# UTF-32's little-endian mark begins with UTF-16's, so it is tried first.
_BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_REPLACEMENT_UTF8 = "\ufffd".encode("utf-8")


class UnreadableSource(Exception):
    """The file is not text parafill can complete in; the message says why."""


@dataclass(frozen=True)
class SourceText:
    text: str
    encoding: str  # the codec that decoded it
    warning: str | None = None  # what had to be replaced, and how to avoid it


def read_source(path: Path) -> SourceText:
    """The text of the file at `path`; OSError if it cannot be read, UnreadableSource if it is not text."""
    return decode_source(path.read_bytes(), str(path))


def decode_source(data: bytes, name: str) -> SourceText:
    """`data` decoded as an editor would; `name` is how messages call the file."""
    for mark, encoding in _BYTE_ORDER_MARKS:
        if data.startswith(mark):
            try:
                return SourceText(data.decode(encoding), encoding)
            except UnicodeDecodeError:
                break  # a mark by accident: judge the bytes as they are
    if b"\x00" in data:
        raise UnreadableSource(f"{name}: this is a binary file (it contains NUL bytes); "
                               "parafill completes in text files")
    note = ""
    declared = coding_declaration(data)
    if declared is not None:
        try:
            return SourceText(data.decode(declared), codecs.lookup(declared).name)
        except LookupError:
            note = f"its coding declaration names {declared!r}, an encoding Python does not know; "
        except UnicodeDecodeError:
            note = f"it is not valid {declared} as its coding declaration says; "
    try:
        return SourceText(data.decode("utf-8"), "utf-8")
    except UnicodeDecodeError as exc:
        first_bad = exc.start
    text = data.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd") - data.count(_REPLACEMENT_UTF8)
    before = data[:first_bad]
    line = before.count(b"\n") + 1
    column = len(before.rsplit(b"\n", 1)[-1].decode("utf-8", errors="replace")) + 1
    return SourceText(text, "utf-8", warning=(
        f"{name}: {note}not valid UTF-8: {replaced} undecodable byte sequence{'s' if replaced != 1 else ''} "
        f"read as U+FFFD (the first at line {line}, column {column}); save the file as UTF-8, or declare "
        "its encoding on line 1 or 2, e.g. `# -*- coding: latin-1 -*-`"))


def coding_declaration(data: bytes) -> str | None:
    """The encoding a coding declaration on line 1 or 2 names, or None."""
    for line in data.splitlines()[:2]:
        match = _CODING.match(line)
        if match:
            return match.group(1).decode("ascii")
    return None
