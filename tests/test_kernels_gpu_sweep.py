"""GPU sweep: every compiled Triton kernel against its torch reference over shapes and
dtypes, with the tolerances of docs/KERNELS.md. Needs CUDA; skipped without it.

Run on a machine with an NVIDIA GPU: `python -m pytest tests/test_kernels_gpu_sweep.py -m gpu -q`.
"""
import math

import pytest
import torch

pytest.importorskip("triton")

from kernels.lm_head_argmax import lm_head_argmax, lm_head_argmax_reference
from kernels.rmsnorm import rms_norm, rms_norm_reference
from kernels.rotary import apply_rotary, apply_rotary_reference, rotary_tables
from kernels.span_attention import span_attention, span_attention_reference
from kernels.triton_launch import should_use_triton

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]

# Tolerances per dtype (docs/KERNELS.md explains each).
# Elementwise ops (RMSNorm, rotary): fp32 maths inside, one rounding to the output dtype.
ELEMENTWISE_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
}
# Attention: probabilities are rounded to the input dtype before the P @ V product.
ATTENTION_TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
}
# LM head: confidence (a probability, fp32 out) and the logit slack allowed when ids differ.
CONFIDENCE_ATOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}
LOGIT_SLACK = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@pytest.fixture(autouse=True)
def compiled_triton(monkeypatch):
    # The sweep is about compiled kernels, never the interpreter.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)


def test_default_dispatch_on_cuda_is_triton():
    assert should_use_triton(None, torch.empty(1, device="cuda"))


# --- RMSNorm ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 256), (37, 896), (4, 128, 1024), (2048, 4096), (3, 8192)])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rmsnorm_sweep(dtype, shape, with_residual):
    x = _randn(*shape, dtype=dtype, seed=1, scale=3.0)
    w = _randn(shape[-1], dtype=torch.float32, seed=2) * 0.1 + 1
    r = _randn(*shape, dtype=dtype, seed=3) if with_residual else None
    got = rms_norm(x, w, 1e-6, r)
    want = rms_norm_reference(x, w, 1e-6, r)
    if with_residual:
        torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)  # the same single add
        got, want = got[0], want[0]
    torch.testing.assert_close(got, want, **ELEMENTWISE_TOL[dtype])


# --- rotary ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("b,hq,hk,t,d", [(1, 4, 4, 1, 64), (2, 16, 16, 33, 64), (4, 14, 2, 128, 64),
                                         (1, 28, 4, 1000, 128), (3, 8, 8, 17, 32)])
def test_rotary_sweep(dtype, b, hq, hk, t, d):
    q = _randn(b, t, hq, d, dtype=dtype, seed=4).transpose(1, 2)  # the model's strided view
    k = _randn(b, hk, t, d, dtype=dtype, seed=5)
    cos, sin = rotary_tables(d, 4096, 10000.0, device="cuda")
    positions = torch.randint(0, 4096, (b, t), device="cuda")
    for got, want in zip(apply_rotary(q, k, cos, sin, positions), apply_rotary_reference(q, k, cos, sin, positions)):
        torch.testing.assert_close(got, want, **ELEMENTWISE_TOL[dtype])


# --- span attention ----------------------------------------------------------------
SPAN_CASES = [
    # b, n_heads, n_kv_heads, span, capacity, ctx_len
    (1, 16, 16, 32, 0, 0),
    (1, 16, 16, 1, 1024, 1024),
    (1, 16, 16, 32, 1024, 1000),
    (4, 16, 16, 128, 2048, 1537),
    (1, 14, 2, 32, 4096, 4096),  # Qwen2-0.5B-like GQA
    (2, 28, 4, 16, 16384, 16384),  # Qwen2-7B-like GQA, long context
    (1, 16, 16, 64, 16384, 3000),  # static cache far larger than the context
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("b,h,hkv,span,capacity,ctx_len", SPAN_CASES)
def test_span_attention_sweep(dtype, head_dim, b, h, hkv, span, capacity, ctx_len):
    q = _randn(b, span, h, head_dim, dtype=dtype, seed=6).transpose(1, 2)
    kc = _randn(b, hkv, capacity, head_dim, dtype=dtype, seed=7)
    vc = _randn(b, hkv, capacity, head_dim, dtype=dtype, seed=8)
    ks = _randn(b, hkv, span, head_dim, dtype=dtype, seed=9)
    vs = _randn(b, hkv, span, head_dim, dtype=dtype, seed=10)
    want = span_attention_reference(q, kc, vc, ks, vs, ctx_len)
    torch.testing.assert_close(span_attention(q, kc, vc, ks, vs, ctx_len), want, **ATTENTION_TOL[dtype])
    # One chunk (no combine kernel) and many chunks must agree with the reference too.
    for splits in (1, 7):
        got = span_attention(q, kc, vc, ks, vs, ctx_len, num_splits=splits)
        torch.testing.assert_close(got, want, **ATTENTION_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_span_attention_per_sequence_lengths_and_cuda_graph(dtype):
    b, h, span, cap, d = 4, 8, 32, 4096, 64
    q = _randn(b, h, span, d, dtype=dtype, seed=11)
    kc, vc = _randn(b, h, cap, d, dtype=dtype, seed=12), _randn(b, h, cap, d, dtype=dtype, seed=13)
    ks, vs = _randn(b, h, span, d, dtype=dtype, seed=14), _randn(b, h, span, d, dtype=dtype, seed=15)
    lens = torch.tensor([0, 100, 2500, 4096], device="cuda", dtype=torch.int32)
    torch.testing.assert_close(span_attention(q, kc, vc, ks, vs, lens),
                               span_attention_reference(q, kc, vc, ks, vs, lens), **ATTENTION_TOL[dtype])
    # A static grid reads ctx_len from device memory: capture once, change lengths, replay.
    span_attention(q, kc, vc, ks, vs, lens)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = span_attention(q, kc, vc, ks, vs, lens)
    lens.copy_(torch.tensor([4096, 1, 0, 777], device="cuda", dtype=torch.int32))
    graph.replay()
    torch.testing.assert_close(out, span_attention_reference(q, kc, vc, ks, vs, lens), **ATTENTION_TOL[dtype])


# --- final norm + LM head + argmax ---------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,d,vocab", [(1, 256, 8192), (32, 256, 8192), (128, 896, 151936),
                                       (512, 1024, 32000), (37, 3584, 152064)])
def test_lm_head_argmax_sweep(dtype, n, d, vocab):
    hidden = _randn(n, d, dtype=dtype, seed=16, scale=4.0)
    w = _randn(d, dtype=dtype, seed=17) * 0.1 + 1
    embed = _randn(vocab, d, dtype=dtype, seed=18, scale=1 / math.sqrt(d) * 8)
    banned = torch.tensor([2, 3, 4, 5], device="cuda")
    ids, conf = lm_head_argmax(hidden, w, 1e-6, embed, banned_ids=banned, vocab_limit=vocab - 7)
    ids_ref, conf_ref = lm_head_argmax_reference(hidden, w, 1e-6, embed, banned_ids=banned, vocab_limit=vocab - 7)
    torch.testing.assert_close(conf, conf_ref, atol=CONFIDENCE_ATOL[dtype], rtol=0)
    # Near-ties may resolve differently under another summation order: accept a different
    # id only when its reference logit is within the slack of the best one.
    x = rms_norm_reference(hidden, w, 1e-6).to(dtype).float()
    logits = x @ embed[: vocab - 7].float().t()
    logits[:, banned] = float("-inf")
    chosen = logits.gather(1, ids.view(-1, 1)).squeeze(1)
    assert bool((chosen >= logits.amax(1) - LOGIT_SLACK[dtype]).all())
    assert (ids == ids_ref).float().mean().item() >= 0.95
    assert bool((ids < vocab - 7).all()) and not bool(torch.isin(ids, banned).any())
