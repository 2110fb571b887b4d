"""Fused final norm + LM head + confidence/argmax kernel against its torch reference,
under Triton's CPU interpreter."""
import pytest
import torch

pytest.importorskip("triton")

from kernels.lm_head_argmax import lm_head_argmax, lm_head_argmax_reference, lm_head_argmax_triton
from kernels.rmsnorm import rms_norm_reference

SMALL_BLOCKS = dict(block_m=16, block_v=16, block_k=16)


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(n, d, vocab, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g) * 2).to(dtype)
    norm_weight = 1 + 0.1 * torch.randn(d, generator=g)
    embed = torch.randn(vocab, d, generator=g).to(dtype)
    return hidden, norm_weight, embed


@pytest.mark.parametrize(
    "n,d,vocab,num_splits",
    [(1, 16, 16, 1), (3, 24, 50, 1), (5, 40, 100, 3), (17, 24, 70, 4), (2, 16, 40, 8)],
    ids=["one-row-one-tile", "non-pow2", "three-chunks", "rows-over-one-block", "more-chunks-than-tiles"],
)
def test_kernel_matches_reference_fp32(n, d, vocab, num_splits):
    hidden, w, embed = _inputs(n, d, vocab, seed=n * vocab)
    ids, conf = lm_head_argmax_triton(hidden, w, 1e-5, embed, num_splits=num_splits, **SMALL_BLOCKS)
    ids_ref, conf_ref = lm_head_argmax_reference(hidden, w, 1e-5, embed)
    assert ids.dtype == torch.long and conf.dtype == torch.float32
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(conf, conf_ref, atol=1e-5, rtol=1e-5)


def test_banned_ids_and_vocab_limit_as_the_sampler_uses_them():
    hidden, w, embed = _inputs(6, 24, 70, seed=1)
    # Make the banned and out-of-limit tokens the favourites, so excluding them matters.
    embed[2] = hidden[0] * 5
    embed[65] = hidden[1] * 5
    banned = torch.tensor([0, 2, 5])
    ids, conf = lm_head_argmax_triton(hidden, w, 1e-5, embed, banned_ids=banned, vocab_limit=60,
                                      num_splits=2, **SMALL_BLOCKS)
    ids_ref, conf_ref = lm_head_argmax_reference(hidden, w, 1e-5, embed, banned_ids=banned, vocab_limit=60)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(conf, conf_ref, atol=1e-5, rtol=1e-5)
    assert not any(i in (0, 2, 5) or i >= 60 for i in ids.tolist())
    # The sampler's own formulation: full logits, -inf on excluded ids, softmax, max.
    logits = rms_norm_reference(hidden, w, 1e-5) @ embed.t()
    logits[:, [0, 2, 5]] = float("-inf")
    logits[:, 60:] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(conf, probs.amax(-1), atol=1e-5, rtol=1e-5)
    assert torch.equal(ids, probs.argmax(-1))


def test_ties_go_to_the_lowest_id_across_tiles_and_chunks():
    hidden, w, embed = _inputs(4, 16, 48, seed=2)
    w = torch.ones(16)
    for twin in (20, 33, 47):  # other tiles (16 wide) and other chunks (3 chunks of 16)
        embed[twin] = embed[7]
    hidden[:] = embed[7]
    ids, conf = lm_head_argmax_triton(hidden, w, 1e-5, embed, num_splits=3, **SMALL_BLOCKS)
    assert ids.tolist() == [7, 7, 7, 7]
    torch.testing.assert_close(conf, lm_head_argmax_reference(hidden, w, 1e-5, embed)[1], atol=1e-5, rtol=1e-5)


def test_leading_dims_and_fp16():
    hidden, w, embed = _inputs(6, 32, 64, seed=3, dtype=torch.float16)
    hidden = hidden.view(2, 3, 32)
    ids, conf = lm_head_argmax(hidden, w, 1e-5, embed, num_splits=2, use_triton=True)
    ids_ref, conf_ref = lm_head_argmax_reference(hidden, w, 1e-5, embed)
    assert ids.shape == (2, 3) and conf.shape == (2, 3)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(conf, conf_ref, atol=1e-3, rtol=1e-3)


def test_reference_matches_the_models_logits():
    from denoiser.config import ModelConfig
    from denoiser.model import SpanDenoiser

    model = SpanDenoiser(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64))
    model.init_weights(torch.Generator().manual_seed(4))
    hidden = torch.randn(5, 32, generator=torch.Generator().manual_seed(5))
    probs = torch.softmax(model.logits(hidden).float(), dim=-1)
    ids, conf = lm_head_argmax_reference(hidden, model.final_norm.weight, model.config.norm_eps, model.embed.weight)
    assert torch.equal(ids, probs.argmax(-1))
    torch.testing.assert_close(conf, probs.amax(-1), atol=1e-6, rtol=1e-5)


def test_shape_errors_are_reported():
    hidden, w, embed = _inputs(2, 16, 32, seed=6)
    with pytest.raises(ValueError, match="embed_weight must be"):
        lm_head_argmax(hidden, w, 1e-5, embed[:, :8], use_triton=True)
