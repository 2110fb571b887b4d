"""Span attention over a cached context: the Triton kernels, their launcher, the torch
reference and the dispatcher `span_attention`.

One denoising step runs the L span tokens only (L = 1..128). Their queries
attend to the first `ctx_len` keys of the static context cache (already
rotated, never masked among themselves from the span's side) and to all L
span keys (bidirectional, no mask):

    out = softmax(q @ [k_ctx[:ctx_len]; k_span]^T * scale) @ [v_ctx[:ctx_len]; v_span]

Shapes: q [B, H, L, D]; k_cache, v_cache [B, Hkv, capacity, D];
k_span, v_span [B, Hkv, L, D]; Hkv divides H (grouped-query attention, as
Qwen2 uses). `ctx_len` is an int, or an int tensor [B] (one valid length per
sequence: batched requests of different documents, and CUDA graphs that must
not bake a length in).

Why a split over the context (flash-decoding): with L this small, one program
per (batch, head) leaves most of a GPU idle while a 16k context is read. Each
program takes one (batch, kv head, query block, context chunk) and writes its
partial row max, sum of exponentials and unnormalised output; a second kernel
combines the chunks. The last chunk's program also covers the span's own keys.
All heads that share a kv head are packed into one query block, so each
context key is read once per group. With one chunk the first kernel writes
the output directly.

On the CPU (`span_attention_cpu`) the same split is the fast path too, with two
chunks: torch's fused CPU attention over the context read in place from the cache
(no copy of it) and over the span's own keys, merged by their log-sum-exps.

This module owns no cache and no model; the caller keeps keys rotated and
tracks ctx_len.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.triton_launch import multiprocessor_count, next_power_of_2, should_use_triton, tl, triton_kernel

LOG2_E = 1.4426950408889634
# A context chunk shorter than this is not worth its own program and partial row.
MIN_CHUNK = 128
MAX_SPLITS = 64


@triton_kernel
def _span_attention_kernel(
    Q, KC, VC, KS, VS, CTX_LENS, O, M_PART, L_PART, O_PART,
    span_len, group, capacity, n_kv_heads, head_dim, qk_scale,
    sq_b, sq_h, sq_l,
    skc_b, skc_h, skc_c, svc_b, svc_h, svc_c,
    sks_b, sks_h, sks_l, svs_b, svs_h, svs_l,
    so_b, so_h, so_l,
    NUM_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = (pid_bh // n_kv_heads).to(tl.int64)
    kvh = (pid_bh % n_kv_heads).to(tl.int64)
    split = tl.program_id(2)

    # Query rows of this block: all `group` heads of this kv head, L positions each.
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < group * span_len
    head = kvh * group + (rows // span_len).to(tl.int64)
    pos = (rows % span_len).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q = tl.load(Q + b * sq_b + head[:, None] * sq_h + pos[:, None] * sq_l + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # This program's context chunk; chunks are sized from the sequence's own length,
    # so a static grid adapts to ctx_len without recompiling or recapturing.
    ctx_len = tl.minimum(tl.load(CTX_LENS + b).to(tl.int32), capacity)
    chunk = tl.cdiv(tl.cdiv(ctx_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, ctx_len)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n = tl.arange(0, BLOCK_N)

    kc = KC + b * skc_b + kvh * skc_h
    vc = VC + b * svc_b + kvh * svc_h
    for start in range(lo, hi, BLOCK_N):
        cols = start + n
        ok = cols < hi
        k = tl.load(kc + cols[:, None] * skc_c + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(ok[None, :], s, float("-inf"))
        # Every executed block has a valid column, so m_new is finite: no inf - inf.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc + cols[:, None] * svc_c + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # The span's own keys, bidirectional: handled by the last chunk's program. The loop
    # repeats the one above on purpose: a shared @triton.jit helper would be bound to
    # compiled or interpreted code at import (kernels/triton_launch.py says why not).
    span_hi = tl.where(split == NUM_SPLITS - 1, span_len, 0)
    ks = KS + b * sks_b + kvh * sks_h
    vs = VS + b * svs_b + kvh * svs_h
    for start in range(0, span_hi, BLOCK_N):
        cols = start + n
        ok = cols < span_len
        k = tl.load(ks + cols[:, None] * sks_l + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vs + cols[:, None] * svs_l + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(O + b * so_b + head[:, None] * so_h + pos[:, None] * so_l + d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        # Partials [B, H, L, NUM_SPLITS(, D)]; an empty chunk leaves m = -inf, l = 0, acc = 0.
        part = ((b * n_kv_heads * group + head) * span_len + pos) * NUM_SPLITS + split
        tl.store(M_PART + part, m_i, mask=row_ok)
        tl.store(L_PART + part, l_i, mask=row_ok)
        tl.store(O_PART + part[:, None] * head_dim + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton_kernel
def _combine_splits_kernel(
    M_PART, L_PART, O_PART, O,
    n_heads, span_len, head_dim,
    so_b, so_h, so_l,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per query row (b, h, position).
    row = tl.program_id(0).to(tl.int64)
    b = row // (n_heads * span_len)
    h = (row // span_len) % n_heads
    pos = row % span_len
    s = tl.arange(0, BLOCK_S)
    s_ok = s < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    m = tl.load(M_PART + row * NUM_SPLITS + s, mask=s_ok, other=float("-inf"))
    l = tl.load(L_PART + row * NUM_SPLITS + s, mask=s_ok, other=0.0)
    acc = tl.load(O_PART + (row * NUM_SPLITS + s)[:, None] * head_dim + d[None, :],
                  mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    # The last chunk always holds the span keys, so the row max is finite.
    m_max = tl.max(m, 0)
    w = tl.exp2(m - m_max)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(O + b * so_b + h * so_h + pos * so_l + d, out.to(O.dtype.element_ty), mask=d_ok)


def _check(q: Tensor, k_cache: Tensor, v_cache: Tensor, k_span: Tensor, v_span: Tensor) -> tuple[int, int]:
    """Validate shapes; return (group, capacity)."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, L, D], got {tuple(q.shape)}")
    b, h, span, d = q.shape
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k_span", k_span), ("v_span", v_span)):
        if t.dim() != 4 or t.shape[0] != b or t.shape[3] != d:
            raise ValueError(f"{name} must be [B={b}, Hkv, *, D={d}], got {tuple(t.shape)}")
    hkv = k_cache.shape[1]
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} differs from k_cache {tuple(k_cache.shape)}")
    if k_span.shape != (b, hkv, span, d) or v_span.shape != k_span.shape:
        raise ValueError(f"k_span/v_span must be {(b, hkv, span, d)}, got {tuple(k_span.shape)}/{tuple(v_span.shape)}")
    if hkv == 0 or h % hkv:
        raise ValueError(f"n_heads {h} is not a multiple of n_kv_heads {hkv}")
    if span == 0:
        raise ValueError("span attention needs at least one span token")
    return h // hkv, k_cache.shape[2]


def _ctx_lens(ctx_len: int | Tensor, batch: int, capacity: int, device) -> Tensor:
    if isinstance(ctx_len, Tensor):
        if ctx_len.shape not in ((batch,), ()):
            raise ValueError(f"ctx_len tensor must have shape ({batch},), got {tuple(ctx_len.shape)}")
        return ctx_len.to(device=device, dtype=torch.int32).expand(batch)
    if not 0 <= ctx_len <= capacity:
        raise ValueError(f"ctx_len {ctx_len} is outside the cache (capacity {capacity})")
    return torch.full((batch,), ctx_len, dtype=torch.int32, device=device)


def span_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, k_span: Tensor, v_span: Tensor,
                             ctx_len: int | Tensor, *, scale: float | None = None) -> Tensor:
    """Torch reference (fp32 maths, result in q.dtype)."""
    group, capacity = _check(q, k_cache, v_cache, k_span, v_span)
    b, _, span, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if isinstance(ctx_len, Tensor):
        lens = _ctx_lens(ctx_len, b, capacity, q.device).to(torch.long).clamp(0, capacity)
        # Read only up to the longest context (a host sync, fine for the fallback), mask the rest.
        n = int(lens.max())
        valid = torch.arange(n + span, device=q.device).view(1, -1) < lens.view(-1, 1)
        valid[:, n:] = True
        mask = valid.view(b, 1, 1, n + span)
    else:
        _ctx_lens(ctx_len, b, capacity, "cpu")  # range check only
        n, mask = ctx_len, None
    k = torch.cat((k_cache[:, :, :n], k_span), dim=2).float()
    v = torch.cat((v_cache[:, :, :n], v_span), dim=2).float()
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask, scale=scale)
    return out.to(q.dtype)


# torch's fused CPU attention, which also returns each row's log-sum-exp (absent from some builds).
_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def span_attention_cpu(q: Tensor, k_cache: Tensor, v_cache: Tensor, k_span: Tensor, v_span: Tensor,
                       ctx_len: int | Tensor, *, scale: float | None = None) -> Tensor:
    """The CPU path: the context and the span attended apart, then merged (same maths as the reference).

    Concatenating [k_ctx; k_span] would copy the whole cached context in every layer of
    every step (a fifth of the attention's time at a 1k context, more where malloc maps
    each large copy afresh); instead the context keys are read
    in place and the two partial results combined by their row log-sum-exps, as the
    Triton kernel's combine does: out = lerp(o_ctx, o_span, sigmoid(lse_span - lse_ctx)).
    Output rows come back in q's memory order, so a q that is a transposed [B, L, H, D]
    view gives an output whose transpose is contiguous. Falls back to the reference
    for what the fused op does not take (grouped heads, mixed dtypes, a build without it).
    """
    group, capacity = _check(q, k_cache, v_cache, k_span, v_span)
    dtypes = {q.dtype, k_cache.dtype, v_cache.dtype, k_span.dtype, v_span.dtype}
    if _flash_cpu is None or group > 1 or len(dtypes) > 1:
        return span_attention_reference(q, k_cache, v_cache, k_span, v_span, ctx_len, scale=scale)
    b, _, _, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if isinstance(ctx_len, Tensor):
        lens = _ctx_lens(ctx_len, b, capacity, q.device).clamp(0, capacity).tolist()
    elif 0 <= ctx_len <= capacity:
        lens = [ctx_len] * b
    else:
        raise ValueError(f"ctx_len {ctx_len} is outside the cache (capacity {capacity})")
    out, lse_span = _flash_cpu(q, k_span, v_span, scale=scale)
    if len(set(lens)) == 1:
        return _merge_context(out, lse_span, q, k_cache, v_cache, lens[0], scale)
    # One context length per row: each row reads its own context.
    for row, n in enumerate(lens):
        rows = slice(row, row + 1)
        out[rows] = _merge_context(out[rows], lse_span[rows], q[rows], k_cache[rows], v_cache[rows], n, scale)
    return out


def prefill_attention_cpu(q: Tensor, k_cache: Tensor, v_cache: Tensor, start: int, *,
                          scale: float | None = None) -> Tensor:
    """Causal attention of L new context tokens at positions start.. whose keys and values are
    already in the cache at [start, start + L): query i sees keys 0..start + i.

    q [B, H, L, D]; k_cache, v_cache [B, H, capacity, D]. The same split as
    `span_attention_cpu`: the new block attends to itself causally, the earlier context
    in full, merged by log-sum-exp; no [L, start + L] mask is built or read, and the
    block's upper triangle is skipped. Falls back to a masked `F.scaled_dot_product_attention`
    where the fused op cannot run.
    """
    b, h, n, d = q.shape
    end = start + n
    if start < 0 or end > k_cache.shape[2]:
        raise ValueError(f"positions {start}..{end} are outside the cache (capacity {k_cache.shape[2]})")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if _flash_cpu is None or k_cache.shape[1] != h or len({q.dtype, k_cache.dtype, v_cache.dtype}) > 1:
        mask = torch.ones(n, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        return F.scaled_dot_product_attention(q, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=mask, scale=scale)
    out, lse = _flash_cpu(q, k_cache[:, :, start:end], v_cache[:, :, start:end], is_causal=True, scale=scale)
    return _merge_context(out, lse, q, k_cache, v_cache, start, scale)


def _merge_context(out: Tensor, lse_span: Tensor, q: Tensor, k_cache: Tensor, v_cache: Tensor, n: int,
                   scale: float) -> Tensor:
    """Span-only attention (out, lse_span) merged with attention over the first n context keys."""
    if n == 0:  # nothing to merge (and the fused op would divide by zero keys)
        return out
    ctx, lse_ctx = _flash_cpu(q, k_cache[:, :, :n], v_cache[:, :, :n], scale=scale)
    # The span's share of the softmax mass: exp(lse_span) / (exp(lse_ctx) + exp(lse_span)).
    return ctx.lerp_(out, torch.sigmoid(lse_span.sub_(lse_ctx)).unsqueeze(-1))


def choose_num_splits(batch: int, n_kv_heads: int, query_blocks: int, max_ctx: int, device: torch.device) -> int:
    """Context chunks per (batch, kv head, query block): enough programs to fill the GPU twice over."""
    programs = batch * n_kv_heads * query_blocks
    wanted = -(-2 * multiprocessor_count(device) // max(1, programs))
    return max(1, min(wanted, -(-max_ctx // MIN_CHUNK), MAX_SPLITS))


def span_attention_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, k_span: Tensor, v_span: Tensor,
                          ctx_len: int | Tensor, *, scale: float | None = None, num_splits: int | None = None,
                          block_m: int | None = None, block_n: int | None = None) -> Tensor:
    """Launch the split-context kernel (and the combine kernel when num_splits > 1)."""
    group, capacity = _check(q, k_cache, v_cache, k_span, v_span)
    b, h, span, d = q.shape
    hkv = k_cache.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    lens = _ctx_lens(ctx_len, b, capacity, q.device)
    q, k_cache, v_cache, k_span, v_span = (
        t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache, k_span, v_span)
    )
    if capacity == 0:  # never dereferenced (ctx_len is clamped to 0), but needs a valid pointer
        k_cache, v_cache = k_span, v_span
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    rows = group * span
    block_m = block_m or max(16, min(64, next_power_of_2(rows)))
    block_n = block_n or (64 if d <= 64 else 32)
    block_d = max(16, next_power_of_2(d))
    query_blocks = -(-rows // block_m)
    if num_splits is None:
        max_ctx = capacity if isinstance(ctx_len, Tensor) else ctx_len
        num_splits = choose_num_splits(b, hkv, query_blocks, max_ctx, q.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if num_splits > 1:
        part = (b, h, span, num_splits)
        m_part = torch.empty(part, dtype=torch.float32, device=q.device)
        l_part = torch.empty(part, dtype=torch.float32, device=q.device)
        o_part = torch.empty(part + (d,), dtype=torch.float32, device=q.device)
    else:
        m_part = l_part = o_part = out  # unused
    _span_attention_kernel[(b * hkv, query_blocks, num_splits)](
        q, k_cache, v_cache, k_span, v_span, lens, out, m_part, l_part, o_part,
        span, group, capacity, hkv, d, scale * LOG2_E,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_span.stride(0), k_span.stride(1), k_span.stride(2),
        v_span.stride(0), v_span.stride(1), v_span.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        NUM_SPLITS=num_splits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        # fp32 inputs: three tf32 products, about fp32 accuracy (the oracle path); 16-bit inputs ignore this.
        PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=2,
    )
    if num_splits > 1:
        _combine_splits_kernel[(b * h * span,)](
            m_part, l_part, o_part, out,
            h, span, d,
            out.stride(0), out.stride(1), out.stride(2),
            NUM_SPLITS=num_splits, BLOCK_S=max(2, next_power_of_2(num_splits)), BLOCK_D=block_d,
            num_warps=1 if d <= 64 else 2,
        )
    return out


def span_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, k_span: Tensor, v_span: Tensor,
                   ctx_len: int | Tensor, *, scale: float | None = None, num_splits: int | None = None,
                   use_triton: bool | None = None) -> Tensor:
    """Attention of span queries over ctx_len cached context keys plus all span keys.

    q [B, H, L, D]; k_cache, v_cache [B, Hkv, capacity, D]; k_span, v_span
    [B, Hkv, L, D]; ctx_len int or int tensor [B] (<= capacity). scale defaults
    to 1/sqrt(D). Returns [B, H, L, D] in q's dtype.
    use_triton: None = Triton on CUDA, `span_attention_cpu` on the CPU, the torch
    reference elsewhere; True = Triton (on CPU tensors only with TRITON_INTERPRET=1);
    False = the reference.
    """
    # ctx_len is left out of the device check: a host tensor is copied over.
    if should_use_triton(use_triton, q, k_cache, v_cache, k_span, v_span):
        return span_attention_triton(q, k_cache, v_cache, k_span, v_span, ctx_len, scale=scale, num_splits=num_splits)
    if use_triton is None and q.device.type == "cpu":
        return span_attention_cpu(q, k_cache, v_cache, k_span, v_span, ctx_len, scale=scale)
    return span_attention_reference(q, k_cache, v_cache, k_span, v_span, ctx_len, scale=scale)
