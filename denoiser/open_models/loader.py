"""`load_open_model`: a local open-model directory to a ready `OpenModelBackend`.

Order matters: config, family, tokenizer and shard/tensor checks, then the
memory estimate, all before a single weight is read; only then are weights
streamed (memory-mapped, one tensor at a time) to the device. Every problem a
user can cause is a `ModelLoadError` whose message says what to do.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from denoiser.backend import resolve_device
from denoiser.open_models.checkpoint import check_fits, inspect_directory, stream_weights
from denoiser.open_models.hf_tokenizer import load_tokenizer
from denoiser.open_models.infill_backend import OpenModelBackend
from denoiser.open_models.network import BidirectionalTransformer, LayerWeights

Progress = Callable[[str, float], None]


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 halves memory and bandwidth on GPUs; CPUs run fp32 matmuls far faster than bf16.
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_open_model(model_dir: str | Path, device: str | torch.device = "auto", progress: Progress | None = None, *,
                    dtype: torch.dtype | None = None, cache_mode: str = "dual", refresh_every: int = 4,
                    initial_span: int = 32, max_context_tokens: int = 2048,
                    available_memory: int | None = None) -> OpenModelBackend:
    """Load an open diffusion LLM directory (Dream family, LLaDA, Open-dCoder) as a Backend."""
    report = progress or (lambda message, percent: None)
    model_dir = Path(model_dir)
    dev = resolve_device(device)
    dtype = dtype or default_dtype(dev)
    report(f"checking {model_dir}", 0.0)
    plan = inspect_directory(model_dir)
    tokenizer = load_tokenizer(model_dir, plan.spec, plan.config)
    check_fits(plan.spec, dev, dtype, available_memory)
    report(f"loading {plan.spec.family} weights to {dev}", 1.0)

    spec = plan.spec
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in stream_weights(plan, dev, dtype, lambda m, p: report(m, 1.0 + 0.98 * p)):
        tensors[name] = tensor
    layers = []
    for i in range(spec.shape.num_layers):
        parts = {role: tensors.pop(t.format(i=i)) for role, t in spec.layer_names.items()
                 if not (role.endswith("_bias") and not spec.shape.qkv_bias)}
        layers.append(LayerWeights(**parts))
    embed = tensors.pop(spec.embed_name)
    lm_head = embed if spec.lm_head_name is None else tensors.pop(spec.lm_head_name)
    model = BidirectionalTransformer(spec.shape, embed, tensors.pop(spec.final_norm_name), lm_head, layers)
    backend = OpenModelBackend(model, tokenizer, spec, name=f"{spec.family}:{model_dir.name}", cache_mode=cache_mode,
                               refresh_every=refresh_every, initial_span=initial_span,
                               max_context_tokens=max_context_tokens)
    report(f"{spec.family} model ready on {dev}", 100.0)
    return backend
