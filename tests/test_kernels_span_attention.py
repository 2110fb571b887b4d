"""Split-context span attention kernel against its torch reference, under Triton's CPU interpreter."""
import math

import pytest
import torch

pytest.importorskip("triton")

from kernels.span_attention import span_attention, span_attention_reference, span_attention_triton

FP32 = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(b, h, hkv, span, capacity, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    return (rand(b, h, span, d), rand(b, hkv, capacity, d), rand(b, hkv, capacity, d),
            rand(b, hkv, span, d), rand(b, hkv, span, d))


def _naive(q, k_cache, v_cache, k_span, v_span, ctx_lens):
    """Independent oracle for the reference: explicit softmax in fp64, one sequence and head at a time."""
    b, h, span, d = q.shape
    group = h // k_cache.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(b):
        for head in range(h):
            kv = head // group
            k = torch.cat((k_cache[i, kv, : ctx_lens[i]], k_span[i, kv])).double()
            v = torch.cat((v_cache[i, kv, : ctx_lens[i]], v_span[i, kv])).double()
            scores = q[i, head].double() @ k.t() / math.sqrt(d)
            out[i, head] = torch.softmax(scores, dim=-1) @ v
    return out


CASES = [
    # b, h, hkv, span, capacity, ctx_len, d, num_splits, block_n
    pytest.param(1, 2, 2, 5, 0, 0, 16, 1, 16, id="no-context"),
    pytest.param(1, 2, 2, 1, 40, 40, 16, 1, 16, id="one-span-token"),
    pytest.param(2, 4, 2, 3, 50, 37, 32, 3, 16, id="gqa-ctx-below-capacity-3-splits"),
    pytest.param(1, 4, 1, 7, 33, 33, 16, 4, 16, id="mqa-non-pow2-4-splits"),
    pytest.param(1, 2, 2, 20, 24, 5, 16, 4, 16, id="more-splits-than-context-blocks"),
    pytest.param(1, 1, 1, 17, 70, 70, 24, 2, 16, id="non-pow2-head-dim-span-over-one-block"),
]


@pytest.mark.parametrize("b,h,hkv,span,capacity,ctx_len,d,num_splits,block_n", CASES)
def test_kernel_matches_reference_fp32(b, h, hkv, span, capacity, ctx_len, d, num_splits, block_n):
    q, kc, vc, ks, vs = _inputs(b, h, hkv, span, capacity, d, seed=capacity + span)
    got = span_attention_triton(q, kc, vc, ks, vs, ctx_len, num_splits=num_splits, block_n=block_n, block_m=16)
    want = span_attention_reference(q, kc, vc, ks, vs, ctx_len)
    torch.testing.assert_close(got, want, **FP32)
    torch.testing.assert_close(want.double(), _naive(q, kc, vc, ks, vs, [ctx_len] * b), atol=1e-5, rtol=1e-5)


def test_per_sequence_context_lengths():
    # A batch of documents with different context lengths, one launch (as dynamic batching needs).
    q, kc, vc, ks, vs = _inputs(3, 4, 2, 6, 40, 16, seed=3)
    lens = torch.tensor([0, 17, 40])
    got = span_attention_triton(q, kc, vc, ks, vs, lens, num_splits=2, block_n=16, block_m=16)
    want = span_attention_reference(q, kc, vc, ks, vs, lens)
    torch.testing.assert_close(got, want, **FP32)
    torch.testing.assert_close(want.double(), _naive(q, kc, vc, ks, vs, lens.tolist()), atol=1e-5, rtol=1e-5)
    # A per-sequence length equal for all matches the int form.
    torch.testing.assert_close(span_attention_reference(q, kc, vc, ks, vs, torch.tensor([17] * 3)),
                               span_attention_reference(q, kc, vc, ks, vs, 17), atol=1e-6, rtol=1e-6)


def test_strided_queries_and_cache_views_as_the_model_passes_them():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 5, 4, 16, generator=g).transpose(1, 2)  # [B, H, L, D] view of [B, L, H, D]
    cache = torch.randn(3, 2, 4, 30, 16, generator=g)  # [layers, B, H, C, D]; take layer 1
    kc, vc = cache[1], cache[2]
    ks, vs = torch.randn(2, 4, 5, 16, generator=g), torch.randn(2, 4, 5, 16, generator=g)
    got = span_attention(q, kc, vc, ks, vs, 21, num_splits=2, use_triton=True)
    torch.testing.assert_close(got, span_attention_reference(q, kc, vc, ks, vs, 21), **FP32)


def test_default_block_sizes_and_split_choice():
    q, kc, vc, ks, vs = _inputs(1, 2, 2, 4, 600, 32, seed=5)
    got = span_attention(q, kc, vc, ks, vs, 600, use_triton=True)  # picks its own splits
    torch.testing.assert_close(got, span_attention_reference(q, kc, vc, ks, vs, 600), **FP32)


def test_fp16_in_the_interpreter():
    q, kc, vc, ks, vs = _inputs(1, 2, 1, 4, 20, 16, seed=6, dtype=torch.float16)
    got = span_attention_triton(q, kc, vc, ks, vs, 20, num_splits=2, block_n=16)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, span_attention_reference(q, kc, vc, ks, vs, 20), atol=2e-3, rtol=2e-3)


def test_errors_users_can_act_on():
    q, kc, vc, ks, vs = _inputs(1, 3, 2, 4, 8, 16, seed=8)
    with pytest.raises(ValueError, match="not a multiple of n_kv_heads"):
        span_attention(q, kc, vc, ks, vs, 4, use_triton=True)
    q, kc, vc, ks, vs = _inputs(1, 2, 2, 4, 8, 16, seed=8)
    with pytest.raises(ValueError, match="outside the cache"):
        span_attention(q, kc, vc, ks, vs, 9, use_triton=True)
