"""The bidirectional Qwen2/LLaMA-style transformer that all open families share.

Plain torch over plain tensors (no nn.Module parameters to initialise, so
loading writes each checkpoint tensor straight into place). Entry points:

- `full(ids, rows, kv)`: every position through every layer, fully
  bidirectional attention; optionally records each layer's keys and values
  (after RoPE) into `kv`. This is the exact computation. It also takes a batch
  of sequences of one length (without `kv`): a draft's two checkerboard rows.
- `window(ids, start, rows, kv)`: only the positions [start, start+len(ids))
  are recomputed; they attend to `kv` (the rest of the sequence, as it was at
  the last `full` call) plus their own fresh keys/values, which are written
  back into `kv`. This is the approximate "dual cache" step of Fast-dLLM.
  `recompute(ids, positions, kv, rows)` is the same for any set of positions
  (the keystroke cache recomputes the typed tokens, the span and the part of
  the suffix it could not reuse in one pass).
- `shift_keys(keys, delta)`: cached keys (after RoPE) moved by `delta`
  positions. Rotations compose, so rotating a key cached at position p by
  delta gives the key at p + delta: reused keys keep consistent positions
  when the text before them grows or shrinks.

All return logits only for the requested rows (the vocabulary projection of
1k positions would dominate the cost otherwise), and the last layer runs its
attention output and MLP only for those rows (the keys and values of every
position come from its input, so the cache loses nothing). This module knows
nothing of tokenizers, prompts or checkpoint files.

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

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


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
        batched = q.dim() == 4
        if not batched:
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        b, heads, t, d = q.shape
        # Grouped-query attention: query head h reads key/value head h // groups. Each key/value
        # head's queries attend as one longer block (rows are independent), so the cached keys and
        # values are never copied once per query head. No mask: every position sees every other.
        grouped = q.reshape(b, s.num_kv_heads, heads // s.num_kv_heads * t, d)
        out = F.scaled_dot_product_attention(grouped, k, v).view(b, heads, t, d).transpose(1, 2)
        out = out.reshape(b, t, heads * d)
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

    def _layer(self, layer: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               attend_kv, rows: torch.Tensor | None) -> torch.Tensor:
        """One block. `attend_kv(k, v)` gives the keys/values to attend to; with `rows`, only those
        positions go on (the last layer: nothing after it needs the others)."""
        q, k, v = self._qkv(layer, self._rms(x, layer.attn_norm), cos, sin)
        k, v = attend_kv(k, v)
        if rows is not None:
            x, q = x[..., rows, :], q[..., rows, :]
        x = x + linear(self._attend(q, k, v), layer.o_proj)
        return x + self._mlp(layer, x)

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

        def record(k: torch.Tensor, v: torch.Tensor):
            if kv is not None:
                kv.keys.append(k.unsqueeze(0))
                kv.values.append(v.unsqueeze(0))
            return k, v

        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = self._layer(layer, x, cos, sin, record, rows if i == last else None)
        return self._logits(x if rows is None or self.layers else x[..., rows, :])

    @torch.no_grad()
    def window(self, ids: torch.Tensor, start: int, kv: KVStore, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Recompute positions [start, start+len(ids)) against cached K/V of the rest; logits of `rows`."""
        end = start + ids.shape[0]
        if end > kv.length:
            raise ValueError(f"window [{start}, {end}) runs past the cached sequence ({kv.length} positions)")
        return self._recompute(ids, torch.arange(start, end, device=self.device), slice(start, end), kv, rows)

    @torch.no_grad()
    def recompute(self, ids: torch.Tensor, positions: torch.Tensor, kv: KVStore,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
        """Recompute the tokens `ids` at `positions` (ascending) against cached K/V of the rest; logits of
        `rows` (indices into `positions`). Their fresh keys/values are written into `kv`."""
        if positions.numel() != ids.shape[0]:
            raise ValueError("recompute needs one position per token")
        if positions.numel() and int(positions[-1]) >= kv.length:
            raise ValueError(f"position {int(positions[-1])} runs past the cached sequence ({kv.length} positions)")
        lo, n = (int(positions[0]), positions.numel()) if positions.numel() else (0, 0)
        contiguous = n > 0 and int(positions[-1]) == lo + n - 1
        where = slice(lo, lo + n) if contiguous else positions.to(self.device)
        return self._recompute(ids, positions.to(self.device), where, kv, rows)

    def _recompute(self, ids: torch.Tensor, positions: torch.Tensor, where, kv: KVStore,
                   rows: torch.Tensor | None) -> torch.Tensor:
        cos, sin = self._rope(positions)
        x = self._embed(ids)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            keys, values = kv.keys[i][0], kv.values[i][0]

            def write(k: torch.Tensor, v: torch.Tensor, keys=keys, values=values):
                # The recomputed keys/values replace their stale ones; the rest stays as cached.
                if isinstance(where, slice):
                    keys[:, where] = k
                    values[:, where] = v
                else:
                    keys.index_copy_(1, where, k)
                    values.index_copy_(1, where, v)
                return keys, values

            x = self._layer(layer, x, cos, sin, write, rows if i == last else None)
        return self._logits(x if rows is None or self.layers else x[rows])

    def shift_keys(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        """Keys cached after RoPE at positions p, as they would be at p + delta (rotations compose)."""
        if delta == 0:
            return keys
        cos, sin = self._rope(torch.tensor([delta], device=self.device))
        return self._apply_rope(keys, cos, sin)
