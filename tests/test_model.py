"""The span denoiser's key property: context K/V never depend on the span.

Span logits over a cached context must equal one full pass with the training
mask, and prefill in pieces must equal prefill at once (fp32, 1e-5).
"""
import pytest
import torch

from denoiser.config import EOS_ID, MASK_ID, PAD_ID, ModelConfig
from denoiser.model import KVBuffers, SpanDenoiser, training_mask

TOL = 1e-5


def make_model(seed: int = 0) -> SpanDenoiser:
    config = ModelConfig(vocab_size=96, d_model=64, n_layers=3, n_heads=4, d_ff=128, max_positions=512)
    model = SpanDenoiser(config)
    model.init_weights(torch.Generator().manual_seed(seed))
    # Larger weights than init so attention is far from uniform and errors would show.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    return model.eval()


def random_ids(n: int, seed: int, vocab: int = 96) -> torch.Tensor:
    return torch.randint(6, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def full_pass_span_logits(model, context, middle, span):
    """One training-style pass over [context, middle, pad..] + span; logits of the span."""
    c, m, n = context.shape[1], middle.shape[1], span.shape[1]
    causal_region = c + m + 3  # room for padding, as training batches have
    pad = torch.full((1, causal_region - c - m), PAD_ID)
    ids = torch.cat((context, middle, pad, span), dim=1)
    positions = torch.cat((torch.arange(causal_region), torch.arange(c, c + n))).unsqueeze(0)
    mask = training_mask(torch.tensor([c + m]), torch.tensor([c]), causal_region, n)
    hidden = model.forward_hidden(ids, positions, mask)
    return model.logits(hidden[:, causal_region:])


def test_span_logits_over_cached_context_equal_full_pass():
    model = make_model()
    context, middle = random_ids(37, 1), random_ids(5, 2)
    span = random_ids(16, 3)
    span[0, ::3] = MASK_ID
    kv = KVBuffers.allocate(model.config, 1, 64, "cpu", torch.float32)
    model.prefill(context, kv, 0)
    cached = model.span_logits(span, kv, context.shape[1])
    with torch.no_grad():
        full = full_pass_span_logits(model, context, middle, span)
    assert cached.shape == (1, 16, model.config.vocab_size)
    assert (cached - full).abs().max().item() <= TOL
    # The span must actually depend on the context (else equality proves little).
    other = KVBuffers.allocate(model.config, 1, 64, "cpu", torch.float32)
    model.prefill(random_ids(37, 9), other, 0)
    assert (model.span_logits(span, other, 37) - cached).abs().max().item() > 1e-3


def test_changing_the_span_leaves_context_kv_unchanged():
    model = make_model()
    context = random_ids(40, 4)
    kv = KVBuffers.allocate(model.config, 1, 64, "cpu", torch.float32)
    model.prefill(context, kv, 0)
    k_before, v_before = kv.k.clone(), kv.v.clone()
    first = model.span_logits(torch.full((1, 32), MASK_ID), kv, 40)
    second = model.span_logits(random_ids(32, 5), kv, 40)
    assert torch.equal(kv.k, k_before) and torch.equal(kv.v, v_before)
    assert (first - second).abs().max().item() > 1e-3
    # And the same span again gives the same logits: nothing leaked between steps.
    assert torch.equal(model.span_logits(torch.full((1, 32), MASK_ID), kv, 40), first)


def test_prefill_in_pieces_equals_prefill_at_once():
    model = make_model()
    context = random_ids(50, 6)
    whole = KVBuffers.allocate(model.config, 1, 64, "cpu", torch.float32)
    last_whole = model.prefill(context, whole, 0)
    pieces = KVBuffers.allocate(model.config, 1, 64, "cpu", torch.float32)
    for start, end in ((0, 1), (1, 20), (20, 21), (21, 50)):
        last_pieces = model.prefill(context[:, start:end], pieces, start)
    assert (whole.k[:, :, :, :50] - pieces.k[:, :, :, :50]).abs().max().item() <= TOL
    assert (whole.v[:, :, :, :50] - pieces.v[:, :, :, :50]).abs().max().item() <= TOL
    assert (last_whole - last_pieces).abs().max().item() <= TOL


def test_prefill_last_hidden_is_the_causal_next_token_state():
    """The AR baseline reads next-token logits from prefill's last hidden: it must match the full pass."""
    model = make_model()
    seq = torch.cat((random_ids(30, 7), torch.tensor([[EOS_ID]])), dim=1)
    kv = KVBuffers.allocate(model.config, 1, 64, "cpu", torch.float32)
    last = model.prefill(seq, kv, 0)
    n = seq.shape[1]
    mask = torch.ones(n, n, dtype=torch.bool).tril().view(1, 1, n, n)
    with torch.no_grad():
        full = model.forward_hidden(seq, torch.arange(n).unsqueeze(0), mask)
    assert (model.logits(last) - model.logits(full[:, -1])).abs().max().item() <= TOL


def test_prefill_refuses_to_overflow_the_cache():
    model = make_model()
    kv = KVBuffers.allocate(model.config, 1, 16, "cpu", torch.float32)
    with pytest.raises(ValueError, match="exceeds"):
        model.prefill(random_ids(17, 8), kv, 0)


def test_span_tokens_at_chosen_positions_equal_the_full_head():
    model = make_model(4)
    kv = KVBuffers.allocate(model.config, 2, 64, "cpu", torch.float32)
    model.prefill(torch.cat((random_ids(20, 5), random_ids(20, 6))), kv, 0)
    span = torch.cat((random_ids(12, 7), random_ids(12, 8)))
    span[:, ::2] = MASK_ID
    banned = torch.tensor([MASK_ID])
    with torch.no_grad():
        tokens, confidence = model.span_tokens(span, kv, 20, banned_ids=banned)
        only = span == MASK_ID
        some_tokens, some_confidence = model.span_tokens(span, kv, 20, banned_ids=banned, only=only)
    assert torch.equal(some_tokens[only], tokens[only])
    assert torch.allclose(some_confidence[only], confidence[only], atol=1e-6)
    assert (some_tokens[~only] == MASK_ID).all() and (some_confidence[~only] == -1).all()
