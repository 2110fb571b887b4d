"""The bidirectional Qwen2/LLaMA-style transformer that all open families share.

Plain torch over plain tensors (no nn.Module parameters to initialise, so
loading writes each checkpoint tensor straight into place). Two entry points:

- `full(ids, rows, kv)`: every position through every layer, fully
  bidirectional attention; optionally records each layer's keys and values
  (after RoPE) into `kv`. This is the exact computation. It also takes a batch
  of sequences of one length (without `kv`): a draft's two checkerboard rows.
- `window(ids, start, rows, kv)`: only the positions [start, start+len(ids))
  are recomputed; they attend to `kv` (the rest of the sequence, as it was at
  the last `full` call) plus their own fresh keys/values, which are written
  back into `kv`. This is the approximate "dual cache" step of Fast-dLLM.

Both return logits only for the requested rows (the vocabulary projection of
1k positions would dominate the cost otherwise). This module knows nothing of
tokenizers, prompts or checkpoint files.

Weights are plain tensors (fp32/bf16/fp16), or `Int8Linear` for the
projections of a CPU model loaded with int8 weights: each output channel
stored as int8 with its own scale, each call's activations quantized to int8
per token, an int8 matmul, fp32 out (those models run their activations in
fp32). The embedding table then stays in bf16.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from denoiser.open_models.families import TransformerShape


class Int8Linear:
    """A (out, in) weight matrix as int8 per output channel, multiplied in int8 with per-token activation scales.

    Symmetric scales (absmax / 127) for each output channel of the weight and,
    at each call, for each row of the input; the product runs as an int8 x int8
    -> int32 matmul (`torch._int_mm`) and is rescaled to fp32. Per-token scales
    keep one large activation from flattening every other row of the call.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.device.type != "cpu":
            raise ValueError("int8 weights run on the CPU only")
        w = weight.detach().float()
        self.shape = tuple(w.shape)
        self.scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        # Stored (in, out): the layout the int8 matmul reads.
        self.weight_t = torch.round(w / self.scale[:, None]).clamp(-127, 127).to(torch.int8).t().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1]).float()
        row_scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
        quantized = torch.round(rows / row_scale).to(torch.int8)
        y = torch._int_mm(quantized, self.weight_t).float() * row_scale * self.scale
        return y.view(*lead, self.shape[0])

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        return self.numel() + 4 * self.shape[0]  # int8 values + one fp32 scale per output channel


Weight = torch.Tensor | Int8Linear


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(weight, Int8Linear):
        y = weight(x)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def weight_bytes(t: Weight) -> int:
    return t.nbytes if isinstance(t, Int8Linear) else t.numel() * t.element_size()


@dataclass
class LayerWeights:
    q_proj: Weight
    k_proj: Weight
    v_proj: Weight
    o_proj: Weight
    gate_proj: Weight
    up_proj: Weight
    down_proj: Weight
    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None


@dataclass
class KVStore:
    """Per-layer keys/values (after RoPE) of one sequence: (1, kv_heads, T, head_dim)."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0


class BidirectionalTransformer:
    def __init__(self, shape: TransformerShape, embed: torch.Tensor, final_norm: torch.Tensor,
                 lm_head: Weight, layers: list[LayerWeights]) -> None:
        self.shape = shape
        self.embed = embed
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.layers = layers
        self.device = embed.device
        # Activations run in the norms' dtype: the weights' own, or fp32 around int8 projections.
        self.dtype = final_norm.dtype
        half = shape.head_dim // 2
        self._inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, half, device=self.device, dtype=torch.float32) * 2 / shape.head_dim))

    def _weights(self) -> list[Weight]:
        tensors = [self.embed, self.final_norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        for layer in self.layers:
            tensors += [t for t in vars(layer).values() if t is not None]
        return tensors

    def parameters(self) -> int:
        # A tied head quantized to int8 is a second copy of the embedding, not more parameters.
        tied_copy = self.shape.tie_embeddings and self.lm_head is not self.embed
        return sum(t.numel() for t in self._weights()) - (self.lm_head.numel() if tied_copy else 0)

    def weight_bytes(self) -> int:
        """Bytes the weights occupy (what one full pass reads, bar the embedding rows it skips)."""
        return sum(weight_bytes(t) for t in self._weights())

    # -- building blocks -------------------------------------------------------------
    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and scale in the model dtype, as Qwen2 and LLaDA both do.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.shape.rms_norm_eps)
        return weight * xf.to(x.dtype)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self._inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    @staticmethod
    def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # Rotate-half RoPE (non-interleaved), in fp32 for accuracy in bf16 models.
        xf = x.float()
        half = xf.shape[-1] // 2
        rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
        return (xf * cos + rotated * sin).to(x.dtype)

    def _qkv(self, layer: LayerWeights, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        s = self.shape
        lead = h.shape[:-1]  # (T,) or (B, T)
        q = linear(h, layer.q_proj, layer.q_bias).view(*lead, s.num_heads, s.head_dim).transpose(-3, -2)
        k = linear(h, layer.k_proj, layer.k_bias).view(*lead, s.num_kv_heads, s.head_dim).transpose(-3, -2)
        v = linear(h, layer.v_proj, layer.v_bias).view(*lead, s.num_kv_heads, s.head_dim).transpose(-3, -2)
        return self._apply_rope(q, cos, sin), self._apply_rope(k, cos, sin), v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = self.shape
        groups = s.num_heads // s.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=-3)
            v = v.repeat_interleave(groups, dim=-3)
        # No mask: every position sees every other (bidirectional denoiser).
        batched = q.dim() == 4
        if not batched:
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        out = out.reshape(*out.shape[:2], s.num_heads * s.head_dim)
        return out if batched else out[0]

    def _mlp(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        h = self._rms(x, layer.mlp_norm)
        return linear(F.silu(linear(h, layer.gate_proj)) * linear(h, layer.up_proj), layer.down_proj)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = linear(self._rms(x, self.final_norm), self.lm_head).float()
        if self.shape.logit_scale != 1.0:
            logits = logits * self.shape.logit_scale
        return logits

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.embed).to(self.dtype)
        return x * self.shape.input_scale if self.shape.input_scale != 1.0 else x

    # -- entry points ------------------------------------------------------------------
    @torch.no_grad()
    def full(self, ids: torch.Tensor, rows: torch.Tensor | None = None, kv: KVStore | None = None) -> torch.Tensor:
        """Exact forward pass over ids (T,) or a batch (B, T); logits (fp32) of `rows` (all if None).

        `kv` records one sequence only, so it needs 1-D ids."""
        if kv is not None and ids.dim() != 1:
            raise ValueError("kv records one sequence: pass 1-D ids with it")
        positions = torch.arange(ids.shape[-1], device=self.device)
        cos, sin = self._rope(positions)
        x = self._embed(ids)
        if kv is not None:
            kv.keys, kv.values = [], []
        for layer in self.layers:
            q, k, v = self._qkv(layer, self._rms(x, layer.attn_norm), cos, sin)
            if kv is not None:
                kv.keys.append(k.unsqueeze(0))
                kv.values.append(v.unsqueeze(0))
            x = x + linear(self._attend(q, k, v), layer.o_proj)
            x = x + self._mlp(layer, x)
        return self._logits(x if rows is None else x[..., rows, :])

    @torch.no_grad()
    def window(self, ids: torch.Tensor, start: int, kv: KVStore, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Recompute positions [start, start+len(ids)) against cached K/V of the rest; logits of `rows`."""
        end = start + ids.shape[0]
        if end > kv.length:
            raise ValueError(f"window [{start}, {end}) runs past the cached sequence ({kv.length} positions)")
        cos, sin = self._rope(torch.arange(start, end, device=self.device))
        x = self._embed(ids)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, self._rms(x, layer.attn_norm), cos, sin)
            # The window's own keys/values replace its stale ones; the rest stays as cached.
            kv.keys[i][0, :, start:end] = k
            kv.values[i][0, :, start:end] = v
            x = x + linear(self._attend(q, kv.keys[i][0], kv.values[i][0]), layer.o_proj)
            x = x + self._mlp(layer, x)
        return self._logits(x if rows is None else x[rows])
