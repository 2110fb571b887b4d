"""The native context-cached span denoiser (DESIGN.md): the network only.

Sequence: `<fim_suffix> suffix <fim_prefix> prefix <fim_middle>` is the context,
attended causally, so its keys and values never depend on the span; the span
of L tokens attends to the whole context and bidirectionally to itself. A
denoising step is a forward pass over the span only, against cached context
K/V. The same weights also predict the next token of the causal context,
which gives an autoregressive baseline with no extra parameters.

Training runs plain torch ops (they have autograd); inference (`prefill`,
`span_hidden`, `span_tokens`) calls the fused ops of kernels/, which are
Triton on CUDA and the torch references (the same maths) on the CPU.

This module holds no sampling, caching policy or tokenization.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from denoiser.config import MASK_ID, ModelConfig
from kernels import apply_rotary, lm_head_argmax, rms_norm
from kernels import span_attention as fused_span_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half convention), tables built once."""

    def __init__(self, head_dim: int, max_positions: int, theta: float):
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        # x: [B, H, T, D]; positions: [B, T]
        cos = self.cos[positions].unsqueeze(1).to(x.dtype)
        sin = self.sin[positions].unsqueeze(1).to(x.dtype)
        return x * cos + rotate_half(x) * sin


@dataclass
class KVBuffers:
    """Context keys/values for every layer: [n_layers, B, H, capacity, head_dim].

    Allocated once with a fixed capacity so a step never reallocates; only the
    first `length` positions are meaningful (tracked by the caller).
    """

    k: Tensor
    v: Tensor

    @classmethod
    def allocate(cls, config: ModelConfig, batch: int, capacity: int, device, dtype) -> "KVBuffers":
        shape = (config.n_layers, batch, config.n_heads, capacity, config.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def capacity(self) -> int:
        return self.k.shape[3]


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, h = config.d_model, config.n_heads
        self.n_heads, self.head_dim = h, config.head_dim
        self.attn_norm = RMSNorm(d, config.norm_eps)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.mlp_norm = RMSNorm(d, config.norm_eps)
        self.gate_up = nn.Linear(d, 2 * config.d_ff, bias=False)
        self.down = nn.Linear(config.d_ff, d, bias=False)

    def project(self, x: Tensor, positions: Tensor, rotary: Rotary) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return rotary(q, positions), rotary(k, positions), v

    def finish(self, x: Tensor, attn: Tensor) -> Tensor:
        b, _, t, _ = attn.shape
        x = x + self.out(attn.transpose(1, 2).reshape(b, t, -1))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)

    # Inference twins of project/finish over the fused ops (no autograd in the kernels).
    def project_fused(self, x: Tensor, positions: Tensor, rotary: Rotary) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        h = rms_norm(x, self.attn_norm.weight, self.attn_norm.eps)
        q, k, v = self.qkv(h).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, k, rotary.cos, rotary.sin, positions)
        return q, k, v

    def finish_fused(self, x: Tensor, attn: Tensor) -> Tensor:
        b, _, t, _ = attn.shape
        # The residual add and the MLP's norm in one pass: (norm(out + x), out + x).
        normed, x = rms_norm(self.out(attn.transpose(1, 2).reshape(b, t, -1)), self.mlp_norm.weight,
                             self.mlp_norm.eps, residual=x)
        gate, up = self.gate_up(normed).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class SpanDenoiser(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.rotary = Rotary(config.head_dim, config.max_positions, config.rope_theta)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, std, generator=generator)
                if name.endswith(("out.weight", "down.weight")):
                    p.data /= (2 * self.config.n_layers) ** 0.5

    def logits(self, hidden: Tensor) -> Tensor:
        # Tied LM head: the embedding matrix doubles as the output projection.
        return self.final_norm(hidden) @ self.embed.weight.t()

    # --- training: the whole sequence in one pass, with the block mask -------
    def forward_hidden(self, ids: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        """ids, positions: [B, T]; mask: [B, 1, T, T] bool (True = may attend)."""
        x = self.embed(ids)
        for block in self.blocks:
            q, k, v = block.project(x, positions, self.rotary)
            x = block.finish(x, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        return x

    # --- inference: context once, then span steps over cached K/V ------------
    @torch.no_grad()
    def prefill(self, ids: Tensor, kv: KVBuffers, start: int) -> Tensor:
        """Append context tokens ids [B, T] at positions start.. to kv; return last hidden [B, d]."""
        b, t = ids.shape
        end = start + t
        if end > kv.capacity or end > self.config.max_positions:
            raise ValueError(f"context of {end} tokens exceeds the cache ({kv.capacity}) or model limit")
        positions = torch.arange(start, end, device=ids.device).expand(b, t)
        # Query i (absolute start+i) sees keys 0..start+i.
        mask = torch.ones(t, end, dtype=torch.bool, device=ids.device).tril(diagonal=start)
        x = self.embed(ids)
        for layer, block in enumerate(self.blocks):
            q, k, v = block.project_fused(x, positions, self.rotary)
            kv.k[layer, :b, :, start:end] = k
            kv.v[layer, :b, :, start:end] = v
            attn = F.scaled_dot_product_attention(q, kv.k[layer, :b, :, :end], kv.v[layer, :b, :, :end], attn_mask=mask)
            x = block.finish_fused(x, attn)
        return x[:, -1]

    @torch.no_grad()
    def span_hidden(self, span_ids: Tensor, kv: KVBuffers, ctx_len: int | Tensor) -> Tensor:
        """Hidden states of span tokens [B, L] at positions ctx_len.. over cached context.

        ctx_len: one int for the whole batch, or an int tensor [B] (one cached
        length per sequence: a batch of requests for different documents, or a
        CUDA graph that must not bake a length in).
        """
        b, n = span_ids.shape
        offsets = torch.arange(n, device=span_ids.device)
        if isinstance(ctx_len, Tensor):
            positions = ctx_len.to(device=span_ids.device, dtype=torch.long).view(-1, 1) + offsets
        else:
            positions = (ctx_len + offsets).expand(b, n)
        x = self.embed(span_ids)
        for layer, block in enumerate(self.blocks):
            q, k, v = block.project_fused(x, positions, self.rotary)
            attn = fused_span_attention(q, kv.k[layer, :b], kv.v[layer, :b], k, v, ctx_len)
            x = block.finish_fused(x, attn)
        return x

    def span_logits(self, span_ids: Tensor, kv: KVBuffers, ctx_len: int | Tensor) -> Tensor:
        return self.logits(self.span_hidden(span_ids, kv, ctx_len))

    @torch.no_grad()
    def span_tokens(self, span_ids: Tensor, kv: KVBuffers, ctx_len: int | Tensor, *,
                    banned_ids: Tensor | None = None, vocab_limit: int | None = None,
                    only: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Greedy token and its probability at every span position ([B, L] int64, [B, L] fp32).

        Final norm, tied LM head and softmax-max fused (kernels.lm_head_argmax):
        the [B, L, V] logits are never materialised on a GPU. banned_ids and ids
        >= vocab_limit are never chosen. `only` ([B, L] bool): run the head at
        these positions alone (the still-masked ones; the head is ~40% of a CPU
        step); the others get MASK_ID and confidence -1. Its gather syncs with
        the host, so CUDA graphs never pass it.
        """
        hidden = self.span_hidden(span_ids, kv, ctx_len)
        head = (self.final_norm.weight, self.final_norm.eps, self.embed.weight)
        if only is None:
            return lm_head_argmax(hidden, *head, banned_ids=banned_ids, vocab_limit=vocab_limit)
        tokens = torch.full(span_ids.shape, MASK_ID, dtype=torch.long, device=span_ids.device)
        confidence = torch.full(span_ids.shape, -1.0, dtype=torch.float32, device=span_ids.device)
        tokens[only], confidence[only] = lm_head_argmax(hidden[only], *head, banned_ids=banned_ids,
                                                        vocab_limit=vocab_limit)
        return tokens, confidence


def training_mask(causal_len: Tensor, ctx_len: Tensor, causal_region: int, span: int) -> Tensor:
    """Attention mask [B, 1, T, T] for a training batch, T = causal_region + span.

    The first `causal_region` positions hold the causal sequence (context, then
    the middle and <eos> for the next-token loss, then padding); the last `span`
    positions hold the noised span, which sees only the context (`ctx_len`
    tokens, never the middle written causally) and the whole span.
    """
    device = causal_len.device
    t = causal_region + span
    i = torch.arange(t, device=device).view(1, t, 1)
    j = torch.arange(t, device=device).view(1, 1, t)
    in_causal_q = i < causal_region
    causal = in_causal_q & (j <= i) & (j < causal_len.view(-1, 1, 1)) | (i == j)
    span_q = ~in_causal_q
    span_sees = span_q & ((j < ctx_len.view(-1, 1, 1)) | (j >= causal_region))
    return (causal | span_sees).unsqueeze(1)
