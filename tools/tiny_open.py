"""Write tiny random checkpoints in each open family's exact on-disk layout.

For tests and demos only: a character-level tokenizer with the family's special
tokens (built with `tokenizers`), a config.json with the family's keys, and
random weights under the family's tensor names, as one safetensors file or
several shards with an index. Nothing here is used when serving a real model.
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
                layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 128) -> dict:
    ids = {k.replace("_token", "_token_id"): tokenizer.token_to_id(v) for k, v in specials.items()}
    if family == LLADA:
        return {
            "architectures": ["LLaDAModelLM"], "model_type": "llada",
            "d_model": hidden, "n_heads": heads, "n_kv_heads": kv_heads, "n_layers": layers,
            "mlp_hidden_size": intermediate, "mlp_ratio": 4, "vocab_size": VOCAB_ROWS, "embedding_size": VOCAB_ROWS,
            "rope": True, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_sequence_length": 4096,
            "block_type": "llama", "layer_norm_type": "rms", "activation_type": "silu", "alibi": False,
            "include_bias": False, "include_qkv_bias": False, "weight_tying": bool(tie), "block_group_size": 1,
            "input_emb_norm": False, "scale_logits": False, "attention_layer_norm": False, **ids,
        }
    arch = {DREAM: (["DreamModel"], "Dream", 1000000.0), OPEN_DCODER: (["Qwen2ForCausalLM"], "qwen2", 1000000.0)}[family]
    return {
        "architectures": arch[0], "model_type": arch[1],
        "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "num_hidden_layers": layers, "intermediate_size": intermediate, "vocab_size": VOCAB_ROWS,
        "hidden_act": "silu", "rope_theta": arch[2], "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
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
    (model_dir / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**specials, "tokenizer_class": "PreTrainedTokenizerFast"}))
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


def make_tiny_checkpoint(model_dir: Path, family: str, *, shards: int = 1, dtype: torch.dtype = torch.float32,
                         seed: int = 0, tie: bool | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Write a tiny random `family` checkpoint to `model_dir`; returns (config, fp32 state)."""
    tokenizer, specials = tiny_tokenizer(family)
    config = tiny_config(family, tokenizer, specials, tie=tie)
    state = random_state(config, seed)
    write_checkpoint(model_dir, config, state, tokenizer, specials, shards=shards, dtype=dtype)
    return config, state
