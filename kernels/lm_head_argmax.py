"""Final RMSNorm + LM head + greedy token and its probability, without the [N, V] tensor:
the Triton kernel, its launcher, the torch reference and the dispatcher `lm_head_argmax`.

A denoising step only needs, per span position, the most likely token and its
softmax probability (the confidence that decides whether it is committed).
Materialising N x V logits and then probabilities costs more memory traffic
than the head's weights themselves at a 32k-150k vocabulary; instead each
program normalises its rows, multiplies them by one chunk of the vocabulary,
tile by tile, and keeps an online softmax: running max, running sum of
exp(logit - max) and the index of the max. A small combine reduces the
chunks: confidence = 1 / sum_j s_j * exp(m_j - M).

Tokens may be excluded (set to -inf before the softmax, as the sampler does):
`banned_ids` (a few ids, e.g. the mask and prompt markers) and `vocab_limit`
(ids >= it, e.g. padding rows of an embedding). Ties go to the lowest id, as
torch.argmax. This module does no sampling and keeps no state.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels.rmsnorm import rms_norm_reference
from kernels.triton_launch import multiprocessor_count, next_power_of_2, should_use_triton, tl, triton_kernel

# A vocabulary chunk smaller than this is not worth its own program.
MIN_VOCAB_CHUNK = 128
MAX_SPLITS = 256


@triton_kernel
def _lm_head_argmax_kernel(
    X, W, E, BANNED, M_PART, S_PART, I_PART,
    n_rows, d_model, n_vocab, n_banned, eps,
    stride_x, stride_e,
    NUM_SPLITS: tl.constexpr,
    HAS_BANNED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    x_rows = X + rows.to(tl.int64)[:, None] * stride_x
    split = tl.program_id(1)
    k = tl.arange(0, BLOCK_K)

    # Pass 1 over the hidden size: the RMS of each row.
    sq = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, d_model, BLOCK_K):
        ok = row_ok[:, None] & (k0 + k < d_model)[None, :]
        x = tl.load(x_rows + k0 + k[None, :], mask=ok, other=0.0).to(tl.float32)
        sq += tl.sum(x * x, 1)
    rstd = 1.0 / tl.sqrt(sq / d_model + eps)

    chunk = tl.cdiv(tl.cdiv(n_vocab, NUM_SPLITS), BLOCK_V) * BLOCK_V
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n_vocab)
    v = tl.arange(0, BLOCK_V)
    if HAS_BANNED:
        nb = tl.arange(0, BLOCK_B)
        banned = tl.load(BANNED + nb, mask=nb < n_banned, other=-1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s_i = tl.zeros([BLOCK_M], tl.float32)
    best = tl.zeros([BLOCK_M], tl.int32)
    for v0 in range(lo, hi, BLOCK_V):
        cols = v0 + v
        col_ok = cols < hi
        e_rows = E + cols.to(tl.int64)[:, None] * stride_e
        logits = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
        for k0 in range(0, d_model, BLOCK_K):
            kk = k0 + k
            k_ok = kk < d_model
            x = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(W + kk, mask=k_ok, other=0.0).to(tl.float32)
            # Round the normalised rows as the model's RMSNorm output is rounded.
            xn = (x.to(tl.float32) * rstd[:, None] * w[None, :]).to(X.dtype.element_ty).to(E.dtype.element_ty)
            e = tl.load(e_rows + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            logits += tl.dot(xn, tl.trans(e), input_precision=PRECISION)
        keep = col_ok
        if HAS_BANNED:
            keep = keep & (tl.sum((cols[:, None] == banned[None, :]).to(tl.int32), 1) == 0)
        logits = tl.where(keep[None, :], logits, float("-inf"))
        tile_max = tl.max(logits, 1)
        tile_arg = tl.argmax(logits, 1).to(tl.int32) + v0
        m_new = tl.maximum(m_i, tile_max)
        # A tile can be wholly excluded; keep exp() away from -inf - -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_i = s_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), 1)
        # Strictly greater: an equal logit in a later tile has a higher id and loses.
        best = tl.where(tile_max > m_i, tile_arg, best)
        m_i = m_new

    part = rows.to(tl.int64) * NUM_SPLITS + split
    tl.store(M_PART + part, m_i, mask=row_ok)
    tl.store(S_PART + part, s_i, mask=row_ok)
    tl.store(I_PART + part, best, mask=row_ok)


def _check(hidden: Tensor, norm_weight: Tensor, embed_weight: Tensor) -> None:
    d = hidden.shape[-1]
    if norm_weight.shape != (d,):
        raise ValueError(f"norm_weight has shape {tuple(norm_weight.shape)}, expected ({d},)")
    if embed_weight.dim() != 2 or embed_weight.shape[1] != d:
        raise ValueError(f"embed_weight must be [V, {d}], got {tuple(embed_weight.shape)}")


def _vocab(embed_weight: Tensor, vocab_limit: int | None) -> int:
    n = embed_weight.shape[0]
    if vocab_limit is not None and not 0 < vocab_limit:
        raise ValueError(f"vocab_limit must be positive, got {vocab_limit}")
    return n if vocab_limit is None else min(n, vocab_limit)


def lm_head_argmax_reference(hidden: Tensor, norm_weight: Tensor, eps: float, embed_weight: Tensor, *,
                             banned_ids: Tensor | None = None, vocab_limit: int | None = None) -> tuple[Tensor, Tensor]:
    """Torch reference (materialises the logits): (token ids int64 [...], confidence fp32 [...])."""
    _check(hidden, norm_weight, embed_weight)
    n_vocab = _vocab(embed_weight, vocab_limit)
    x = rms_norm_reference(hidden, norm_weight, eps).to(embed_weight.dtype)
    logits = x.float() @ embed_weight[:n_vocab].float().t()
    if banned_ids is not None and banned_ids.numel():
        ids = banned_ids.to(device=logits.device, dtype=torch.long)
        logits[..., ids[ids < n_vocab]] = float("-inf")
    # max p = exp(max logit - logsumexp): one pass less than softmax, no [.., V] probabilities.
    best, token = logits.max(dim=-1)
    return token, torch.exp(best - torch.logsumexp(logits, dim=-1))


def choose_num_splits(row_blocks: int, n_vocab: int, device: torch.device) -> int:
    """Vocabulary chunks per row block: enough programs to fill the GPU twice over."""
    wanted = -(-2 * multiprocessor_count(device) // max(1, row_blocks))
    return max(1, min(wanted, -(-n_vocab // MIN_VOCAB_CHUNK), MAX_SPLITS))


def lm_head_argmax_triton(hidden: Tensor, norm_weight: Tensor, eps: float, embed_weight: Tensor, *,
                          banned_ids: Tensor | None = None, vocab_limit: int | None = None,
                          num_splits: int | None = None, block_m: int | None = None,
                          block_v: int | None = None, block_k: int | None = None) -> tuple[Tensor, Tensor]:
    """Launch the fused kernel over vocabulary chunks, then combine the chunks (tiny [N, S] tensors)."""
    _check(hidden, norm_weight, embed_weight)
    d = hidden.shape[-1]
    lead = hidden.shape[:-1]
    x = hidden.reshape(-1, d)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if embed_weight.stride(-1) != 1:
        embed_weight = embed_weight.contiguous()
    n_rows = x.shape[0]
    n_vocab = _vocab(embed_weight, vocab_limit)
    if n_rows == 0:
        return (torch.empty(lead, dtype=torch.long, device=x.device),
                torch.empty(lead, dtype=torch.float32, device=x.device))
    block_m = block_m or max(16, min(64, next_power_of_2(n_rows)))
    block_v = block_v or 64
    block_k = block_k or max(16, min(64, next_power_of_2(d)))
    row_blocks = -(-n_rows // block_m)
    num_splits = num_splits or choose_num_splits(row_blocks, n_vocab, x.device)
    banned = None
    if banned_ids is not None and banned_ids.numel():
        banned = banned_ids.to(device=x.device, dtype=torch.int32).flatten()
    m_part = torch.empty((n_rows, num_splits), dtype=torch.float32, device=x.device)
    s_part = torch.empty_like(m_part)
    i_part = torch.empty((n_rows, num_splits), dtype=torch.int32, device=x.device)
    _lm_head_argmax_kernel[(row_blocks, num_splits)](
        x, norm_weight, embed_weight, banned if banned is not None else i_part, m_part, s_part, i_part,
        n_rows, d, n_vocab, 0 if banned is None else banned.numel(), float(eps),
        x.stride(0), embed_weight.stride(0),
        NUM_SPLITS=num_splits, HAS_BANNED=banned is not None,
        BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k,
        BLOCK_B=max(2, next_power_of_2(0 if banned is None else banned.numel())),
        PRECISION="tf32x3" if embed_weight.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=2,
    )
    # Combine the chunks. argmax takes the first (lowest-id) chunk among equal maxima.
    top = m_part.amax(dim=1, keepdim=True)
    confidence = 1.0 / (s_part * torch.exp(m_part - top)).sum(dim=1)
    ids = i_part.gather(1, m_part.argmax(dim=1, keepdim=True)).squeeze(1).long()
    return ids.view(lead), confidence.view(lead)


def lm_head_argmax(hidden: Tensor, norm_weight: Tensor, eps: float, embed_weight: Tensor, *,
                   banned_ids: Tensor | None = None, vocab_limit: int | None = None,
                   num_splits: int | None = None, use_triton: bool | None = None) -> tuple[Tensor, Tensor]:
    """Greedy token and its softmax probability for every row of hidden [..., d].

    logits = rms_norm(hidden, norm_weight, eps) @ embed_weight[:vocab_limit].T,
    with banned_ids set to -inf. Returns (token_ids int64 [...], confidence fp32 [...]).
    use_triton: None = Triton on CUDA, the torch reference elsewhere;
    True = Triton (on CPU tensors only with TRITON_INTERPRET=1); False = reference.
    """
    if should_use_triton(use_triton, hidden, norm_weight, embed_weight):
        return lm_head_argmax_triton(hidden, norm_weight, eps, embed_weight, banned_ids=banned_ids,
                                     vocab_limit=vocab_limit, num_splits=num_splits)
    return lm_head_argmax_reference(hidden, norm_weight, eps, embed_weight,
                                    banned_ids=banned_ids, vocab_limit=vocab_limit)
