"""Rotary position embedding (rotate-half convention, as LLaMA and Qwen2) on q and k:
the Triton kernel, its launcher, the torch reference and the dispatcher `apply_rotary`.

out = x * cos + rotate_half(x) * sin, rotate_half([x1, x2]) = [-x2, x1], with
cos/sin rows of width head_dim. The tables are either indexed by `positions`
(tables [P, D], positions [B, T] or [T]) or given per token ([T, D] or
[B, T, D], positions=None). One program rotates every head of q and k for one
token, so the cos/sin row is read once. q and k may have different head counts
(grouped-query attention). Maths is fp32, the result is cast to the input
dtype. This module builds no model and caches nothing.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels.triton_launch import next_power_of_2, should_use_triton, tl, triton_kernel


@triton_kernel
def _rotary_kernel(
    Q, K, COS, SIN, POS, QO, KO,
    T, n_q_heads, n_k_heads, half,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t,
    sqo_b, sqo_h, sqo_t, sko_b, sko_h, sko_t,
    scos_b, scos_t, scos_row,
    spos_b, spos_t,
    HAS_POSITIONS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    if HAS_POSITIONS:
        row = tl.load(POS + b * spos_b + t * spos_t).to(tl.int64)
        table = row * scos_row
    else:
        table = b * scos_b + t * scos_t
    d = tl.arange(0, BLOCK_HALF)
    d_ok = d < half
    # Both halves of the tables are read, so tables need not repeat their first half.
    cos1 = tl.load(COS + table + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(COS + table + half + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(SIN + table + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(SIN + table + half + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    heads = tl.arange(0, BLOCK_H)

    for h0 in range(0, n_q_heads, BLOCK_H):
        h = (h0 + heads).to(tl.int64)[:, None]
        ok = (h < n_q_heads) & d_ok[None, :]
        src = Q + b * sq_b + t * sq_t + h * sq_h
        x1 = tl.load(src + d[None, :], mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + half + d[None, :], mask=ok, other=0.0).to(tl.float32)
        dst = QO + b * sqo_b + t * sqo_t + h * sqo_h
        tl.store(dst + d[None, :], (x1 * cos1 - x2 * sin1).to(QO.dtype.element_ty), mask=ok)
        tl.store(dst + half + d[None, :], (x2 * cos2 + x1 * sin2).to(QO.dtype.element_ty), mask=ok)

    for h0 in range(0, n_k_heads, BLOCK_H):
        h = (h0 + heads).to(tl.int64)[:, None]
        ok = (h < n_k_heads) & d_ok[None, :]
        src = K + b * sk_b + t * sk_t + h * sk_h
        x1 = tl.load(src + d[None, :], mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + half + d[None, :], mask=ok, other=0.0).to(tl.float32)
        dst = KO + b * sko_b + t * sko_t + h * sko_h
        tl.store(dst + d[None, :], (x1 * cos1 - x2 * sin1).to(KO.dtype.element_ty), mask=ok)
        tl.store(dst + half + d[None, :], (x2 * cos2 + x1 * sin2).to(KO.dtype.element_ty), mask=ok)


def rotary_tables(head_dim: int, max_positions: int, theta: float = 10000.0, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin tables [max_positions, head_dim] (fp32), inv_freq = theta^(-2i/d), halves repeated."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def _per_token(table: Tensor, positions: Tensor | None, batch: int, tokens: int) -> Tensor:
    """cos or sin as [B, T, D] (fp32) from a table + positions, or from per-token rows."""
    rows = table[positions] if positions is not None else table
    if rows.dim() == 2:  # [T, D]: shared by the batch
        rows = rows.unsqueeze(0)
    return rows.float().expand(batch, tokens, -1)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)).to(x.dtype)


def _check(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, H, T, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    (b, _, t, d), (bk, _, tk, dk) = q.shape, k.shape
    if (b, t, d) != (bk, tk, dk):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, tokens or head_dim")
    if d % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {d}")
    if cos.shape != sin.shape or cos.shape[-1] != d:
        raise ValueError(f"cos {tuple(cos.shape)} / sin {tuple(sin.shape)} must match and end in head_dim {d}")
    if positions is None and cos.shape[-2] != t:
        raise ValueError(f"per-token cos/sin must have {t} rows (one per token), got {tuple(cos.shape)}")
    if positions is not None and positions.shape not in ((b, t), (t,)):
        raise ValueError(f"positions must be [B, T] or [T] = {(b, t)} or {(t,)}, got {tuple(positions.shape)}")


def apply_rotary_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor | None = None):
    """Torch reference: (rotated q, rotated k), fp32 maths, input dtypes kept."""
    _check(q, k, cos, sin, positions)
    b, _, t, _ = q.shape
    c, s = _per_token(cos, positions, b, t), _per_token(sin, positions, b, t)
    return _rotate(q, c, s), _rotate(k, c, s)


def apply_rotary_triton(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor | None = None):
    """Launch the Triton kernel: one program per (batch, token)."""
    _check(q, k, cos, sin, positions)
    b, hq, t, d = q.shape
    hk = k.shape[1]
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if positions is None:  # per-token rows: view them as [B, T, D] (stride 0 where shared)
        cos = cos.expand(b, t, d) if cos.dim() == 3 else cos.unsqueeze(0).expand(b, t, d)
        sin = sin.expand(b, t, d) if sin.dim() == 3 else sin.unsqueeze(0).expand(b, t, d)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        # The kernel addresses cos and sin with one set of strides.
        cos, sin = cos.contiguous(), sin.contiguous()
    if positions is not None:
        pos = positions if positions.dim() == 2 else positions.unsqueeze(0).expand(b, t)
        pos_strides = pos.stride()
        scos = (0, 0, cos.stride(0))
    else:
        pos, pos_strides = cos, (0, 0)  # unused pointer
        scos = (cos.stride(0), cos.stride(1), 0)
    if b * t == 0:
        return q_out, k_out
    half = d // 2
    _rotary_kernel[(b * t,)](
        q, k, cos, sin, pos, q_out, k_out,
        t, hq, hk, half,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        *scos, *pos_strides,
        HAS_POSITIONS=positions is not None,
        BLOCK_H=min(16, next_power_of_2(max(hq, hk))),
        BLOCK_HALF=next_power_of_2(half),
        num_warps=4 if d >= 128 else 2,
    )
    return q_out, k_out


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor | None = None, *,
                 use_triton: bool | None = None) -> tuple[Tensor, Tensor]:
    """Rotate q [B, Hq, T, D] and k [B, Hk, T, D]; returns new tensors.

    cos/sin: tables [P, D] indexed by positions ([B, T] or [T] ints), or, with
    positions=None, per-token rows [T, D] or [B, T, D].
    use_triton: None = Triton on CUDA, the torch reference elsewhere;
    True = Triton (on CPU tensors only with TRITON_INTERPRET=1); False = reference.
    """
    tensors = (q, k, cos, sin) + ((positions,) if positions is not None else ())
    if should_use_triton(use_triton, *tensors):
        return apply_rotary_triton(q, k, cos, sin, positions)
    return apply_rotary_reference(q, k, cos, sin, positions)
