"""Typing forward keeps the context's cached keys and values.

The context cache reuses the longest common token prefix of two consecutive
requests (denoiser/kv_cache.py), so how much of a context survives a keystroke
is decided by the window (fim/context.py) and the token layout
(denoiser/context_layout.py). Typed through a real file, a few characters per
request, with the shipped tokenizer and a model context of 192 and 512 tokens
(and with other documents open, whose snippets the preamble shows), at least 90%
of the context tokens must be reused. `parafill bench --typing` measures the same
through a real server.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from denoiser.loading import default_model_dir
from denoiser.native_backend import native_context_ids
from denoiser.tokenizer import CodeTokenizer
from fim import build_request
from lsp_server.settings import Settings
from lsp_server.suggest import context_options

REPO = Path(__file__).resolve().parents[1]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def typed_forward(text: str, start: int, chars: int, step: int):
    """(document, line, character) after typing `text[start:start+chars]` `step` characters at a time."""
    for end in range(start + step, start + chars + 1, step):
        document = text[:end] + text[start + chars:]
        line = text[:end].count("\n")
        yield document, line, end - (text.rfind("\n", 0, end) + 1)


# Other open documents put snippets in the preamble, before the prefix: the snippet
# choice must not change with every line typed either.
OTHER_DOCUMENTS = ("fim/snippets.py", "lsp_server/suggest.py", "denoiser/engine.py")


@pytest.mark.parametrize("model_context, others", [(192, ()), (512, ()), (512, OTHER_DOCUMENTS)])
def test_typing_forward_reuses_nine_tenths_of_the_context(model_context, others):
    tokenizer = CodeTokenizer.load(default_model_dir() / "tokenizer.json")
    text = (REPO / "fim" / "context.py").read_text(encoding="utf-8")
    start = text.index("def build_request(")  # deep in the file: every window is full
    # The server's default contextTokens (1024) is above the model's context: the window
    # must be planned for what the model keeps, as the server plans it.
    options = context_options(Settings(), model_context)
    other_documents = [(name, (REPO / name).read_text(encoding="utf-8")) for name in others]
    reused = total = 0
    previous = None
    for document, line, character in typed_forward(text, start, 1500, 3):
        request = build_request(document, line, character, path="fim/context.py", options=options,
                                other_documents=other_documents)
        ids = native_context_ids(tokenizer, request, model_context)
        assert len(ids) <= model_context
        if previous is not None:
            reused += common_prefix(previous, ids)
            total += len(ids)
        previous = ids
    assert reused / total >= 0.9, f"only {reused / total:.0%} of the context reused while typing"
