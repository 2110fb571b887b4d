"""The native context-cached span denoiser (DESIGN.md): the network only.

Sequence: `<fim_suffix> suffix <fim_prefix> prefix <fim_middle>` is the context,
attended causally, so its keys and values never depend on the span; the span
of L tokens attends to the whole context and bidirectionally to itself. A
denoising step is a forward pass over the span only, against cached context
K/V. The same weights also predict the next token of the causal context,
which gives an autoregressive baseline with no extra parameters.

Training runs plain torch ops (they have autograd); inference (`prefill`,
`span_hidden`, `span_tokens`) calls the fused ops of kernels/, which are
Triton on CUDA and the torch references (the same maths) on the CPU. A model
served on a CPU may also prepare `CpuInference` (`prepare_cpu_inference`): the
same passes in a few ops per layer on weights laid out once, span steps
optionally in bf16.

This module holds no sampling, caching policy or tokenization.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from denoiser.config import MASK_ID, ModelConfig
from kernels import apply_rotary, lm_head_argmax, rms_norm
from kernels import span_attention as fused_span_attention
from kernels.span_attention import prefill_attention_cpu


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
        # Set by `prepare_cpu_inference`: prefill and span steps on CPU tensors then run there.
        self.cpu_inference: CpuInference | None = None

    def prepare_cpu_inference(self, matmul_dtype: torch.dtype = torch.float32, *,
                              screen_head: bool | None = None, compiled: bool = False) -> "CpuInference":
        """Run prefill and span steps on CPU tensors through a `CpuInference` from now on. Its
        weights are taken from the model now; in-place changes to them are noticed. `compiled`:
        span steps also compile in the background (denoiser/cpu_compile.py)."""
        self.cpu_inference = CpuInference(self, matmul_dtype, screen_head=screen_head)
        if compiled:
            from denoiser.cpu_compile import CompiledCpuStep

            self.cpu_inference.compiled = CompiledCpuStep(self, self.cpu_inference)
        return self.cpu_inference

    def _cpu_inference_for(self, ids: Tensor, kv: KVBuffers) -> "CpuInference | None":
        cpu = self.cpu_inference
        if cpu is None or ids.device.type != "cpu" or kv.k.dtype != torch.float32 or kv.v.dtype != torch.float32:
            return None
        if cpu.stale(self):  # weights changed in place, or moved: prepare again from what they are now
            try:
                cpu = self.prepare_cpu_inference(cpu.matmul_dtype, screen_head=cpu.screen_head is not None,
                                                 compiled=cpu.compiled is not None)
            except ValueError:  # no longer fp32 weights on the CPU: the fused-op path serves
                cpu = self.cpu_inference = None
        return cpu

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
        cpu = self._cpu_inference_for(ids, kv)
        if cpu is not None:
            return cpu.prefill(ids, kv, start)
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
        cpu = self._cpu_inference_for(span_ids, kv)
        if cpu is not None:
            return cpu.hidden(span_ids, kv, ctx_len)
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
        cpu = self._cpu_inference_for(span_ids, kv)  # checked once per step: body and head agree
        if cpu is not None:
            hidden = cpu.hidden(span_ids, kv, ctx_len)

            def head(rows):
                return cpu.tokens(rows, banned_ids=banned_ids, vocab_limit=vocab_limit)
        else:
            hidden = self.span_hidden(span_ids, kv, ctx_len)

            def head(rows):
                return lm_head_argmax(rows, self.final_norm.weight, self.final_norm.eps, self.embed.weight,
                                      banned_ids=banned_ids, vocab_limit=vocab_limit)
        if only is None:
            return head(hidden)
        tokens = torch.full(span_ids.shape, MASK_ID, dtype=torch.long, device=span_ids.device)
        confidence = torch.full(span_ids.shape, -1.0, dtype=torch.float32, device=span_ids.device)
        tokens[only], confidence[only] = head(hidden[only])
        return tokens, confidence


# The output head's bf16 screen keeps this many candidates per position for exact rescoring.
HEAD_CANDIDATES = 8
# The output head runs over this many positions at a time (its [rows, V] logits buffer).
HEAD_ROWS = 32
LOG2_E = 1.4426950408889634


def top_ids(scores: Tensor, k: int, block: int = 64) -> Tensor:
    """Ids of the k largest scores of each row [N, V] (as `topk`, ties aside), in any order.

    In two passes, about twice as fast as one `topk` over a vocabulary row: the k best
    ids lie in the k blocks with the best maxima, so `topk` runs over block maxima and
    then over those k blocks only.
    """
    n, vocab = scores.shape
    k = min(k, vocab)
    if vocab % block or vocab // block < 2 * k:
        return scores.topk(k, dim=-1).indices
    blocks = scores.view(n, vocab // block, block)
    best_blocks = blocks.amax(dim=-1).topk(k, dim=-1).indices  # [N, k]
    inside = blocks.gather(1, best_blocks.unsqueeze(-1).expand(-1, -1, block)).view(n, k * block)
    at = inside.topk(k, dim=-1).indices
    return best_blocks.gather(1, at // block) * block + at % block


def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AVX-512 BF16 or AMX): there a bf16 matmul
    runs at about twice the fp32 rate; elsewhere oneDNN emulates it, slower than fp32."""
    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return bool(native and torch.backends.mkldnn.is_available())
    except (AttributeError, RuntimeError):
        return False


class CpuLinear:
    """x @ weight.T for one weight, prepared once for the CPU.

    fp32: the weight itself (the step stays exact). bf16: the weight in bf16, pre-packed
    in oneDNN's blocked layout where this torch has that op (a plain bf16 matmul repacks
    the weight on every call); inputs are rounded to bf16 and so is the output, as under
    training's bf16 autocast.
    """

    def __init__(self, weight: Tensor, dtype: torch.dtype):
        self.dtype = dtype
        self.weight = weight.detach() if dtype == weight.dtype else weight.detach().to(dtype).contiguous()
        self._packed = None
        if dtype == torch.bfloat16:
            self._packed = _packed_bf16(self.weight)
            if self._packed is not None:
                self.weight = None  # the packed copy is all a call reads

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(self.dtype)
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, None, "none", [], "")
        return F.linear(x, self.weight)


def _packed_bf16(weight: Tensor) -> Tensor | None:
    """The bf16 weight in oneDNN's layout, if this torch packs one and it multiplies as F.linear does."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 32)  # 32: the rows a call usually has
        probe = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
        same = torch.equal(torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], ""),
                           F.linear(probe, weight))
    except (AttributeError, RuntimeError):
        return None
    return packed if same else None


class CpuInference:
    """The model's inference passes on a CPU, in a handful of ops per layer
    (`SpanDenoiser.prepare_cpu_inference`): span steps and context prefill.

    The fused-op path runs a span step as some 400 small torch ops, each a few µs with
    d_model 256, and concatenates the whole cached context with the span's keys in every
    layer of every step. Here q and k are rotated together in four ops, the attention
    reads the cached context in place (`kernels.span_attention_cpu`,
    `kernels.prefill_attention_cpu`), the norms are torch's, and every matmul runs on a
    weight prepared once (`CpuLinear`). Same maths as the fused path.

    Span steps run their linear layers in `matmul_dtype`. fp32: the fused path's results
    up to rounding. bf16 (for CPUs with native bf16, `cpu_has_native_bf16`): the linear
    layers run in bf16 as under training's autocast, while the residual stream, norms,
    rotary and attention stay fp32 against the fp32 context cache. With `screen_head` the
    output head screens the vocabulary in bf16 and rescores its `HEAD_CANDIDATES` best ids
    per position with exact fp32 logits: the token and the numerator of its probability
    come from exact logits unless the best id fell outside the screen's top 8, and only
    the tail of the softmax sum keeps bf16 rounding. Prefill is fp32 in every case, so the
    context cache holds what the reference computes.

    Holds bf16 copies of the weights it runs in bf16 and, per thread, a logits buffer of
    HEAD_ROWS x vocabulary; a span step never writes the context cache.
    """

    def __init__(self, model: "SpanDenoiser", matmul_dtype: torch.dtype = torch.float32, *,
                 screen_head: bool | None = None):
        if matmul_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"a CPU step runs its matmuls in float32 or bfloat16, not {matmul_dtype}")
        if model.embed.weight.dtype != torch.float32 or model.embed.weight.device.type != "cpu":
            raise ValueError("a CPU step needs the model's fp32 weights on the CPU")
        config = model.config
        self.matmul_dtype = matmul_dtype
        self.n_heads, self.head_dim, self.eps = config.n_heads, config.head_dim, config.norm_eps
        self.embed = model.embed.weight.detach()
        half = config.head_dim // 2
        # Rotary tables repeat their first half (rotate-half convention): per position, cos for both
        # halves of a head and (-sin, sin), so that one addcmul rotates them ([positions, 2, D/2]).
        cos, sin = model.rotary.cos[:, :half], model.rotary.sin[:, :half]
        self.cos = torch.stack((cos, cos), dim=1)
        self.sin = torch.stack((-sin, sin), dim=1)

        def layers(dtype):
            return [(block.attn_norm.weight.detach(), CpuLinear(block.qkv.weight, dtype),
                     CpuLinear(block.out.weight, dtype), block.mlp_norm.weight.detach(),
                     CpuLinear(block.gate_up.weight, dtype), CpuLinear(block.down.weight, dtype))
                    for block in model.blocks]

        self.prefill_layers = layers(torch.float32)  # the model's own tensors, no copies
        self.layers = self.prefill_layers if matmul_dtype == torch.float32 else layers(matmul_dtype)
        self.final_norm = model.final_norm.weight.detach()
        # What the copies were made from: a change in place bumps a tensor's version, and
        # `model.to(...)` gives the weights new storage.
        self._sources = [(t, t._version) for t in (*model.parameters(), model.rotary.cos, model.rotary.sin)]
        self._embed_at = model.embed.weight.data_ptr()
        if screen_head is None:
            screen_head = cpu_has_native_bf16()
        # The screen's weights carry the head's log2(e) (below), saving a pass over [N, V].
        self.screen_head = CpuLinear(model.embed.weight * LOG2_E, torch.bfloat16) if screen_head else None
        self._head_bias: dict[tuple, Tensor] = {}
        self._per_thread = threading.local()  # each thread's head buffers (`_head_rows`)
        self.compiled = None  # a `cpu_compile.CompiledCpuStep` for span steps, when asked for

    def stale(self, model: "SpanDenoiser") -> bool:
        """True once the model's weights changed in place or moved since this was made
        (a few µs). A parameter replaced by a new object goes unseen: prepare again then."""
        return (model.embed.weight.data_ptr() != self._embed_at or
                any(t._version != version for t, version in self._sources))

    def _norm(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)

    def _blocks(self, x: Tensor, layers, cos: Tensor, sin: Tensor, attend) -> Tensor:
        """Every layer over x [B, T, d]; attend(layer, q, k, v) -> [B, H, T, D] does the attention."""
        b, t, _ = x.shape
        h, dh = self.n_heads, self.head_dim
        half, d = dh // 2, h * dh
        for layer, (attn_norm, qkv_proj, out_proj, mlp_norm, gate_up, down) in enumerate(layers):
            qkv = qkv_proj(self._norm(x, attn_norm))
            # q and k heads side by side, each as its two rotary halves: [B, T, 2H, 2, D/2].
            halves = qkv[..., :2 * d].view(b, t, 2 * h, 2, half)
            # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin): `cos` holds cos twice, `sin` holds (-sin, sin).
            rotated = torch.addcmul(halves * cos, halves.flip(-2), sin).view(b, t, 2 * h, dh)
            # [B, H, T, D] views of [B, T, H, D] memory: the attention's output keeps that order.
            q, k = rotated[:, :, :h].transpose(1, 2), rotated[:, :, h:].transpose(1, 2)
            v = qkv[..., 2 * d:].view(b, t, h, dh).transpose(1, 2).float()
            attn = attend(layer, q, k, v)
            x = x + out_proj(attn.transpose(1, 2).reshape(b, t, d))
            gate, up = gate_up(self._norm(x, mlp_norm)).chunk(2, dim=-1)
            x = x + down(F.silu(gate) * up)
        return x

    @torch.no_grad()
    def prefill(self, ids: Tensor, kv: KVBuffers, start: int) -> Tensor:
        """`SpanDenoiser.prefill` (fp32, kv fp32, range checked by the caller): last hidden [B, d]."""
        b, t = ids.shape
        end = start + t

        def attend(layer, q, k, v):
            k_cache, v_cache = kv.k[layer, :b], kv.v[layer, :b]
            k_cache[:, :, start:end] = k
            v_cache[:, :, start:end] = v
            return prefill_attention_cpu(q, k_cache, v_cache, start)

        cos, sin = self.cos[start:end].unsqueeze(1), self.sin[start:end].unsqueeze(1)
        return self._blocks(F.embedding(ids, self.embed), self.prefill_layers, cos, sin, attend)[:, -1]

    @torch.no_grad()
    def hidden(self, span_ids: Tensor, kv: KVBuffers, ctx_len: int | Tensor) -> Tensor:
        """`SpanDenoiser.span_hidden`: [B, L, d] fp32."""
        if self.compiled is not None:
            hidden = self.compiled.hidden(span_ids, kv, ctx_len)
            if hidden is not None:  # None: this shape is not compiled (yet)
                return hidden
        b, n = span_ids.shape
        if isinstance(ctx_len, Tensor):
            positions = ctx_len.to(dtype=torch.long).view(-1, 1) + torch.arange(n)
            cos, sin = self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)
        else:
            cos, sin = self.cos[ctx_len:ctx_len + n].unsqueeze(1), self.sin[ctx_len:ctx_len + n].unsqueeze(1)

        def attend(layer, q, k, v):
            return fused_span_attention(q, kv.k[layer, :b], kv.v[layer, :b], k, v, ctx_len)

        return self._blocks(F.embedding(span_ids, self.embed), self.layers, cos, sin, attend)

    def _bias(self, vocab: int, banned_ids: Tensor | None, vocab_limit: int | None) -> Tensor:
        """0, or -inf at banned ids and ids >= vocab_limit: added to the logits."""
        banned = () if banned_ids is None else tuple(sorted(set(banned_ids.flatten().tolist())))
        key = (banned, vocab_limit)
        bias = self._head_bias.get(key)
        if bias is None:
            bias = torch.zeros(vocab)
            if banned:
                ids = torch.tensor(banned, dtype=torch.long)
                bias[ids[(ids >= 0) & (ids < vocab)]] = float("-inf")
            if vocab_limit is not None:
                bias[vocab_limit:] = float("-inf")
            if len(self._head_bias) >= 8:  # a few settings at a time, never a growing pile
                self._head_bias.clear()
            self._head_bias[key] = bias
        return bias

    @torch.no_grad()
    def tokens(self, hidden: Tensor, *, banned_ids: Tensor | None = None,
               vocab_limit: int | None = None) -> tuple[Tensor, Tensor]:
        """`kernels.lm_head_argmax` on this step's weights: (token ids int64 [...], confidence fp32 [...])."""
        lead, dm = hidden.shape[:-1], hidden.shape[-1]
        if vocab_limit is not None and vocab_limit <= 0:
            raise ValueError(f"vocab_limit must be positive, got {vocab_limit}")
        x = self._norm(hidden.reshape(-1, dm), self.final_norm)
        bias = self._bias(self.embed.shape[0], banned_ids, vocab_limit)
        parts = [self._rows(x[start:start + HEAD_ROWS], bias) for start in range(0, x.shape[0], HEAD_ROWS)]
        if len(parts) == 1:
            token, confidence = parts[0]
        elif parts:
            token, confidence = torch.cat([t for t, _ in parts]), torch.cat([c for _, c in parts])
        else:
            token, confidence = torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.float32)
        return token.view(lead), confidence.view(lead)

    def _rows(self, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """`_head_rows`, compiled where it is ready."""
        compiled = self.compiled.head(x, bias) if self.compiled is not None else None
        return compiled if compiled is not None else self._head_rows(x, bias)

    def _head_rows(self, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """Token and confidence for at most HEAD_ROWS normalised rows x [N, d].

        Logits are in log2 units (exp2 runs at three times exp's speed on the CPU), -inf where
        excluded, and max p = 1 / sum_j 2^(logit_j - best): no [N, V] probabilities. They live in
        this thread's buffer: a fresh 1 MB tensor every step would be a fresh mapping every step
        where malloc maps large blocks (the server fixes glibc's mmap threshold), and faulting its
        pages in costs about as much as the head's matmul.
        """
        n, vocab = x.shape[0], self.embed.shape[0]
        buffer = self._logits_buffer()[: n * vocab]
        if self.screen_head is None:
            # Transposed, [V, N]: MKL runs this shape faster, and the reductions over V vectorise.
            logits = buffer.view(vocab, n)
            torch.addmm(bias.unsqueeze(1), self.embed, x.t(), alpha=LOG2_E, out=logits)
            best, token = logits.max(dim=0)
            return token, logits.sub_(best).exp2_().sum(dim=0).reciprocal_()
        logits = buffer.view(n, vocab)
        logits.copy_(self.screen_head(x)).add_(bias)
        # The screen's best candidates, rescored exactly; sorted by id so that exact ties go
        # to the lowest id, as torch.argmax.
        candidates = top_ids(logits, HEAD_CANDIDATES).sort(dim=-1).values
        exact = torch.bmm(self._candidate_rows(candidates), x.unsqueeze(-1)).squeeze(-1)
        exact.mul_(LOG2_E).add_(bias[candidates])
        best, at = exact.max(dim=-1)
        token = candidates.gather(-1, at.unsqueeze(-1)).squeeze(-1)
        logits.scatter_(-1, candidates, exact)
        return token, logits.sub_(best.unsqueeze(-1)).exp2_().sum(dim=-1).reciprocal_()

    def _logits_buffer(self) -> Tensor:
        """This thread's HEAD_ROWS x vocabulary floats (flat: viewed as [N, V] or [V, N])."""
        buffer = getattr(self._per_thread, "logits", None)
        if buffer is None:
            buffer = self._per_thread.logits = torch.empty(HEAD_ROWS * self.embed.shape[0])
        return buffer

    def _candidate_rows(self, candidates: Tensor) -> Tensor:
        """The fp32 embedding rows of candidates [N, K], as [N, K, d] (in this thread's buffer)."""
        n, k = candidates.shape
        buffer = getattr(self._per_thread, "rows", None)
        if buffer is None or buffer.shape[0] < n * k:
            buffer = self._per_thread.rows = torch.empty(HEAD_ROWS * k, self.embed.shape[1])
        rows = buffer[: n * k]
        torch.index_select(self.embed, 0, candidates.flatten(), out=rows)
        return rows.view(n, k, -1)


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
