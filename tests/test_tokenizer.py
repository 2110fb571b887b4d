"""The native tokenizer wrapper: separate pieces round-trip, odd text never raises."""
from __future__ import annotations

from pathlib import Path

import pytest

from denoiser.config import SPECIAL_TOKENS
from denoiser.tokenizer import CodeTokenizer

SHIPPED = Path(__file__).resolve().parents[1] / "denoiser" / "default_model" / "tokenizer.json"


@pytest.fixture(scope="module")
def tokenizer() -> CodeTokenizer:
    return CodeTokenizer.load(SHIPPED)


def test_special_tokens_have_fixed_ids(tokenizer):
    for expected, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer._tok.token_to_id(token) == expected


@pytest.mark.parametrize("pieces", [
    ("def f(x):\n    ret", "urn x + 1", "\n\nprint(f(2))\n"),
    ("const a = [1, 2", "];", "\r\nexport default a;\t"),
    ("# 注释 ", "😀 emoji", "\x00 nul and \x1b escape"),
])
def test_pieces_encoded_separately_decode_to_their_concatenation(tokenizer, pieces):
    ids = [i for piece in pieces for i in tokenizer.encode(piece)]
    assert tokenizer.decode(ids) == "".join(pieces)


def test_lone_surrogates_become_replacement_characters(tokenizer):
    # Seen in the soak: an editor sent "\ud800" escapes and encoding raised TypeError.
    assert tokenizer.decode(tokenizer.encode("a\ud800b")) == "a\ufffdb"
    batch = tokenizer.encode_batch(["x\udfff", "plain"])
    assert tokenizer.decode(batch[0]) == "x\ufffd"
    assert tokenizer.decode(batch[1]) == "plain"
