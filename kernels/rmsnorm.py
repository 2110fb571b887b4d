"""Fused RMSNorm, optionally after a residual add: the Triton kernel, its launcher,
the torch reference and the dispatcher `rms_norm`.

Semantics match denoiser/model.py's RMSNorm: the row is normalised in fp32,
scaled by the fp32 weight and cast back to the input dtype. With a residual,
`h = x + residual` is rounded to the input dtype first (as the model's
`x = x + attn` is), and both the normalised `h` and `h` itself are returned, so
a pre-norm block reads its activations once. This module does no matmuls and
knows nothing of the model around it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels.triton_launch import next_power_of_2, should_use_triton, tl, triton_kernel


@triton_kernel
def _rmsnorm_kernel(
    X, R, W, Y, H,
    stride_x, stride_r, stride_y, stride_h,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per row: rows are at most a few thousand wide, so one block holds one.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=valid, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=valid, other=0.0)
        # Round the sum to the storage dtype before normalising, as the model does.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(Y.dtype.element_ty)
        tl.store(H + row * stride_h + cols, x, mask=valid)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    w = tl.load(W + cols, mask=valid, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (xf * rstd * w).to(Y.dtype.element_ty), mask=valid)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    """Torch reference: y = x / rms(x) * weight (fp32 maths), or (y, h) with h = x + residual."""
    h = x if residual is None else x + residual
    hf = h.float()
    y = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return y if residual is None else (y, h)


def _as_rows(t: Tensor, n_cols: int) -> Tensor:
    rows = t.reshape(-1, n_cols)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rms_norm_triton(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    """Launch the Triton kernel over every row of x ([..., d])."""
    d = x.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({d},)")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} differs from x {tuple(x.shape)}")
    x2 = _as_rows(x, d)
    r2 = _as_rows(residual, d) if residual is not None else x2
    y = torch.empty_like(x2)
    h = torch.empty_like(x2) if residual is not None else y
    n_rows = x2.shape[0]
    if n_rows:
        block = max(16, next_power_of_2(d))
        _rmsnorm_kernel[(n_rows,)](
            x2, r2, weight, y, h,
            x2.stride(0), r2.stride(0), y.stride(0), h.stride(0),
            d, float(eps),
            HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
        )
    y = y.view(x.shape)
    return y if residual is None else (y, h.view(x.shape))


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None, *, use_triton: bool | None = None):
    """RMSNorm of x (or of x + residual, returning (normed, x + residual)).

    use_triton: None = Triton on CUDA, the torch reference elsewhere;
    True = Triton (on CPU tensors only with TRITON_INTERPRET=1); False = reference.
    """
    tensors = (x, weight) if residual is None else (x, weight, residual)
    if should_use_triton(use_triton, *tensors):
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_reference(x, weight, eps, residual)
