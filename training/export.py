"""Write a native model directory: config.json, model.safetensors (fp32 or int8), tokenizer.json, card.

The shipped model is int8 with one fp16 scale per output channel of every
large matrix (`denoiser/weights.py` reads it back). Only training and the
stand-in models of tests and benchmarks write model directories; the server
never does.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from denoiser.checkpoint import CARD, CONFIG, TOKENIZER, WEIGHTS
from denoiser.model import SpanDenoiser
from denoiser.weights import SCALE_SUFFIX


def quantize_int8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Store 2-D weights as int8 rows with one fp16 scale per output channel."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if t.dim() == 2 and t.numel() >= 4096:
            scale = t.float().abs().amax(dim=1).clamp(min=1e-8) / 127.0
            out[name] = torch.round(t.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
            out[name + SCALE_SUFFIX] = scale.to(torch.float16)
        else:
            out[name] = t.contiguous()
    return out


def save_weights(state: dict[str, torch.Tensor], path: Path, int8: bool = False) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(quantize_int8(state) if int8 else state, str(path), metadata={"format": "pt", "int8": str(int8)})


def save_native_model(model: SpanDenoiser, tokenizer_json: Path, model_dir: Path, *, int8: bool, card: str) -> None:
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / CONFIG).write_text(json.dumps(model.config.to_json(), indent=2) + "\n", encoding="utf-8")
    save_weights(model.state_dict(), model_dir / WEIGHTS, int8=int8)
    if Path(tokenizer_json).resolve() != (model_dir / TOKENIZER).resolve():
        (model_dir / TOKENIZER).write_bytes(Path(tokenizer_json).read_bytes())
    (model_dir / CARD).write_text(card, encoding="utf-8")
