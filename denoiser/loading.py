"""Pick and load the backend for a model directory (or the embedded default model).

Reads config.json to tell a native parafill model from an open-weight family
and hands over to the right loader; every failure is a `ModelLoadError`
that names the file at fault. A model name is looked up in the local Hugging
Face cache only: it never downloads anything.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import denoiser
from denoiser.backend import Backend, ModelLoadError
from denoiser.catalogue import ModelNameError, parse_model_name
from denoiser.config import ARCHITECTURE
from denoiser.hub_cache import ModelNotDownloaded, locate

Progress = Callable[[str, int], None]


def default_model_dir() -> Path:
    """Where the model shipped with parafill lives."""
    return Path(denoiser.__file__).resolve().parent / "default_model"


def read_model_config(model_dir: Path) -> dict:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(
            f"{config_path}: missing; a model directory needs config.json, *.safetensors and tokenizer.json"
        )
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{config_path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{config_path}: expected a JSON object")
    return data


def model_directory(model: str | Path) -> tuple[Path, str | None]:
    """(directory, name) of a `--model` value: a catalogue name or hf: id is found in the local
    Hugging Face cache (never downloaded; a missing one is an error naming the pull command),
    anything else is a directory."""
    try:
        ref = parse_model_name(str(model)) if isinstance(model, str) else None
    except ModelNameError as exc:
        raise ModelLoadError(str(exc)) from None
    if ref is None:
        return Path(model).expanduser(), None
    try:
        return locate(ref), ref.text
    except ModelNotDownloaded as exc:
        raise ModelLoadError(str(exc)) from None


def load_backend(model: str | Path | None, device: str = "auto", progress: Progress | None = None, *,
                 open_model_weights: str = "auto") -> Backend:
    """model: a model directory, a model name (`denoiser.catalogue`), or None for the embedded default model.

    `open_model_weights` ("auto", "bf16", "int8", "fp32") is how an open model's weights are held
    (`open_model_weight_format`); a native model ignores it.
    """
    report = progress or (lambda message, percent: None)
    name = None
    if model is None:
        model_dir = default_model_dir()
        if not (model_dir / "config.json").is_file():
            raise ModelLoadError(
                f"{model_dir}: the default model is not installed in this copy of parafill; "
                "pass --model DIR (a model directory) or reinstall parafill"
            )
    else:
        model_dir, name = model_directory(model)
        if not model_dir.exists():
            raise ModelLoadError(f"{model_dir}: no such directory; --model takes a model directory "
                                 "or a model name (`parafill model list`)")
        if not model_dir.is_dir():
            raise ModelLoadError(f"{model_dir}: not a directory; --model takes a model directory "
                                 "or a model name (`parafill model list`)")
    report(f"reading {model_dir / 'config.json'}", 5)
    config = read_model_config(model_dir)
    architecture = config.get("architecture")
    if architecture == ARCHITECTURE:
        from denoiser.native_backend import NativeBackend

        backend = NativeBackend(model_dir, device, progress=report)
    else:
        backend = _load_open_model(model_dir, config, device, report, open_model_weights)
    if name is not None:  # a cache snapshot's directory is a commit hash: show the name instead
        family, sep, _ = backend.name.rpartition(":")
        backend.name = f"{family}{sep}{name}"
    report(f"{backend.name} ready on {backend.device}", 100)
    return backend


def open_model_weight_format(weights: str, device: str) -> tuple[str, bool]:
    """(dtype name, int8) for an open model's `weights` setting on `device` ("cpu", "cuda", ...).

    "auto" is bf16 on a GPU (fp16 where it lacks bf16) and on a CPU that multiplies bf16 natively
    (the checkpoints are published in bf16, so nothing is rounded; half fp32's memory and time),
    fp32 on other CPUs (oneDNN emulates bf16 there, slower than fp32). "int8" (CPU only) holds
    each projection as int8 per output channel: the least memory and the fastest on a CPU, at
    some cost in agreement with bf16's fills (docs/OPEN_MODELS.md).
    """
    import torch

    on_cpu = device.split(":")[0] == "cpu"
    if weights == "auto":
        if on_cpu:
            from denoiser.model import cpu_has_native_bf16

            return ("bfloat16" if cpu_has_native_bf16() else "float32"), False
        return ("bfloat16" if torch.cuda.is_bf16_supported() else "float16"), False
    formats = {"bf16": ("bfloat16", False), "fp32": ("float32", False), "int8": ("float32", True)}
    if weights not in formats:
        raise ModelLoadError(f"open model weights {weights!r}: expected one of auto, bf16, int8, fp32")
    if weights == "int8" and not on_cpu:
        raise ModelLoadError(f"int8 weights run on the CPU only, not on {device}; "
                             "set the open model weights to bf16 or auto there")
    return formats[weights]


def _load_open_model(model_dir: Path, config: dict, device: str, report: Progress, weights: str) -> Backend:
    described = config.get("architecture") or config.get("architectures") or config.get("model_type")
    try:
        from denoiser.open_models import load_open_model
    except ImportError as exc:
        raise ModelLoadError(
            f"{model_dir / 'config.json'}: architecture {described!r} is not supported by this "
            f"parafill (open-weight models are unavailable: {exc}); use a native parafill model"
        ) from exc
    import torch

    from denoiser.backend import resolve_device

    dtype, int8 = open_model_weight_format(weights, str(resolve_device(device)))
    # Its percentages start from 0 again: map them after the 5% already reported.
    return load_open_model(model_dir, device, progress=lambda message, percent: report(message, 5 + 0.9 * percent),
                           dtype=getattr(torch, dtype), int8=int8)
