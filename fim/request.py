"""The fill-in-the-middle request: what the denoiser is asked to fill.

This is the one type shared by `fim/`, `denoiser/` and `lsp_server/`. It holds
text only (no tokens, no tensors); the denoiser backend decides how to turn it
into token ids for its model.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

SpanMode = Literal["line", "block"]


@dataclass(frozen=True)
class SpanPlan:
    """How much the model may write at the cursor.

    mode "line": the rest of the current line (the cursor sits after code on a
    line); "block": one or more lines (the cursor is on an empty or
    whitespace-only line, or right after a line that opens a block).
    """

    mode: SpanMode
    max_tokens: int


@dataclass(frozen=True)
class Snippet:
    """A region of another open document that looks like the cursor region."""

    path: str
    text: str


@dataclass(frozen=True)
class DraftEvidence:
    """How well a draft's source matched the cursor's surroundings (`fim.drafts.Draft`)."""

    matched_chars: int = 0  # characters before the cursor the source also had
    matched_lines: int = 0  # lines before those that matched too
    occurrences: int = 0  # places in the user's code the same continuation follows
    next_line: int = 0  # 1: the source's next line is the one the document has after the draft
    rivals: int = 0  # other continuations the lookup found
    same_document: int = 0  # 1: the draft comes from the document being completed


@dataclass(frozen=True)
class FimRequest:
    """Everything the model sees, plus what post-processing needs.

    The model's context is, in this order of meaning: `preamble` (file header
    comment and snippets), `prefix` (text before the cursor inside the window),
    then the span to fill, then `suffix` (text after the cursor inside the
    window). Backends lay these out in their own token order.
    """

    preamble: str
    prefix: str
    suffix: str
    span: SpanPlan
    language: str = "plaintext"
    path: str = ""
    snippets: tuple[Snippet, ...] = field(default=())
    # A proposed fill from the user's own code (`fim.drafts`); the model checks and repairs it.
    draft: str = ""
    draft_evidence: DraftEvidence = field(default=DraftEvidence())

    def context_key(self) -> str:
        """Identity of the model's input: two requests with equal keys get the same fill. A digest,
        so a cache of answers holds 32 characters per entry rather than a copy of the context."""
        digest = hashlib.blake2b(digest_size=16)
        evidence = self.draft_evidence
        for part in (self.preamble, self.prefix, self.suffix, self.span.mode, str(self.span.max_tokens), self.draft,
                     f"{evidence.matched_chars},{evidence.matched_lines},{evidence.occurrences}"):
            data = part.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "little"))  # lengths first: no two splits hash alike
            digest.update(data)
        return digest.hexdigest()
