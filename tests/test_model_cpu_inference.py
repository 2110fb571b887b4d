"""`CpuInference`, the prefill and span steps a CPU serves, against the model's reference passes
(the kernels' torch references): fp32 gives the reference's tokens and numbers up to rounding,
and prefill the reference's cache; the bf16 screen of the output head gives the exact head's
tokens; bf16 linear layers stay close."""
import pytest
import torch

from denoiser.config import MASK_ID, ModelConfig
from denoiser.model import CpuInference, KVBuffers, SpanDenoiser

VOCAB = 96
BANNED = torch.tensor([MASK_ID, 3, 4, 5])


def make_model(seed: int = 0, scale: float = 5.0) -> SpanDenoiser:
    config = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=3, n_heads=4, d_ff=128, max_positions=512)
    model = SpanDenoiser(config)
    model.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # larger weights than init: peaked attention and decisive logits
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model.eval()


def filled_kv(model, rows: int = 1, length: int = 40, capacity: int = 64, seed: int = 1) -> KVBuffers:
    kv = KVBuffers.allocate(model.config, rows, capacity, "cpu", torch.float32)
    ids = torch.randint(6, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    model.prefill(ids, kv, 0)
    return kv


def span_ids(rows: int, length: int, seed: int = 2) -> torch.Tensor:
    span = torch.randint(6, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    span[:, ::3] = MASK_ID
    return span


def reference(model, fn):
    """fn() on the reference passes, the model's CPU inference set aside meanwhile."""
    cpu, model.cpu_inference = model.cpu_inference, None
    try:
        return fn()
    finally:
        model.cpu_inference = cpu


@pytest.mark.parametrize("ctx_len", [40, torch.tensor([40, 23])], ids=["shared-context", "per-row-context"])
def test_fp32_step_matches_the_reference_step(ctx_len):
    model = make_model()
    kv = filled_kv(model, rows=2)
    span = span_ids(2, 24)
    only = span == MASK_ID
    want_hidden = model.span_hidden(span, kv, ctx_len)
    want = model.span_tokens(span, kv, ctx_len, banned_ids=BANNED, vocab_limit=90)
    want_only = model.span_tokens(span, kv, ctx_len, banned_ids=BANNED, vocab_limit=90, only=only)
    model.prepare_cpu_inference(torch.float32, screen_head=False)
    torch.testing.assert_close(model.span_hidden(span, kv, ctx_len), want_hidden, atol=1e-4, rtol=1e-5)
    got_all = model.span_tokens(span, kv, ctx_len, banned_ids=BANNED, vocab_limit=90)
    got_only = model.span_tokens(span, kv, ctx_len, banned_ids=BANNED, vocab_limit=90, only=only)
    for got, expected in ((got_all, want), (got_only, want_only)):
        assert torch.equal(got[0], expected[0])
        torch.testing.assert_close(got[1], expected[1], atol=1e-6, rtol=1e-5)
    tokens = model.span_tokens(span, kv, ctx_len, banned_ids=BANNED, vocab_limit=90)[0]
    assert not torch.isin(tokens, BANNED).any() and (tokens < 90).all()


def test_bf16_screen_of_the_head_picks_the_exact_heads_tokens():
    model = make_model(3, scale=2.0)  # less decisive logits: near-ties for the screen to get right
    kv = filled_kv(model, seed=4)
    span = span_ids(1, 48, seed=5)
    want_tokens, want_confidence = model.span_tokens(span, kv, 40, banned_ids=BANNED)
    model.prepare_cpu_inference(torch.float32, screen_head=True)
    tokens, confidence = model.span_tokens(span, kv, 40, banned_ids=BANNED)
    assert torch.equal(tokens, want_tokens)
    # The chosen logits are exact; only the softmax tail keeps bf16 rounding.
    torch.testing.assert_close(confidence, want_confidence, atol=5e-3, rtol=0)


def test_bf16_linear_layers_stay_close_to_fp32():
    model = make_model(6)
    kv = filled_kv(model, seed=7)
    span = span_ids(1, 48, seed=8)
    want_tokens, want_confidence = model.span_tokens(span, kv, 40, banned_ids=BANNED)
    model.prepare_cpu_inference(torch.bfloat16)
    tokens, confidence = model.span_tokens(span, kv, 40, banned_ids=BANNED)
    assert (tokens == want_tokens).float().mean() >= 0.9
    agree = tokens == want_tokens
    torch.testing.assert_close(confidence[agree], want_confidence[agree], atol=0.05, rtol=0)


def test_the_step_never_writes_the_context_cache():
    model = make_model()
    kv = filled_kv(model, capacity=40)  # full to the last position: no room to write past the context
    before = kv.k.clone(), kv.v.clone()
    for dtype in (torch.float32, torch.bfloat16):
        model.prepare_cpu_inference(dtype)
        model.span_tokens(span_ids(1, 16), kv, 40)
        assert torch.equal(kv.k, before[0]) and torch.equal(kv.v, before[1])


def test_weights_changed_in_place_are_seen_at_the_next_step():
    model = make_model()
    kv = filled_kv(model)
    span = span_ids(1, 16)
    step = model.prepare_cpu_inference(torch.float32, screen_head=True)
    before, _ = model.span_tokens(span, kv, 40)
    with torch.no_grad():
        model.embed.weight[7] = model.final_norm(model.embed.weight.sum(0)) * 50  # token 7 favoured everywhere
    tokens, _ = model.span_tokens(span, kv, 40)
    assert torch.equal(tokens, reference(model, lambda: model.span_tokens(span, kv, 40))[0])
    assert (tokens == 7).sum() > (before == 7).sum()
    assert model.cpu_inference is not step and model.cpu_inference.screen_head is not None


def test_steps_on_other_devices_or_dtypes_use_the_reference_path():
    model = make_model()
    model.prepare_cpu_inference(torch.float32)
    kv = filled_kv(model)
    model.to(torch.float64)  # no longer the fp32 weights the step needs: the fused-op path serves
    kv64 = KVBuffers(kv.k.double(), kv.v.double())
    hidden = model.span_hidden(span_ids(1, 8), kv64, 40)
    assert hidden.dtype == torch.float64
    assert torch.equal(hidden, reference(model, lambda: model.span_hidden(span_ids(1, 8), kv64, 40)))


def test_refuses_what_it_cannot_run():
    model = make_model()
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        CpuInference(model, torch.float16)
    with pytest.raises(ValueError, match="fp32 weights on the CPU"):
        CpuInference(make_model().to(torch.bfloat16))
    with pytest.raises(ValueError, match="vocab_limit must be positive"):
        CpuInference(model).tokens(torch.zeros(2, 64), vocab_limit=0)


@pytest.mark.parametrize("pieces", [((0, 40),), ((0, 1), (1, 17), (17, 18), (18, 40))], ids=["at-once", "in-pieces"])
def test_prefill_matches_the_reference_prefill(pieces):
    model = make_model()
    ids = torch.randint(6, VOCAB, (2, 40), generator=torch.Generator().manual_seed(9))
    want = KVBuffers.allocate(model.config, 2, 48, "cpu", torch.float32)
    want_last = [model.prefill(ids[:, a:b], want, a) for a, b in pieces]
    model.prepare_cpu_inference(torch.bfloat16)  # prefill is fp32 whatever the steps run in
    got = KVBuffers.allocate(model.config, 2, 48, "cpu", torch.float32)
    got_last = [model.prefill(ids[:, a:b], got, a) for a, b in pieces]
    torch.testing.assert_close(got.k, want.k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.v, want.v, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_last, want_last):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5)


def test_the_span_over_a_cpu_prefilled_context_still_equals_one_full_pass():
    """The key property (tests/test_model.py) on the CPU inference path, in fp32."""
    from tests.test_model import full_pass_span_logits, random_ids

    model = make_model()
    model.prepare_cpu_inference(torch.float32, screen_head=False)
    context, middle, span = random_ids(37, 1), random_ids(5, 2), random_ids(16, 3)
    span[0, ::3] = MASK_ID
    kv = KVBuffers.allocate(model.config, 1, 64, "cpu", torch.float32)
    model.prefill(context, kv, 0)
    with torch.no_grad():
        full = full_pass_span_logits(model, context, middle, span)
    assert (model.span_logits(span, kv, 37) - full).abs().max().item() <= 1e-4


def test_top_ids_are_the_topk_ids():
    from denoiser.model import top_ids

    g = torch.Generator().manual_seed(10)
    for vocab in (8192, 96, 1000):
        scores = torch.randn(5, vocab, generator=g)
        crowd = min(100, vocab)
        scores[0, :crowd] = scores[0].max() + 1 + torch.rand(crowd, generator=g) * 1e-3  # the best crowd one block
        want = scores.topk(8, dim=-1).indices.sort(-1).values
        assert torch.equal(top_ids(scores, 8).sort(-1).values, want)
