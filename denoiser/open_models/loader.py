"""`load_open_model`: a local open-model directory to a ready `OpenModelBackend`.

Order matters: config, family, tokenizer and shard/tensor checks, then the
memory estimate, all before a single weight is read; only then are weights
streamed (memory-mapped, one tensor at a time) to the device, and with
`int8=True` each projection is quantized as it arrives, so host memory never
holds the model in a wider type. Every problem a user can cause is a
`ModelLoadError` whose message says what to do.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from denoiser.backend import ModelLoadError, resolve_device
from denoiser.open_models.checkpoint import check_fits, inspect_directory, stream_weights
from denoiser.open_models.hf_tokenizer import load_tokenizer
from denoiser.open_models.infill_backend import OpenModelBackend
from denoiser.open_models.keystroke_cache import KeystrokeCachePolicy
from denoiser.open_models.network import BidirectionalTransformer, Int8Linear, LayerWeights

Progress = Callable[[str, float], None]


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 halves memory and bandwidth on GPUs. On a CPU fp32 stays the default (exact, and the
    # only fast path on CPUs without native bf16); `dtype=torch.bfloat16` or `int8=True` trade a
    # little accuracy for memory: see `python -m tools.open_model_bench --cpu-costs`.
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_open_model(model_dir: str | Path, device: str | torch.device = "auto", progress: Progress | None = None, *,
                    dtype: torch.dtype | None = None, int8: bool = False, cache_mode: str = "dual",
                    refresh_every: int = 4, initial_span: int = 32, max_context_tokens: int = 2048,
                    available_memory: int | None = None,
                    keystroke_cache: bool | KeystrokeCachePolicy | None = None) -> OpenModelBackend:
    """Load an open diffusion LLM directory (Dream family, LLaDA, Open-dCoder) as a Backend.

    `int8=True` (CPU only) stores every projection as int8 per output channel and the
    embedding table in bf16, about half the memory of bf16 weights; activations run in fp32.
    `keystroke_cache=True` (or a `KeystrokeCachePolicy`) reuses each document's context keys/values
    approximately from one request to the next (docs/OPEN_MODELS.md, "Keystroke cache").
    """
    report = progress or (lambda message, percent: None)
    model_dir = Path(model_dir)
    dev = resolve_device(device)
    if int8 and dev.type != "cpu":
        raise ModelLoadError(f"int8 weights run on the CPU only, not on {dev}; load bf16 weights there instead")
    dtype = torch.float32 if int8 else (dtype or default_dtype(dev))
    report(f"checking {model_dir}", 0.0)
    plan = inspect_directory(model_dir)
    tokenizer = load_tokenizer(model_dir, plan.spec, plan.config)
    check_fits(plan.spec, dev, dtype, available_memory, int8=int8)
    report(f"loading {plan.spec.family} weights to {dev}{' as int8' if int8 else ''}", 1.0)

    spec = plan.spec
    projections = {t.format(i=i) for i in range(spec.shape.num_layers)
                   for role, t in spec.layer_names.items() if role.endswith("_proj")}
    if spec.lm_head_name is not None:
        projections.add(spec.lm_head_name)
    tensors: dict[str, torch.Tensor | Int8Linear] = {}
    tied_head: Int8Linear | None = None
    for name, tensor in stream_weights(plan, dev, dtype, lambda m, p: report(m, 1.0 + 0.98 * p)):
        if int8 and name in projections:
            tensor = Int8Linear(tensor)
        elif int8 and name == spec.embed_name:
            # Rows are looked up, not multiplied: bf16 keeps them exact enough at half the bytes.
            # A tied output head gets its own int8 copy for the matmul.
            tied_head = Int8Linear(tensor) if spec.lm_head_name is None else None
            tensor = tensor.to(torch.bfloat16)
        tensors[name] = tensor
    layers = []
    for i in range(spec.shape.num_layers):
        parts = {role: tensors.pop(t.format(i=i)) for role, t in spec.layer_names.items()
                 if not (role.endswith("_bias") and not spec.shape.qkv_bias)}
        layers.append(LayerWeights(**parts))
    embed = tensors.pop(spec.embed_name)
    lm_head = tied_head or (embed if spec.lm_head_name is None else tensors.pop(spec.lm_head_name))
    model = BidirectionalTransformer(spec.shape, embed, tensors.pop(spec.final_norm_name), lm_head, layers)
    weights = "int8" if int8 else {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    backend = OpenModelBackend(model, tokenizer, spec, name=f"{spec.family}:{model_dir.name}", cache_mode=cache_mode,
                               refresh_every=refresh_every, initial_span=initial_span,
                               max_context_tokens=max_context_tokens, keystroke_cache=keystroke_cache,
                               weights=weights)
    report(f"{spec.family} model ready on {dev} ({weights} weights)", 100.0)
    return backend
