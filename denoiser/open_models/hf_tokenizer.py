"""The tokenizer of an open model directory, and the special tokens infilling needs.

Reads tokenizer.json with the `tokenizers` library (no `transformers` at run
time) and finds mask / bos / eos / pad in tokenizer_config.json,
special_tokens_map.json and config.json, in that order. Checks that the
tokenizer belongs to the weights (its ids fit the embedding, the mask token
agrees with config.json) before any weight is read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from denoiser.backend import ModelLoadError
from denoiser.open_models.families import LLADA, OPEN_DCODER, FamilySpec

# Tokens that end a generated middle in the families' vocabularies.
END_TOKEN_TEXTS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<eos>")
MASK_TOKEN_TEXTS = ("<|mask|>", "[MASK]", "<mask>", "<|mdm_mask|>")


@dataclass(frozen=True)
class SpecialIds:
    mask: int
    bos: int | None
    eos: int | None
    pad: int | None
    stops: frozenset[int]


def _token_text(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


class OpenModelTokenizer:
    def __init__(self, tokenizer: Tokenizer, special: SpecialIds) -> None:
        self.tokenizer = tokenizer
        self.special = special

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def load_tokenizer(model_dir: Path, spec: FamilySpec, config: dict) -> OpenModelTokenizer:
    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise ModelLoadError(f"{path}: missing; parafill needs the model's tokenizer.json (the fast-tokenizer file)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception subclass
        raise ModelLoadError(f"{path}: cannot be read by the tokenizers library ({exc})") from exc

    vocab = spec.shape.vocab_size
    size = tok.get_vocab_size(with_added_tokens=True)
    # Embeddings are usually padded a little past the tokenizer (Qwen2.5: 151665 -> 151936);
    # a tokenizer far smaller or any larger belongs to another model.
    if size > vocab or vocab - size > max(1024, vocab // 50):
        raise ModelLoadError(
            f"{path}: tokenizer has {size} tokens but config.json's embedding has {vocab} rows; "
            "tokenizer.json does not belong to these weights: copy the model's own tokenizer files"
        )

    settings = {**_read_json(model_dir / "special_tokens_map.json"), **_read_json(model_dir / "tokenizer_config.json")}

    def lookup(key: str) -> int | None:
        text = _token_text(settings.get(key))
        if text is not None:
            tid = tok.token_to_id(text)
            if tid is None:
                raise ModelLoadError(f"{model_dir}: {key} {text!r} is not in tokenizer.json; the tokenizer files disagree")
            return tid
        cid = config.get(f"{key}_id")
        return int(cid) if isinstance(cid, int) else None

    mask = lookup("mask_token")
    if mask is None and spec.config_mask_id is not None:
        mask = spec.config_mask_id
    if mask is None:
        for text in MASK_TOKEN_TEXTS:
            if tok.token_to_id(text) is not None:
                mask = tok.token_to_id(text)
                break
    if mask is None:
        hint = " (a plain Qwen2 model is autoregressive, not a diffusion model)" if spec.family == OPEN_DCODER else ""
        raise ModelLoadError(f"{model_dir}: no mask token in the tokenizer or config.json{hint}; parafill needs a masked-diffusion model")
    if spec.config_mask_id is not None and mask != spec.config_mask_id:
        raise ModelLoadError(
            f"{model_dir}: tokenizer's mask token has id {mask} but config.json says mask_token_id={spec.config_mask_id}; "
            "tokenizer and weights come from different models"
        )
    if not 0 <= mask < vocab or (spec.family != LLADA and tok.id_to_token(mask) is None):
        raise ModelLoadError(f"{model_dir}: mask token id {mask} is outside the tokenizer/embedding; tokenizer and weights do not match")

    bos, eos, pad = lookup("bos_token"), lookup("eos_token"), lookup("pad_token")
    for name, tid in (("bos", bos), ("eos", eos), ("pad", pad)):
        if tid is not None and not 0 <= tid < vocab:
            raise ModelLoadError(f"{model_dir}: {name} token id {tid} is outside the embedding ({vocab} rows)")
    stops = {t for t in (eos, pad) if t is not None}
    stops |= {tid for text in END_TOKEN_TEXTS if (tid := tok.token_to_id(text)) is not None}
    stops.discard(mask)
    return OpenModelTokenizer(tok, SpecialIds(mask=mask, bos=bos, eos=eos, pad=pad, stops=frozenset(stops)))
