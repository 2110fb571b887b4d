"""The native span denoiser's config.json: shape, special tokens, storage.

Only describes the model; loading weights and tokenizers lives elsewhere.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from denoiser.backend import ModelLoadError

ARCHITECTURE = "parafill-span-denoiser"

# Fixed ids of the special tokens: every native tokenizer puts them first.
SPECIAL_TOKENS = (
    "<|pad|>",
    "<|eos|>",
    "<|mask|>",
    "<|fim_prefix|>",
    "<|fim_suffix|>",
    "<|fim_middle|>",
)
PAD_ID, EOS_ID, MASK_ID, FIM_PREFIX_ID, FIM_SUFFIX_ID, FIM_MIDDLE_ID = range(6)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    d_ff: int = 768
    max_positions: int = 4096
    # Context length the weights were trained on: inference keeps to it, since
    # positions never seen in training give poor fills.
    context_tokens: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    architecture: str = ARCHITECTURE

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for rotary embeddings")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, source: str = "config.json") -> "ModelConfig":
        if data.get("architecture") != ARCHITECTURE:
            raise ModelLoadError(
                f"{source}: architecture {data.get('architecture')!r} is not {ARCHITECTURE!r}"
            )
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"{source}: {exc}") from exc

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ModelLoadError(f"{path}: missing; a model directory needs config.json") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_json(data, str(path))
