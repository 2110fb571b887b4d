"""Tokenizer training: layout of the vocabulary and exact round trips.

Trains a small tokenizer on generated code in a few seconds, and checks the
shipped denoiser/default_model/tokenizer.json with the same properties.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from training.tokenizer_train import (
    SPECIAL_TOKENS,
    WHITESPACE_TOKENS,
    main,
    sample_texts,
    split_like_added_tokens,
    train_tokenizer,
)

SHIPPED = Path(__file__).resolve().parents[1] / "denoiser" / "default_model" / "tokenizer.json"

ROUND_TRIP = [
    "def f(x):\n    return x + 1\n",
    " leading space",
    "  two leading spaces and trailing   ",
    "\tif (a) {\r\n\t\treturn b;\r\n\t}\r\n",
    "naïve café — ünïcödé ✓ 漢字 テスト",
    "emoji 🎉👩‍👩‍👧 and flags 🇫🇷",
    "mixed \t tabs\t\t\tand    spaces        end",
    "\n\n\n",
    "x" * 300,
    "<|fim_prefix|> literal special text in code <|eos|>",
    "\u0000\u0007 control \u200b zero width",
]


def corpus_texts() -> list[str]:
    texts = []
    for i in range(150):
        texts.append(
            f"class Widget{i}:\n"
            f"    def __init__(self, value={i}):\n"
            f"        self.value = value\n"
            f"        if value > {i % 7}:\n"
            f"            for item in range(value):\n"
            f"                print(item, 'widget {i}')\n"
            f"\n"
            f"    def render(self):\n"
            f"        return f\"<div>{{self.value}}</div>\"\n"
        )
        texts.append(f"export function add{i}(a: number, b: number): number {{\n  return a + b + {i};\n}}\n")
    return texts


@pytest.fixture(scope="module")
def small_tokenizer():
    return train_tokenizer(corpus_texts(), 600)


def check_properties(tok: Tokenizer):
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i
    for ws in WHITESPACE_TOKENS:
        assert len(tok.encode(ws, add_special_tokens=False).ids) == 1, repr(ws)
    for text in ROUND_TRIP:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert tok.decode(ids, skip_special_tokens=True) == text if "<|" not in text else True
    # Pieces encoded separately concatenate exactly (prefix | middle | suffix).
    for whole in ROUND_TRIP[:7]:
        for cut1 in range(0, len(whole), 3):
            for cut2 in (cut1, min(len(whole), cut1 + 5)):
                parts = [whole[:cut1], whole[cut1:cut2], whole[cut2:]]
                ids = [i for p in parts for i in tok.encode(p, add_special_tokens=False).ids]
                assert tok.decode(ids, skip_special_tokens=False) == whole


def test_small_trained_tokenizer_layout_and_round_trip(small_tokenizer):
    assert small_tokenizer.get_vocab_size() == 600
    check_properties(small_tokenizer)


def test_no_prefix_space_is_added(small_tokenizer):
    a = small_tokenizer.encode("return", add_special_tokens=False).ids
    b = small_tokenizer.encode(" return", add_special_tokens=False).ids
    assert a != b
    assert small_tokenizer.decode(a) == "return"


def test_indentation_is_one_token(small_tokenizer):
    ids = small_tokenizer.encode("        x", add_special_tokens=False).ids
    assert ids[0] == small_tokenizer.token_to_id(" " * 8)
    # Whitespace tokens are not special: decoding with skip_special_tokens keeps them.
    assert small_tokenizer.decode(ids, skip_special_tokens=True) == "        x"


def test_split_like_added_tokens_is_leftmost_longest():
    assert split_like_added_tokens("a" + " " * 10 + "b") == ["a", "b"]  # 8 + 2
    assert split_like_added_tokens("a" + " " * 5 + "b") == ["a", " b"]  # 4 + the space stays with b
    assert split_like_added_tokens("x\t\t\ty") == ["x", "y"]
    assert split_like_added_tokens("x y") == ["x y"]


def test_vocab_limit_is_enforced():
    with pytest.raises(ValueError, match="at most 16384"):
        train_tokenizer(["x"], 20000)


def test_sample_shares_budget_between_languages():
    records = [{"language": "python", "text": "p" * 100}] * 50 + [{"language": "typescript", "text": "t" * 100}] * 50
    texts = sample_texts(records, 2000, Counter(python=5000, typescript=5000))
    counts = Counter(t[0] for t in texts)
    assert counts["p"] == 17 and counts["t"] == 2  # 0.75/0.875 and 0.125/0.875 of 2000 bytes
    only_py = sample_texts(records[:50], 2000, Counter(python=5000))
    assert len(only_py) == 20


def test_cli_trains_from_a_corpus_directory(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with gzip.open(corpus / "train.jsonl.gz", "wt") as fh:
        for t in corpus_texts():
            fh.write(json.dumps({"language": "python", "text": t}) + "\n")
    out = tmp_path / "tok" / "tokenizer.json"
    assert main(["--corpus", str(corpus), "--vocab", "512", "--out", str(out)]) == 0
    tok = Tokenizer.from_file(str(out))
    assert tok.get_vocab_size() == 512
    check_properties(tok)


@pytest.mark.skipif(not SHIPPED.exists(), reason="default tokenizer not built yet")
def test_shipped_tokenizer():
    tok = Tokenizer.from_file(str(SHIPPED))
    assert tok.get_vocab_size() <= 16384
    check_properties(tok)
    # Trained on code: common Python fragments are single tokens.
    assert len(tok.encode(" return", add_special_tokens=False).ids) == 1
    assert len(tok.encode("def", add_special_tokens=False).ids) == 1
