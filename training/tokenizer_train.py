"""Train the default model's byte-level BPE tokenizer on the corpus.

    RAYON_NUM_THREADS=1 python -m training.tokenizer_train --corpus data/corpus \
        --vocab 8192 --out denoiser/default_model/tokenizer.json

Layout of the vocabulary (``--vocab`` is the total size):
  ids 0..5   the special tokens, in SPECIAL_TOKENS order;
  then       the byte alphabet and learned merges;
  last       added (non-special) tokens for runs of spaces and tabs, so
             indentation costs one token.

No normaliser, no prefix space, byte-level decoding: ``decode(encode(x)) == x``
for any string, and pieces encoded separately concatenate exactly (the model
encodes prefix, middle and suffix apart).  Training only: this module does not
load tokenizers for inference (``denoiser/tokenizer.py`` does).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

SPECIAL_TOKENS = ("<|pad|>", "<|eos|>", "<|mask|>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
INDENT_SPACES = (2, 4, 8, 12, 16, 20, 24, 32)
INDENT_TABS = (2, 3, 4, 5, 6)
WHITESPACE_TOKENS = tuple(" " * n for n in INDENT_SPACES) + tuple("\t" * n for n in INDENT_TABS)
LANGUAGE_WEIGHTS = {"python": 0.75, "javascript": 0.125, "typescript": 0.125}

# The added tokens split text before BPE sees it (leftmost-longest match);
# training pieces are split the same way so no merges are spent on them.
_WHITESPACE_SPLIT = re.compile(
    "(" + "|".join(re.escape(t) for t in sorted(WHITESPACE_TOKENS, key=len, reverse=True)) + ")"
)


def split_like_added_tokens(text: str) -> list[str]:
    """The pieces BPE sees once the whitespace tokens have been matched."""
    return [p for p in _WHITESPACE_SPLIT.split(text) if p and p not in WHITESPACE_TOKENS]


def read_records(path: Path) -> Iterator[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)


def sample_texts(records: Iterable[dict], budget_bytes: int, available: Counter) -> list[str]:
    """Texts up to ``budget_bytes``, shared between languages by LANGUAGE_WEIGHTS.

    Languages absent from the corpus give their share to the others.  The
    records' order (fixed by the corpus builder) decides which files are
    taken, so the sample is deterministic.
    """
    present = {lang: LANGUAGE_WEIGHTS.get(lang, 0.05) for lang in available if available[lang] > 0}
    total_w = sum(present.values()) or 1.0
    quota = {lang: min(available[lang], int(budget_bytes * w / total_w)) for lang, w in present.items()}
    used: Counter = Counter()
    texts = []
    for rec in records:
        lang = rec["language"]
        size = len(rec["text"].encode("utf-8"))
        if used[lang] + size > quota.get(lang, 0):
            continue
        used[lang] += size
        texts.append(rec["text"])
    return texts


def build_tokenizer():
    """An untrained tokenizer with the pipeline this project relies on."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a leading space would break separate encoding of FIM pieces.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: list[str], vocab_size: int):
    """Train on ``texts``; the result has exactly ``vocab_size`` ids."""
    from tokenizers import AddedToken, pre_tokenizers, trainers

    if vocab_size > 16384:
        raise ValueError("vocab must be at most 16384 (the model's embedding budget)")
    tok = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(WHITESPACE_TOKENS),
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def pieces() -> Iterator[str]:
        for text in texts:
            yield from split_like_added_tokens(text)

    tok.train_from_iterator(pieces(), trainer=trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in WHITESPACE_TOKENS])
    check_layout(tok)
    return tok


def check_layout(tok) -> None:
    """Raise if the special tokens are not ids 0..5 or whitespace tokens are missing."""
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise ValueError(f"special token {name} has id {tok.token_to_id(name)}, expected {i}")
    for t in WHITESPACE_TOKENS:
        ids = tok.encode(t, add_special_tokens=False).ids
        if len(ids) != 1:
            raise ValueError(f"whitespace run {t!r} encodes to {len(ids)} tokens, expected 1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="data/corpus", help="directory with train.jsonl.gz")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--sample-mb", type=float, default=60.0, help="training text budget")
    parser.add_argument("--out", default="denoiser/default_model/tokenizer.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # leave the other core to everyone else

    train_path = Path(args.corpus) / "train.jsonl.gz"
    if not train_path.exists():
        parser.exit(2, f"error: {train_path} not found; build it with `python -m training.corpus build`\n")
    t0 = time.monotonic()
    available: Counter = Counter()
    for rec in read_records(train_path):
        available[rec["language"]] += len(rec["text"].encode("utf-8"))
    texts = sample_texts(read_records(train_path), int(args.sample_mb * 1e6), available)
    sample_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(f"sample: {len(texts)} files, {sample_bytes / 1e6:.1f} MB", file=sys.stderr)
    tok = train_tokenizer(texts, args.vocab)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))

    valid_path = Path(args.corpus) / "valid.jsonl.gz"
    if valid_path.exists():
        nbytes = ntok = 0
        for rec in read_records(valid_path):
            nbytes += len(rec["text"].encode("utf-8"))
            ntok += len(tok.encode(rec["text"], add_special_tokens=False).ids)
        print(f"validation: {nbytes / max(ntok, 1):.2f} bytes/token over {nbytes / 1e6:.1f} MB", file=sys.stderr)
    print(f"vocab {tok.get_vocab_size()} -> {out} ({time.monotonic() - t0:.0f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
