"""Fused RMSNorm kernel against its torch reference, under Triton's CPU interpreter."""
import pytest
import torch

pytest.importorskip("triton")

from denoiser.model import RMSNorm
from kernels.rmsnorm import rms_norm, rms_norm_reference
from kernels.triton_launch import should_use_triton

FP32 = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    # Read at launch time by kernels/triton_launch.py, so setting it per test is enough.
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("shape", [(1, 16), (3, 37), (2, 3, 100)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_kernel_matches_reference_fp32(shape, with_residual):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * 3
    w = torch.randn(shape[-1], generator=g)
    r = torch.randn(shape, generator=g) if with_residual else None
    got = rms_norm(x, w, 1e-5, r, use_triton=True)
    want = rms_norm_reference(x, w, 1e-5, r)
    if with_residual:
        torch.testing.assert_close(got[0], want[0], **FP32)
        torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)  # one fp32 add, same rounding
        torch.testing.assert_close(got[1], x + r, atol=0, rtol=0)
    else:
        torch.testing.assert_close(got, want, **FP32)


def test_kernel_fp16_rounds_residual_sum_like_the_model():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 48, generator=g).half()
    r = torch.randn(4, 48, generator=g).half()
    w = torch.rand(48, generator=g) + 0.5
    y, h = rms_norm(x, w, 1e-6, r, use_triton=True)
    y_ref, h_ref = rms_norm_reference(x, w, 1e-6, r)
    assert y.dtype == torch.float16 and h.dtype == torch.float16
    torch.testing.assert_close(h, h_ref, atol=0, rtol=0)
    torch.testing.assert_close(y, y_ref, atol=1e-3, rtol=1e-3)


def test_non_contiguous_rows():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(6, 40, generator=g)
    x = base[:, :24]  # row stride 40, not 24
    w = torch.randn(24, generator=g)
    torch.testing.assert_close(rms_norm(x, w, 1e-5, use_triton=True), rms_norm_reference(x, w, 1e-5), **FP32)


def test_reference_is_the_models_rmsnorm():
    g = torch.Generator().manual_seed(3)
    norm = RMSNorm(32, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32, generator=g))
    x = torch.randn(2, 5, 32, generator=g)
    torch.testing.assert_close(rms_norm_reference(x, norm.weight, norm.eps), norm(x), atol=0, rtol=0)


def test_cpu_default_is_the_reference_and_forcing_triton_needs_the_interpreter(monkeypatch):
    x, w = torch.randn(2, 8), torch.ones(8)
    assert not should_use_triton(None, x, w)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not should_use_triton(None, x, w)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        rms_norm(x, w, 1e-5, use_triton=True)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5))


def test_bad_weight_shape_is_reported():
    with pytest.raises(ValueError, match="weight has shape"):
        rms_norm(torch.randn(2, 8), torch.ones(7), 1e-5, use_triton=True)
