"""Weights on disk: safetensors only, optionally int8 with per-channel scales.

This module reads them; `training/export.py` writes them.

Pickle-based formats (.bin, .pt, .pth, .ckpt, .pkl) can run arbitrary code
when loaded, so they are refused with that reason, never opened.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from denoiser.backend import ModelLoadError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SCALE_SUFFIX = ".int8_scale"


def refuse_pickles(model_dir: Path) -> None:
    pickles = sorted(p.name for p in Path(model_dir).iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        safetensors = list(Path(model_dir).glob("*.safetensors"))
        if not safetensors:
            raise ModelLoadError(
                f"{model_dir}: only pickle checkpoints ({', '.join(pickles)}); parafill loads "
                "safetensors only, because loading a pickle can run arbitrary code. Convert it to "
                "safetensors with a trusted tool first."
            )


def dequantize(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = state.get(name + SCALE_SUFFIX)
        if scale is not None:
            out[name] = (t.float() * scale.float()[:, None]).to(dtype)
        else:
            out[name] = t.to(dtype) if t.is_floating_point() else t
    return out


def load_weights(path: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise ModelLoadError(f"{path}: pickle checkpoints are refused (loading one can run arbitrary code); use safetensors")
    if not path.exists():
        raise ModelLoadError(f"{path}: missing; a model directory needs model.safetensors")
    try:
        return dequantize(load_file(str(path)), dtype)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path}: corrupt or truncated safetensors file ({exc})") from exc
