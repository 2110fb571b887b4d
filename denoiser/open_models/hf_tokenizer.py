"""The tokenizer of an open model directory, and the special tokens infilling needs.

Reads tokenizer.json with the `tokenizers` library (no `transformers` at run
time). Repositories that ship only the slow tokenizer's files (vocab.json +
merges.txt, as some Dream-family models do) get the same byte-level BPE that
`transformers`' Qwen2 tokenizer builds from them, with the added tokens at the
ids tokenizer_config.json (`added_tokens_decoder`) or added_tokens.json give.
Finds mask / bos / eos / pad in tokenizer_config.json, special_tokens_map.json
and config.json, in that order. Checks that the tokenizer belongs to the weights
(its ids fit the embedding, the mask token agrees with config.json) before any
weight is read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from denoiser.backend import ModelLoadError
from denoiser.open_models.families import LLADA, OPEN_DCODER, FamilySpec

# Tokens that end a generated middle in the families' vocabularies.
END_TOKEN_TEXTS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<eos>")
MASK_TOKEN_TEXTS = ("<|mask|>", "[MASK]", "<mask>", "<|mdm_mask|>")

# Slow tokenizers whose vocab.json + merges.txt are Qwen2's byte-level BPE (Dream's
# tokenization_dream.py is Qwen2's tokenizer under another name).
QWEN2_TOKENIZER_CLASSES = ("qwen2tokenizer", "qwen2tokenizerfast", "dreamtokenizer")
# transformers' Qwen2 tokenizer: split pattern, then byte-level mapping without its own regex.
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


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


def _added_tokens(model_dir: Path, tokenizer_config: dict) -> list[tuple[int, AddedToken]]:
    """(id, token) of every added token, from tokenizer_config.json's added_tokens_decoder, else added_tokens.json."""
    decoder = tokenizer_config.get("added_tokens_decoder")
    if isinstance(decoder, dict) and decoder:
        out = []
        for key, value in decoder.items():
            if not (str(key).isdigit() and isinstance(value, dict) and isinstance(value.get("content"), str)):
                raise ModelLoadError(f"{model_dir / 'tokenizer_config.json'}: added_tokens_decoder entry {key!r} is not "
                                     "an id with a content string; the file is damaged")
            out.append((int(key), AddedToken(value["content"], single_word=bool(value.get("single_word", False)),
                                             lstrip=bool(value.get("lstrip", False)),
                                             rstrip=bool(value.get("rstrip", False)),
                                             normalized=bool(value.get("normalized", False)),
                                             special=bool(value.get("special", True)))))
        return sorted(out, key=lambda item: item[0])
    added = _read_json(model_dir / "added_tokens.json")
    if not all(isinstance(v, int) for v in added.values()):
        raise ModelLoadError(f"{model_dir / 'added_tokens.json'}: expected token -> id; the file is damaged")
    return sorted(((tid, AddedToken(text, normalized=False, special=True)) for text, tid in added.items()),
                  key=lambda item: item[0])


def qwen2_tokenizer_from_files(model_dir: Path, tokenizer_config: dict) -> Tokenizer:
    """The fast tokenizer `transformers` builds from a Qwen2-style vocab.json + merges.txt (+ added tokens)."""
    vocab_path, merges_path = model_dir / "vocab.json", model_dir / "merges.txt"
    vocab = _read_json(vocab_path)
    if not vocab or not all(isinstance(v, int) for v in vocab.values()):
        raise ModelLoadError(f"{vocab_path}: expected a JSON object of token -> id; the file is damaged")
    try:
        # Split on newlines only: str.splitlines would also break at characters a vocabulary may hold.
        lines = [line.rstrip("\r") for line in merges_path.read_text(encoding="utf-8").split("\n")]
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{merges_path}: unreadable ({exc})") from exc
    merges = []
    for number, line in enumerate(lines, 1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ModelLoadError(f"{merges_path}:{number}: expected two tokens separated by one space; the file is damaged")
        merges.append((pair[0], pair[1]))
    added = _added_tokens(model_dir, tokenizer_config)
    by_id = {tid: text for text, tid in vocab.items()}
    for tid, token in added:
        # Added tokens go into the model's vocabulary at their own ids, so ids past a gap stay right.
        if by_id.get(tid, token.content) != token.content:
            raise ModelLoadError(f"{model_dir}: added token {token.content!r} has id {tid}, which vocab.json gives to "
                                 f"{by_id[tid]!r}; the tokenizer files disagree")
        vocab.setdefault(token.content, tid)
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                   continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                                   byte_fallback=False))
    except Exception as exc:  # tokenizers raises its own Exception subclass
        raise ModelLoadError(f"{merges_path}: the tokenizers library refuses these merges ({exc}); "
                             "vocab.json and merges.txt do not belong together") from exc
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=bool(tokenizer_config.get("add_prefix_space", False)),
                                 use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for _, t in added if t.special])
    tok.add_tokens([t for _, t in added if not t.special])
    for tid, token in added:
        if tok.token_to_id(token.content) != tid:
            raise ModelLoadError(f"{model_dir}: added token {token.content!r} should have id {tid} but the tokenizer "
                                 f"gives {tok.token_to_id(token.content)}; the tokenizer files disagree")
    return tok


def read_tokenizer(model_dir: Path) -> Tokenizer:
    """tokenizer.json, else the Qwen2-style vocab.json + merges.txt; a ModelLoadError naming the fix otherwise."""
    path = model_dir / "tokenizer.json"
    if path.exists():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own Exception subclass
            raise ModelLoadError(f"{path}: cannot be read by the tokenizers library ({exc})") from exc
    if not ((model_dir / "vocab.json").exists() and (model_dir / "merges.txt").exists()):
        raise ModelLoadError(f"{path}: missing; parafill needs the model's tokenizer.json (the fast-tokenizer file), "
                             "or its vocab.json and merges.txt")
    tokenizer_config = _read_json(model_dir / "tokenizer_config.json")
    tokenizer_class = str(tokenizer_config.get("tokenizer_class") or "Qwen2Tokenizer")
    if tokenizer_class.lower() not in QWEN2_TOKENIZER_CLASSES:
        raise ModelLoadError(f"{model_dir}: no tokenizer.json, and its vocab.json + merges.txt are for "
                             f"{tokenizer_class}, which parafill cannot rebuild (it rebuilds Qwen2-style byte-level "
                             "BPE only); add the model's tokenizer.json")
    return qwen2_tokenizer_from_files(model_dir, tokenizer_config)


def load_tokenizer(model_dir: Path, spec: FamilySpec, config: dict) -> OpenModelTokenizer:
    tok = read_tokenizer(model_dir)
    path = model_dir / ("tokenizer.json" if (model_dir / "tokenizer.json").exists() else "vocab.json")

    vocab = spec.shape.vocab_size
    size = tok.get_vocab_size(with_added_tokens=True)
    # Embeddings are usually padded a little past the tokenizer (Qwen2.5: 151665 -> 151936);
    # a tokenizer far smaller or any larger belongs to another model.
    if size > vocab or vocab - size > max(1024, vocab // 50):
        raise ModelLoadError(
            f"{path}: tokenizer has {size} tokens but config.json's embedding has {vocab} rows; "
            f"{path.name} does not belong to these weights: copy the model's own tokenizer files"
        )

    settings = {**_read_json(model_dir / "special_tokens_map.json"), **_read_json(model_dir / "tokenizer_config.json")}

    def lookup(key: str) -> int | None:
        text = _token_text(settings.get(key))
        if text is not None:
            tid = tok.token_to_id(text)
            if tid is None:
                raise ModelLoadError(f"{model_dir}: {key} {text!r} is not in {path.name}; the tokenizer files disagree")
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
