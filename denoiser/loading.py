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


def load_backend(model: str | Path | None, device: str = "auto", progress: Progress | None = None) -> Backend:
    """model: a model directory, a model name (`denoiser.catalogue`), or None for the embedded default model."""
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
        backend = _load_open_model(model_dir, config, device, report)
    if name is not None:  # a cache snapshot's directory is a commit hash: show the name instead
        family, sep, _ = backend.name.rpartition(":")
        backend.name = f"{family}{sep}{name}"
    report(f"{backend.name} ready on {backend.device}", 100)
    return backend


def _load_open_model(model_dir: Path, config: dict, device: str, report: Progress) -> Backend:
    described = config.get("architecture") or config.get("architectures") or config.get("model_type")
    try:
        from denoiser.open_models import load_open_model
    except ImportError as exc:
        raise ModelLoadError(
            f"{model_dir / 'config.json'}: architecture {described!r} is not supported by this "
            f"parafill (open-weight models are unavailable: {exc}); use a native parafill model"
        ) from exc
    # Its percentages start from 0 again: map them after the 5% already reported.
    return load_open_model(model_dir, device, progress=lambda message, percent: report(message, 5 + 0.9 * percent))
