"""A whole denoising step of the native model with every op on its Triton kernel
(under the CPU interpreter) against the same step on the torch references."""
import functools

import pytest
import torch

pytest.importorskip("triton")

from denoiser import model as model_module
from denoiser.config import ModelConfig
from denoiser.model import KVBuffers, SpanDenoiser
from kernels import apply_rotary, lm_head_argmax, rms_norm, span_attention


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _every_op(monkeypatch, use_triton: bool):
    # The model calls the dispatchers by these names; force their Triton paths, or their references.
    for name, op in (("rms_norm", rms_norm), ("apply_rotary", apply_rotary),
                     ("fused_span_attention", span_attention), ("lm_head_argmax", lm_head_argmax)):
        assert hasattr(model_module, name), f"denoiser.model no longer calls kernels' {name}"
        monkeypatch.setattr(model_module, name, functools.partial(op, use_triton=use_triton))


def test_span_step_on_triton_kernels_matches_the_reference_step(monkeypatch):
    config = ModelConfig(vocab_size=80, d_model=32, n_layers=2, n_heads=2, d_ff=48, max_positions=64)
    model = SpanDenoiser(config)
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():  # larger weights than the training init, so the argmax is decisive
        for p in model.parameters():
            p.mul_(8.0 if p.dim() == 2 else 1.0)
    g = torch.Generator().manual_seed(1)
    kv = KVBuffers.allocate(config, batch=2, capacity=16, device="cpu", dtype=torch.float32)
    model.prefill(torch.randint(6, 80, (2, 11), generator=g), kv, 0)
    span = torch.randint(0, 80, (2, 5), generator=g)
    ctx_len = torch.tensor([11, 7])  # the second document's context is shorter
    banned = torch.tensor([2, 3, 4, 5])

    _every_op(monkeypatch, use_triton=False)
    hidden_ref = model.span_hidden(span, kv, ctx_len)
    ids_ref, conf_ref = model.span_tokens(span, kv, ctx_len, banned_ids=banned, vocab_limit=75)
    _every_op(monkeypatch, use_triton=True)
    hidden = model.span_hidden(span, kv, ctx_len)
    ids, conf = model.span_tokens(span, kv, ctx_len, banned_ids=banned, vocab_limit=75)

    torch.testing.assert_close(hidden, hidden_ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(conf, conf_ref, atol=1e-5, rtol=1e-4)
