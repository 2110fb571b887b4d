"""Write tiny random checkpoints in each open family's exact on-disk layout.

For tests and demos only: a character-level tokenizer with the family's special
tokens (built with `tokenizers`), a config.json with the family's keys, and
random weights under the family's tensor names, as one safetensors file or
several shards with an index. `tokenizer_files="vocab.json+merges.txt"` writes
the slow-tokenizer layout some Dream-family repositories ship instead of
tokenizer.json: a byte-level BPE vocab.json and merges.txt, with the special
tokens in tokenizer_config.json's `added_tokens_decoder`. `family_config`
also renders full-size configs (tools/open_model_bench.py builds real-shaped
random checkpoints with it). Nothing here is used when serving a real model.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models

from denoiser.open_models.families import DREAM, LLADA, OPEN_DCODER, family_spec

VOCAB_ROWS = 128
_CHARS = [c for c in string.printable if c not in "\x0b\x0c\r"]

_SPECIALS = {
    DREAM: {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "bos_token": "<|beginoftext|>", "mask_token": "<|mask|>"},
    LLADA: {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "bos_token": "<|startoftext|>", "mask_token": "<|mdm_mask|>"},
    OPEN_DCODER: {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "mask_token": "<|mask|>"},
}


def tiny_tokenizer(family: str) -> tuple[Tokenizer, dict[str, str]]:
    """Character-level BPE (no merges) with the family's special tokens first."""
    specials = _SPECIALS[family]
    names = list(dict.fromkeys(specials.values())) + ["<unk>"]
    vocab = {tok: i for i, tok in enumerate(names + _CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(names)
    tok.decoder = decoders.Fuse()
    return tok, specials


def tiny_config(family: str, tokenizer: Tokenizer, specials: dict[str, str], *, tie: bool | None = None,
                layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
                vocab_rows: int = VOCAB_ROWS) -> dict:
    ids = {k.replace("_token", "_token_id"): tokenizer.token_to_id(v) for k, v in specials.items()}
    return family_config(family, ids, tie=tie, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                         intermediate=intermediate, vocab_rows=vocab_rows)


def family_config(family: str, special_ids: dict[str, int], *, tie: bool | None = None, layers: int, hidden: int,
                  heads: int, kv_heads: int, intermediate: int, vocab_rows: int, rope_theta: float | None = None,
                  max_positions: int = 4096) -> dict:
    """config.json as the family's published checkpoints write it, for any size (`special_ids`: mask_token_id, ...)."""
    ids = special_ids
    if family == LLADA:
        return {
            "architectures": ["LLaDAModelLM"], "model_type": "llada",
            "d_model": hidden, "n_heads": heads, "n_kv_heads": kv_heads, "n_layers": layers,
            "mlp_hidden_size": intermediate, "mlp_ratio": 4, "vocab_size": vocab_rows, "embedding_size": vocab_rows,
            "rope": True, "rope_theta": rope_theta or 500000.0, "rms_norm_eps": 1e-5,
            "max_sequence_length": max_positions,
            "block_type": "llama", "layer_norm_type": "rms", "activation_type": "silu", "alibi": False,
            "include_bias": False, "include_qkv_bias": False, "weight_tying": bool(tie), "block_group_size": 1,
            "input_emb_norm": False, "scale_logits": False, "attention_layer_norm": False, **ids,
        }
    arch = {DREAM: (["DreamModel"], "Dream", 1000000.0), OPEN_DCODER: (["Qwen2ForCausalLM"], "qwen2", 1000000.0)}[family]
    return {
        "architectures": arch[0], "model_type": arch[1],
        "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "num_hidden_layers": layers, "intermediate_size": intermediate, "vocab_size": vocab_rows,
        "hidden_act": "silu", "rope_theta": rope_theta or arch[2], "rms_norm_eps": 1e-6,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": (family == OPEN_DCODER) if tie is None else tie, "rope_scaling": None, **ids,
    }


def random_state(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the family's exact names (norm weights near 1, like trained models)."""
    spec = family_spec(config)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in spec.expected_tensors().items():
        if len(shape) == 1 and ("norm" in name or "layernorm" in name or name.endswith("ln_f.weight")):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            state[name] = 0.2 * torch.randn(shape, generator=gen)
    return state


def write_checkpoint(model_dir: Path, config: dict, state: dict[str, torch.Tensor], tokenizer: Tokenizer,
                     specials: dict[str, str], *, shards: int = 1, dtype: torch.dtype = torch.float32) -> None:
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**specials, "tokenizer_class": "PreTrainedTokenizerFast"}))
    write_weights(model_dir, config, state, shards=shards, dtype=dtype)


def write_weights(model_dir: Path, config: dict, state: dict[str, torch.Tensor], *, shards: int = 1,
                  dtype: torch.dtype = torch.float32) -> None:
    """config.json and the weights, as one safetensors file or `shards` files with an index."""
    (model_dir / "config.json").write_text(json.dumps(config, indent=1))
    names = list(state)
    cast = {n: state[n].to(dtype).contiguous() for n in names}
    if shards == 1:
        save_file(cast, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    per = -(-len(names) // shards)
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: cast[n] for n in names[s * per:(s + 1) * per]}
        save_file(part, str(model_dir / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in cast.values())
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


# --- the slow-tokenizer layout (vocab.json + merges.txt) ------------------------------------

SLOW_LAYOUT = "vocab.json+merges.txt"
SLOW_VOCAB_ROWS = 288
# A few merges, so the files exercise BPE (indentation, `def`, `self`, ` in`, `return`).
_MERGES = [("Ġ", "Ġ"), ("ĠĠ", "ĠĠ"), ("d", "e"), ("de", "f"), ("Ġ", "def"), ("s", "e"), ("se", "l"),
           ("sel", "f"), ("i", "n"), ("Ġ", "in"), ("r", "e"), ("re", "t"), ("u", "r"), ("ur", "n"),
           ("ret", "urn"), ("Ġ", "return"), ("Ċ", "ĠĠĠĠ")]
_SLOW_CLASSES = {DREAM: "DreamTokenizer", OPEN_DCODER: "Qwen2Tokenizer", LLADA: "Qwen2Tokenizer"}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def slow_tokenizer_files(family: str) -> tuple[dict[str, int], list[tuple[str, str]], dict[int, dict], dict[str, str]]:
    """(vocab.json, merges, added_tokens_decoder, specials) of a tiny Qwen2-style byte-level BPE."""
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for a, b in _MERGES:
        vocab.setdefault(a + b, len(vocab))
    specials = _SPECIALS[family]
    names = list(dict.fromkeys([*specials.values(), "<|im_start|>", "<|im_end|>"]))
    added = {len(vocab) + i: {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                              "single_word": False, "special": True} for i, name in enumerate(names)}
    return vocab, list(_MERGES), added, specials


def write_slow_tokenizer(model_dir: Path, family: str) -> dict[str, int]:
    """Write vocab.json, merges.txt, tokenizer_config.json (no tokenizer.json); returns the special ids for config.json."""
    vocab, merges, added, specials = slow_tokenizer_files(family)
    (model_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (model_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                          encoding="utf-8")
    config = {**specials, "added_tokens_decoder": {str(k): v for k, v in added.items()},
              "tokenizer_class": _SLOW_CLASSES[family], "model_max_length": 4096}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False), encoding="utf-8")
    by_text = {v["content"]: k for k, v in added.items()}
    return {k.replace("_token", "_token_id"): by_text[v] for k, v in specials.items()}


def make_tiny_checkpoint(model_dir: Path, family: str, *, shards: int = 1, dtype: torch.dtype = torch.float32,
                         seed: int = 0, tie: bool | None = None,
                         tokenizer_files: str = "tokenizer.json") -> tuple[dict, dict[str, torch.Tensor]]:
    """Write a tiny random `family` checkpoint to `model_dir`; returns (config, fp32 state).

    `tokenizer_files`: "tokenizer.json" (the fast-tokenizer file) or SLOW_LAYOUT."""
    if tokenizer_files == SLOW_LAYOUT:
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        ids = write_slow_tokenizer(model_dir, family)
        config = family_config(family, ids, tie=(family == OPEN_DCODER) if tie is None else tie, layers=2,
                               hidden=64, heads=4, kv_heads=2, intermediate=128, vocab_rows=SLOW_VOCAB_ROWS)
        state = random_state(config, seed)
        write_weights(model_dir, config, state, shards=shards, dtype=dtype)
        return config, state
    if tokenizer_files != "tokenizer.json":
        raise ValueError(f"tokenizer_files must be 'tokenizer.json' or {SLOW_LAYOUT!r}")
    tokenizer, specials = tiny_tokenizer(family)
    config = tiny_config(family, tokenizer, specials, tie=tie)
    state = random_state(config, seed)
    write_checkpoint(model_dir, config, state, tokenizer, specials, shards=shards, dtype=dtype)
    return config, state
