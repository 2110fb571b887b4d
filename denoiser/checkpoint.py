"""A native model directory: config.json + model.safetensors + tokenizer.json + MODEL_CARD.md.

Loads whole directories, checking that the parts agree before any heavy work,
so a broken directory fails with the name of the file at fault. Writing one is
training's (`training/export.py`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from denoiser.backend import ModelLoadError
from denoiser.config import ModelConfig
from denoiser.model import SpanDenoiser
from denoiser.tokenizer import CodeTokenizer
from denoiser.weights import load_weights, refuse_pickles

CONFIG, WEIGHTS, TOKENIZER, CARD = "config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md"


def load_native_model(model_dir: Path, device: torch.device, dtype: torch.dtype = torch.float32):
    """Return (model, tokenizer, config) for a native parafill model directory."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"{model_dir}: not a directory; --model takes a model directory")
    refuse_pickles(model_dir)
    config = ModelConfig.load(model_dir / CONFIG)
    if not (model_dir / CARD).exists():
        raise ModelLoadError(
            f"{model_dir / CARD}: missing; a model directory must carry its model card "
            "(data, licences, evaluation) so users know what they run"
        )
    tokenizer = CodeTokenizer.load(model_dir / TOKENIZER)
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelLoadError(
            f"{model_dir / TOKENIZER}: {tokenizer.vocab_size} tokens but {CONFIG} says vocab_size "
            f"{config.vocab_size}; the tokenizer does not belong to this model"
        )
    state = load_weights(model_dir / WEIGHTS, torch.float32)
    model = SpanDenoiser(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(
            f"{model_dir / WEIGHTS}: weights do not match {CONFIG} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ModelLoadError(
                f"{model_dir / WEIGHTS}: {name} has shape {tuple(tensor.shape)}, "
                f"{CONFIG} implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state)
    model.to(device=device, dtype=dtype).eval()
    return model, tokenizer, config

