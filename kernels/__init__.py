"""Fused ops for the denoising step: each a Triton kernel beside a plain torch reference.

Every op dispatches by itself: Triton on CUDA tensors (when triton is
installed), the torch reference otherwise, which is both the CPU fallback and
the oracle the tests compare the kernels with (docs/KERNELS.md). Nothing here
knows about models, caches or sampling policy.
"""
from kernels.lm_head_argmax import lm_head_argmax, lm_head_argmax_reference
from kernels.rmsnorm import rms_norm, rms_norm_reference
from kernels.rotary import apply_rotary, apply_rotary_reference, rotary_tables
from kernels.span_attention import span_attention, span_attention_reference

__all__ = [
    "apply_rotary",
    "apply_rotary_reference",
    "lm_head_argmax",
    "lm_head_argmax_reference",
    "rms_norm",
    "rms_norm_reference",
    "rotary_tables",
    "span_attention",
    "span_attention_reference",
]
