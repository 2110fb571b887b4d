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
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from denoiser.open_models.families import TransformerShape


@dataclass
class LayerWeights:
    q_proj: torch.Tensor
    k_proj: torch.Tensor
    v_proj: torch.Tensor
    o_proj: torch.Tensor
    gate_proj: torch.Tensor
    up_proj: torch.Tensor
    down_proj: torch.Tensor
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
                 lm_head: torch.Tensor, layers: list[LayerWeights]) -> None:
        self.shape = shape
        self.embed = embed
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.layers = layers
        self.device = embed.device
        self.dtype = embed.dtype
        half = shape.head_dim // 2
        self._inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, half, device=self.device, dtype=torch.float32) * 2 / shape.head_dim))

    def parameters(self) -> int:
        tensors = [self.embed, self.final_norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        for layer in self.layers:
            tensors += [t for t in vars(layer).values() if t is not None]
        return sum(t.numel() for t in tensors)

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
        q = F.linear(h, layer.q_proj, layer.q_bias).view(*lead, s.num_heads, s.head_dim).transpose(-3, -2)
        k = F.linear(h, layer.k_proj, layer.k_bias).view(*lead, s.num_kv_heads, s.head_dim).transpose(-3, -2)
        v = F.linear(h, layer.v_proj, layer.v_bias).view(*lead, s.num_kv_heads, s.head_dim).transpose(-3, -2)
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
        return F.linear(F.silu(F.linear(h, layer.gate_proj)) * F.linear(h, layer.up_proj), layer.down_proj)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(self._rms(x, self.final_norm), self.lm_head).float()
        if self.shape.logit_scale != 1.0:
            logits = logits * self.shape.logit_scale
        return logits

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.embed)
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
            x = x + F.linear(self._attend(q, k, v), layer.o_proj)
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
            x = x + F.linear(self._attend(q, kv.keys[i][0], kv.values[i][0]), layer.o_proj)
            x = x + self._mlp(layer, x)
        return self._logits(x if rows is None else x[rows])
