"""The arithmetic of one training step: precision, the compiled loss, its FLOP count.

On a CPU with AVX-512 BF16 or AMX a bf16 matmul runs at more than twice the fp32
rate, so the loss is computed under bf16 autocast while the master weights and
the optimizer stay fp32. `torch.compile` fuses the many small element-wise ops
(norms, rotary, SwiGLU, casts) around the matmuls; it needs the same shapes
every step, which `collate(..., region=...)` gives. Knows nothing of data.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from denoiser.config import ModelConfig
from training.train import PRECISIONS


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN runs bf16 matmuls natively (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" → bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()):
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """bf16 autocast for the forward pass (weights and optimizer stay fp32)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compiled(loss_fn: Callable, enabled: bool) -> Callable:
    """loss_fn compiled for static shapes (one graph per span length), or as it is."""
    return torch.compile(loss_fn, dynamic=False) if enabled else loss_fn


def body_parameters(config: ModelConfig) -> int:
    """Parameters of the matmuls every position runs through (not the embedding or head)."""
    d, f = config.d_model, config.d_ff
    return config.n_layers * (3 * d * d + d * d + 2 * d * f + f * d)


def step_flops(config: ModelConfig, batch: int, sequence: int, head_positions: int) -> float:
    """Forward + backward FLOPs of one step: 3 × (2 per multiply-add) of what the model computes.

    `sequence` is the length every example is run at (causal region + span); the
    attention counts the full square; `head_positions` is how many positions per
    example go through the tied output head (span plus next-token positions).
    """
    positions = batch * sequence
    body = 2 * body_parameters(config) * positions
    attention = config.n_layers * 4 * sequence * config.d_model * positions
    head = 2 * config.d_model * config.vocab_size * batch * head_positions
    return 3.0 * (body + attention + head)
