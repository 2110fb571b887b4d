"""Text ⇄ token ids for the native model, over a `tokenizers` byte-level BPE.

Prefix, middle and suffix are always encoded separately and their ids
concatenated (training does the same), so every cursor position an editor
produces is a token boundary the model has seen.
"""
from __future__ import annotations

import re
from pathlib import Path

from tokenizers import Tokenizer

from denoiser.backend import ModelLoadError
from denoiser.config import SPECIAL_TOKENS


# A Python str may hold lone surrogates (an editor can send them as JSON
# escapes); the Rust tokenizer refuses such strings, so they become U+FFFD.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _encodable(text: str) -> str:
    return _LONE_SURROGATE.sub("\ufffd", text)


class CodeTokenizer:
    def __init__(self, tokenizer: Tokenizer, source: str = "tokenizer.json"):
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(token) != expected_id:
                raise ModelLoadError(
                    f"{source}: special token {token} must have id {expected_id}, "
                    f"found {tokenizer.token_to_id(token)}; this tokenizer was not made for a parafill model"
                )
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def load(cls, path: Path) -> "CodeTokenizer":
        try:
            return cls(Tokenizer.from_file(str(path)), str(path))
        except ModelLoadError:
            raise
        except FileNotFoundError as exc:
            raise ModelLoadError(f"{path}: missing; a model directory needs tokenizer.json") from exc
        except Exception as exc:  # tokenizers raises plain Exception on bad files
            raise ModelLoadError(f"{path}: cannot be read as a tokenizer ({exc})") from exc

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:
            return self._tok.encode(_encodable(text), add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        try:
            encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        except TypeError:
            encodings = self._tok.encode_batch([_encodable(t) for t in texts], add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
