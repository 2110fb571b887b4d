"""Confidence-threshold parallel unmasking: deterministic, >= 1 commit per step, bounded steps."""
import math

import pytest
import torch

from denoiser.backend import Cancelled, DecodeSettings
from denoiser.config import EOS_ID, MASK_ID, PAD_ID, ModelConfig
from denoiser.model import KVBuffers, SpanDenoiser
from denoiser.sampler import NEVER_WRITTEN, choose_commits, commit_count, denoise_span, finished_at, pad_after_first_end

CTX = 24


class RecordingModel:
    """The real model, with every span it is shown recorded (to check the step rules)."""

    def __init__(self, model):
        self.model = model
        self.config = model.config
        self.spans: list[torch.Tensor] = []

    def span_logits(self, span, kv, ctx_len):
        self.spans.append(span.clone())
        return self.model.span_logits(span, kv, ctx_len)


def make_model(seed=0, favour=None, scale=1.0):
    config = ModelConfig(vocab_size=80, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_positions=256)
    model = SpanDenoiser(config)
    model.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
        if favour is not None:
            # Tied head: a huge embedding row makes that token the top logit almost everywhere.
            model.embed.weight[favour] = model.final_norm(model.embed.weight.sum(0)) * 50
    return model.eval()


def context_kv(model, seed=1):
    ids = torch.randint(6, 80, (1, CTX), generator=torch.Generator().manual_seed(seed))
    kv = KVBuffers.allocate(model.config, 1, 64, "cpu", torch.float32)
    model.prefill(ids, kv, 0)
    return kv


def committed_counts(spans):
    return [int((s != MASK_ID).sum()) for s in spans]


def test_deterministic():
    model = make_model()
    kv = context_kv(model)
    decode = DecodeSettings(confidence_threshold=0.5)
    first = denoise_span(model, kv, CTX, 32, decode)
    second = denoise_span(model, context_kv(model), CTX, 32, decode)
    assert first == second


@pytest.mark.parametrize("threshold", [1.0, 0.9, 0.3, 0.01])
@pytest.mark.parametrize("span_len", [16, 32])
def test_commits_at_least_one_per_step_and_ends_within_span_steps(threshold, span_len):
    model = RecordingModel(make_model(seed=span_len, scale=3.0))
    result = denoise_span(model, context_kv(model.model), CTX, span_len, DecodeSettings(confidence_threshold=threshold))
    assert 1 <= result.steps <= span_len
    assert result.steps == len(model.spans)
    counts = committed_counts(model.spans)
    assert counts[0] == 0
    assert all(b > a for a, b in zip(counts, counts[1:])), counts
    # A committed position never changes afterwards.
    for before, after in zip(model.spans, model.spans[1:]):
        kept = before != MASK_ID
        assert torch.equal(before[kept], after[kept])
    assert MASK_ID not in result.tokens
    assert len(result.tokens) <= span_len


def test_threshold_one_commits_exactly_one_per_step():
    model = RecordingModel(make_model(seed=3))
    result = denoise_span(model, context_kv(model.model), CTX, 16, DecodeSettings(confidence_threshold=1.0))
    assert committed_counts(model.spans) == list(range(result.steps))


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_steps_cap_is_respected_and_span_finishes(steps):
    model = RecordingModel(make_model(seed=4))
    result = denoise_span(model, context_kv(model.model), CTX, 32, DecodeSettings(steps=steps, confidence_threshold=1.0))
    assert result.steps <= steps
    # Finished: either an end token, or every position holds a real token.
    assert result.ended or len(result.tokens) == 32


def test_cancellation_between_steps():
    model = RecordingModel(make_model(seed=5))
    calls = {"n": 0}

    def is_cancelled():
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(Cancelled):
        denoise_span(model, context_kv(model.model), CTX, 16, DecodeSettings(confidence_threshold=1.0), is_cancelled)
    assert len(model.spans) == 2


def test_never_writes_the_mask_token():
    model = make_model(favour=MASK_ID)
    kv = context_kv(model)
    assert model.span_logits(torch.full((1, 16), MASK_ID), kv, CTX)[0].argmax(-1).eq(MASK_ID).all()
    result = denoise_span(model, kv, CTX, 16, DecodeSettings())
    assert MASK_ID not in result.tokens


def test_stops_at_eos_once_everything_before_it_is_committed():
    model = RecordingModel(make_model(favour=EOS_ID))
    result = denoise_span(model, context_kv(model.model), CTX, 16, DecodeSettings(confidence_threshold=0.9))
    assert result.ended and result.tokens == () and result.steps == 1


def test_vocab_limit_keeps_tokens_the_tokenizer_knows():
    model = make_model(seed=6, scale=3.0)
    result = denoise_span(model, context_kv(model), CTX, 32, DecodeSettings(), vocab_limit=20)
    assert all(t < 20 for t in result.tokens)


def test_choose_commits_threshold_ties_and_minimum():
    conf = torch.tensor([0.5, 0.95, 0.5, 0.99, 0.2])
    masked = torch.tensor([True, True, True, False, True])
    assert choose_commits(conf, masked, 0.9, 1).tolist() == [False, True, False, False, False]
    # Nothing passes: the most confident masked one, ties to the lowest index.
    assert choose_commits(conf, masked, 0.999, 1).tolist() == [False, True, False, False, False]
    assert choose_commits(conf, masked, 0.999, 2).tolist() == [True, True, False, False, False]
    assert choose_commits(conf, masked, 0.999, 9).tolist() == [True, True, True, False, True]


def test_commit_count_spreads_the_rest_over_the_steps_left():
    assert commit_count(10, 0, 0) == 1
    assert commit_count(10, 0, 3) == 4
    assert commit_count(6, 1, 3) == 3
    assert commit_count(5, 2, 3) == 5
    assert commit_count(5, 7, 3) == 5  # past the cap: finish now


def test_finished_at_needs_everything_before_the_end_committed():
    span = torch.tensor([7, MASK_ID, EOS_ID, 9])
    assert finished_at(span, span == MASK_ID) is None
    span = torch.tensor([7, 8, EOS_ID, MASK_ID])
    assert finished_at(span, span == MASK_ID) == 2


def test_positions_after_the_first_committed_end_become_pad():
    span = torch.tensor([7, MASK_ID, EOS_ID, MASK_ID, 9, MASK_ID])
    masked = span == MASK_ID
    pad_after_first_end(span, masked)
    assert span.tolist() == [7, MASK_ID, EOS_ID, PAD_ID, 9, PAD_ID]
    assert masked.tolist() == [False, True, False, False, False, False]
    untouched = torch.tensor([7, MASK_ID, 9])
    pad_after_first_end(untouched, untouched == MASK_ID)
    assert untouched.tolist() == [7, MASK_ID, 9]


class ScriptedLogits:
    """Logits that do not depend on the input: position END is a sure <eos>, every other
    position a likely-but-unsure token 40, most confident at the end of the span."""

    END = 10

    def __init__(self, length):
        self.spans: list[torch.Tensor] = []
        self.logits = torch.zeros(1, length, 80)
        self.logits[0, :, 40] = torch.linspace(2.0, 4.0, length)
        self.logits[0, self.END, EOS_ID] = 50.0

    def span_logits(self, span, kv, ctx_len):
        self.spans.append(span.clone())
        return self.logits.clone()


def test_no_step_is_spent_past_a_committed_end():
    # One commit per step (threshold 1.0). The first step commits the sure <eos>;
    # the positions after it (the most confident ones left) become <pad> at once, so
    # the model never sees a mask after the end again and the span takes one step
    # per position before it.
    model = ScriptedLogits(16)
    kv = KVBuffers.allocate(make_model().config, 1, 64, "cpu", torch.float32)
    result = denoise_span(model, kv, CTX, 16, DecodeSettings(confidence_threshold=1.0))
    assert result.ended and result.tokens == (40,) * model.END
    assert result.steps == model.END + 1
    for shown in model.spans[1:]:
        assert shown[0, model.END] == EOS_ID and not (shown[0, model.END + 1:] == MASK_ID).any()


def test_the_result_carries_the_probability_of_each_written_token():
    model = ScriptedLogits(16)
    kv = KVBuffers.allocate(make_model().config, 1, 64, "cpu", torch.float32)
    result = denoise_span(model, kv, CTX, 16, DecodeSettings(confidence_threshold=1.0))
    logits = model.logits[0].double()
    logits[:, list(NEVER_WRITTEN)] = float("-inf")  # the sampler never writes these
    probabilities = torch.softmax(logits, -1)
    want = sum(math.log(probabilities[i, 40]) for i in range(model.END)) + math.log(probabilities[model.END, EOS_ID])
    assert result.scored == model.END + 1
    assert result.log_confidence == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("screen_head", [False, True], ids=["fp32-head", "bf16-screened-head"])
def test_the_cpu_step_decodes_the_reference_spans(screen_head):
    """`CpuInference` in fp32 (its output head exact, or screened in bf16 and rescored) writes the
    same spans, in the same number of steps, as the reference step."""
    decode = DecodeSettings(steps=6, confidence_threshold=0.5)
    for seed in range(4):
        model = make_model(seed, scale=4.0)
        kv = context_kv(model, seed + 10)
        want = denoise_span(model, kv, CTX, 24, decode, vocab_limit=75)
        model.prepare_cpu_inference(torch.float32, screen_head=screen_head)
        got = denoise_span(model, kv, CTX, 24, decode, vocab_limit=75)
        assert (got.tokens, got.steps, got.ended) == (want.tokens, want.steps, want.ended)
        assert got.log_confidence == pytest.approx(want.log_confidence, abs=0.05 if screen_head else 1e-4)
