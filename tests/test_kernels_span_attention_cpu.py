"""The CPU span attention (context read in place, merged with the span by log-sum-exp)
against the torch reference, in the layouts the model and the batcher pass."""
import importlib

import pytest
import torch

from kernels.span_attention import span_attention, span_attention_cpu, span_attention_reference

FP32 = dict(atol=2e-6, rtol=2e-5)


def _inputs(b, h, hkv, span, capacity, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: (3 * torch.randn(*shape, generator=g)).to(dtype)  # noqa: E731  (peaked softmax)
    return (rand(b, h, span, d), rand(b, hkv, capacity, d), rand(b, hkv, capacity, d),
            rand(b, hkv, span, d), rand(b, hkv, span, d))


@pytest.mark.parametrize("b,h,span,capacity,ctx_len,d", [
    (1, 4, 32, 1100, 1024, 64),  # the default model's step
    (1, 2, 1, 40, 40, 16),  # one span token, the cache full
    (2, 4, 7, 50, 37, 32),
    (1, 2, 5, 0, 0, 16),  # no context at all
    (1, 2, 5, 16, 0, 16),  # an empty context in a non-empty cache
])
def test_matches_the_reference(b, h, span, capacity, ctx_len, d):
    q, kc, vc, ks, vs = _inputs(b, h, h, span, capacity, d, seed=capacity + span)
    want = span_attention_reference(q, kc, vc, ks, vs, ctx_len)
    torch.testing.assert_close(span_attention_cpu(q, kc, vc, ks, vs, ctx_len), want, **FP32)
    torch.testing.assert_close(span_attention_cpu(q, kc, vc, ks, vs, torch.tensor([ctx_len] * b)), want, **FP32)


def test_one_context_length_per_row_including_none():
    q, kc, vc, ks, vs = _inputs(3, 2, 2, 6, 30, 16, seed=1)
    lens = torch.tensor([30, 0, 11])
    want = span_attention_reference(q, kc, vc, ks, vs, lens)
    torch.testing.assert_close(span_attention_cpu(q, kc, vc, ks, vs, lens), want, **FP32)


def test_layouts_the_model_passes():
    """q as a transposed [B, L, H, D] view, the cache as one layer of [layers, B, H, capacity, D], and
    one document's context broadcast to two rows (a stride-0 view, as the draft check passes it)."""
    q_rows = torch.randn(2, 9, 4, 32)
    q = q_rows.transpose(1, 2)
    cache = torch.randn(3, 1, 4, 64, 32)
    kc, vc = cache[1].expand(2, -1, -1, -1), cache[2].expand(2, -1, -1, -1)
    ks, vs = torch.randn(2, 9, 4, 32).transpose(1, 2), torch.randn(2, 4, 9, 32)
    got = span_attention_cpu(q, kc, vc, ks, vs, 41)
    torch.testing.assert_close(got, span_attention_reference(q, kc, vc, ks, vs, 41), **FP32)
    # The output keeps q's memory order: back to [B, L, H * D] without a copy.
    assert got.transpose(1, 2).is_contiguous()


def test_cache_never_written():
    q, kc, vc, ks, vs = _inputs(2, 2, 2, 4, 20, 16, seed=2)
    before = kc.clone(), vc.clone()
    span_attention_cpu(q, kc, vc, ks, vs, torch.tensor([20, 3]))
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


def test_grouped_heads_and_mixed_dtypes_fall_back_to_the_reference():
    q, kc, vc, ks, vs = _inputs(1, 4, 2, 3, 12, 16, seed=3)
    torch.testing.assert_close(span_attention_cpu(q, kc, vc, ks, vs, 9),
                               span_attention_reference(q, kc, vc, ks, vs, 9), **FP32)
    q, kc, vc, ks, vs = _inputs(1, 2, 2, 3, 12, 16, seed=4)
    mixed = span_attention_cpu(q, kc.double(), vc.double(), ks, vs, 9)
    torch.testing.assert_close(mixed, span_attention_reference(q, kc.double(), vc.double(), ks, vs, 9))


def test_dispatcher_runs_it_on_the_cpu_and_the_reference_on_request(monkeypatch):
    q, kc, vc, ks, vs = _inputs(1, 2, 2, 3, 12, 16, seed=5)
    calls = []
    module = importlib.import_module("kernels.span_attention")  # the package exports a function of that name
    counted = lambda *a, **k: calls.append("cpu") or span_attention_cpu(*a, **k)  # noqa: E731
    monkeypatch.setattr(module, "span_attention_cpu", counted)
    span_attention(q, kc, vc, ks, vs, 12)
    span_attention(q, kc, vc, ks, vs, 12, use_triton=False)
    assert calls == ["cpu"]


def test_range_errors_are_the_references():
    q, kc, vc, ks, vs = _inputs(1, 2, 2, 3, 12, 16, seed=6)
    with pytest.raises(ValueError, match="outside the cache"):
        span_attention_cpu(q, kc, vc, ks, vs, 13)
    with pytest.raises(ValueError, match="ctx_len tensor must have shape"):
        span_attention_cpu(q, kc, vc, ks, vs, torch.tensor([1, 2]))


@pytest.mark.parametrize("start,n", [(0, 1), (0, 40), (23, 1), (23, 17), (60, 4)])
def test_prefill_attention_is_causal_attention_over_the_cache(start, n):
    from kernels.span_attention import prefill_attention_cpu

    g = torch.Generator().manual_seed(start + n)
    # q as the model passes it: a transposed [B, L, H, D] view.
    q = torch.randn(2, n, 4, 16, generator=g).transpose(1, 2)
    kc, vc = torch.randn(2, 4, 64, 16, generator=g), torch.randn(2, 4, 64, 16, generator=g)
    end = start + n
    mask = torch.ones(n, end, dtype=torch.bool).tril(diagonal=start)
    want = torch.nn.functional.scaled_dot_product_attention(q, kc[:, :, :end], vc[:, :, :end], attn_mask=mask)
    torch.testing.assert_close(prefill_attention_cpu(q, kc, vc, start), want, **FP32)
    with pytest.raises(ValueError, match="outside the cache"):
        prefill_attention_cpu(q, kc, vc, 64 - n + 1)
