"""Bring-your-own open diffusion LLMs: Dream / Dream-Coder / DiffuCoder, LLaDA, Open-dCoder.

`detect_family(config)` names the family of a config.json dict;
`load_open_model(model_dir, device, progress)` returns a `Backend` for it.
`denoiser/loading.py` calls these for non-native configs. Plain
torch at run time: `transformers` is only the test oracle.
"""
from denoiser.open_models.families import detect_family
from denoiser.open_models.loader import load_open_model

__all__ = ["detect_family", "load_open_model"]
