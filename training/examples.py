"""FIM training examples cut from real files at character positions.

An editor's cursor can sit anywhere, so examples are split at character
positions (not token boundaries) and prefix, middle and suffix are tokenized
separately, exactly as inference does. Three kinds of cut, matching the
span plans of `fim/`: the rest of a line, whole lines from an empty line, and
a random span.

Must not: read files, touch tensors on a device, or know the training loop.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from denoiser.config import EOS_ID
from denoiser.context_layout import context_ids
from denoiser.tokenizer import CodeTokenizer

COMMENT_BY_LANGUAGE = {"python": "# ", "javascript": "// ", "typescript": "// "}


@dataclass(frozen=True)
class TextSplit:
    preamble: str
    prefix: str
    middle: str
    suffix: str
    kind: str


@dataclass(frozen=True)
class TokenExample:
    context: list[int]   # suffix-prefix-middle layout, ends with <fim_middle>
    middle: list[int]    # middle tokens, then <eos> when the middle is complete
    kind: str


def header_for(path: str, language: str) -> str:
    comment = COMMENT_BY_LANGUAGE.get(language, "# ")
    return f"{comment}path: {path}\n"


def split_text(text: str, path: str, language: str, rng: random.Random, max_chars: int = 6000) -> TextSplit | None:
    """Cut one FIM example out of a file, or None if the file offers no good cut."""
    lines = text.splitlines(keepends=True)
    if len(lines) < 3:
        return None
    kind = rng.choices(("line", "block", "random"), weights=(0.45, 0.40, 0.15))[0]
    row = rng.randrange(len(lines))
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    line = lines[row]
    body = line.rstrip("\r\n")
    if kind == "line":
        if not body.strip():
            return None
        indent = len(body) - len(body.lstrip())
        col = rng.randrange(indent, len(body))
        start = starts[row] + col
        end = starts[row] + len(body)
    elif kind == "block":
        # The editor user sits on an empty line (maybe indented) and the middle
        # is one or more whole lines; the line's own newline stays in the suffix.
        count = rng.choice((1, 1, 1, 2, 2, 3, 4))
        last = min(len(lines), row + count) - 1
        block = "".join(lines[row : last + 1]).rstrip("\r\n")
        if not block.strip():
            return None
        lead = len(body) - len(body.lstrip()) if rng.random() < 0.5 else 0
        start = starts[row] + lead
        end = starts[row] + len(block)
    else:
        start = rng.randrange(len(text))
        end = min(len(text), start + rng.randint(1, 120))
    if end <= start:
        return None
    prefix = text[max(0, start - max_chars) : start]
    suffix = text[end : end + max_chars // 3]
    preamble = header_for(path, language) if rng.random() < 0.5 else ""
    return TextSplit(preamble, prefix, text[start:end], suffix, kind)


def tokenize_splits(
    tokenizer: CodeTokenizer, splits: list[TextSplit], context_tokens: int, span_tokens: int
) -> list[TokenExample]:
    """Tokenize pieces separately; keep the end of the prefix and the start of the suffix."""
    pieces = tokenizer.encode_batch([t for s in splits for t in (s.preamble, s.prefix, s.middle, s.suffix)])
    out = []
    for i, split in enumerate(splits):
        preamble, prefix, middle, suffix = pieces[4 * i : 4 * i + 4]
        if not middle:
            continue
        if len(middle) >= span_tokens:
            middle = middle[:span_tokens]  # no <eos>: the span is full and would grow
        else:
            middle = middle + [EOS_ID]
        out.append(TokenExample(context_ids(preamble, prefix, suffix, context_tokens), middle, split.kind))
    return out

