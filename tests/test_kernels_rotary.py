"""Rotary embedding kernel against its torch reference, under Triton's CPU interpreter."""
import pytest
import torch

pytest.importorskip("triton")

from denoiser.model import Rotary
from kernels.rotary import apply_rotary, apply_rotary_reference, rotary_tables

EXACT = dict(atol=1e-6, rtol=1e-6)  # fp32: the same two products and one add per element


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _qk(b, hq, hk, t, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, hq, t, d, generator=g).to(dtype), torch.randn(b, hk, t, d, generator=g).to(dtype)


@pytest.mark.parametrize(
    "b,hq,hk,t,d",
    [(1, 1, 1, 1, 16), (2, 4, 2, 5, 12), (1, 3, 3, 7, 32), (2, 8, 1, 3, 64)],
    ids=["single-token", "gqa-non-pow2-head-dim", "odd-heads", "mqa"],
)
def test_kernel_matches_reference_with_position_table(b, hq, hk, t, d):
    q, k = _qk(b, hq, hk, t, d, seed=t * d)
    cos, sin = rotary_tables(d, 64, 10000.0)
    positions = torch.randint(0, 64, (b, t), generator=torch.Generator().manual_seed(d))
    got = apply_rotary(q, k, cos, sin, positions, use_triton=True)
    want = apply_rotary_reference(q, k, cos, sin, positions)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, **EXACT)


def test_shared_positions_and_per_token_tables_agree():
    q, k = _qk(2, 4, 2, 6, 16, seed=5)
    cos, sin = rotary_tables(16, 32, 500.0)
    pos = torch.arange(10, 16)
    by_table = apply_rotary(q, k, cos, sin, pos, use_triton=True)
    by_rows = apply_rotary(q, k, cos[pos], sin[pos], None, use_triton=True)
    by_batch_rows = apply_rotary(q, k, cos[pos].expand(2, 6, 16), sin[pos].expand(2, 6, 16), use_triton=True)
    want = apply_rotary_reference(q, k, cos, sin, pos)
    for got in (by_table, by_rows, by_batch_rows):
        for g_, w_ in zip(got, want):
            torch.testing.assert_close(g_, w_, **EXACT)


def test_non_contiguous_q_k_as_the_model_makes_them():
    # The model views qkv [B, T, 3, H, D] and permutes: q, k are strided views.
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(2, 5, 3, 4, 16, generator=g).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    assert not q.is_contiguous()
    cos, sin = rotary_tables(16, 16)
    pos = torch.arange(5).expand(2, 5)
    for g_, w_ in zip(apply_rotary(q, k, cos, sin, pos, use_triton=True), apply_rotary_reference(q, k, cos, sin, pos)):
        torch.testing.assert_close(g_, w_, **EXACT)


def test_fp16_inputs_stay_fp16():
    q, k = _qk(1, 2, 2, 4, 32, seed=9, dtype=torch.float16)
    cos, sin = rotary_tables(32, 8)
    pos = torch.arange(4, 8)
    got = apply_rotary(q, k, cos, sin, pos, use_triton=True)
    want = apply_rotary_reference(q, k, cos, sin, pos)
    assert got[0].dtype == torch.float16
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, atol=1e-3, rtol=1e-3)


def test_reference_is_the_models_rotary():
    q, k = _qk(2, 4, 4, 6, 32, seed=11)
    rotary = Rotary(32, 100, 10000.0)
    cos, sin = rotary_tables(32, 100, 10000.0)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5], [40, 41, 42, 43, 44, 99]])
    q_rot, k_rot = apply_rotary_reference(q, k, cos, sin, pos)
    torch.testing.assert_close(q_rot, rotary(q, pos), **EXACT)
    torch.testing.assert_close(k_rot, rotary(k, pos), **EXACT)


def test_rotation_preserves_pair_norms_and_position_zero_is_identity():
    q, k = _qk(1, 2, 2, 3, 16, seed=13)
    cos, sin = rotary_tables(16, 8)
    q0, _ = apply_rotary(q, k, cos, sin, torch.zeros(3, dtype=torch.long), use_triton=True)
    torch.testing.assert_close(q0, q, **EXACT)
    q5, _ = apply_rotary(q, k, cos, sin, torch.full((3,), 5), use_triton=True)
    pair_norm = lambda x: x[..., :8] ** 2 + x[..., 8:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(q5), pair_norm(q), atol=1e-5, rtol=1e-5)


def test_shape_errors_are_reported():
    q, k = _qk(1, 2, 2, 3, 16, seed=1)
    cos, sin = rotary_tables(16, 8)
    with pytest.raises(ValueError, match="positions must be"):
        apply_rotary(q, k, cos, sin, torch.zeros(4, dtype=torch.long), use_triton=True)
    with pytest.raises(ValueError, match="one per token"):
        apply_rotary(q, k, cos, sin, None, use_triton=True)
