"""Drafts checked by the denoiser: positions judged while masked, agreed ones kept with
their probabilities, the rest refilled by the usual steps from that state."""
import math

import pytest
import torch

from denoiser.backend import DecodeSettings
from denoiser.batching import SpanBatcher
from denoiser.config import EOS_ID, MASK_ID, PAD_ID, ModelConfig
from denoiser.drafts import check_draft, draft_positions
from denoiser.model import KVBuffers, SpanDenoiser
from denoiser.native_backend import NativeBackend
from denoiser.sampler import SpanStart, denoise_span
from fim.request import FimRequest, SpanPlan

VOCAB = 80


class ScriptedModel:
    """Predicts `target[i]` at every span position i with probability `p`, whatever it sees."""

    def __init__(self, target, p=0.8):
        self.target, self.p, self.calls = list(target), p, []

    def span_tokens(self, span, kv, ctx_len, *, banned_ids=None, vocab_limit=None, only=None):
        self.calls.append(span.clone())
        b, n = span.shape
        tokens = torch.tensor(self.target[:n], dtype=torch.long).expand(b, n).clone()
        return tokens, torch.full((b, n), self.p)

    def span_logits(self, span, kv, ctx_len):
        """Logits whose softmax gives `target[i]` probability `p` and the other ids the rest, evenly."""
        tokens, _ = self.span_tokens(span, kv, ctx_len)
        logits = torch.full((*tokens.shape, VOCAB), math.log((1 - self.p) / (VOCAB - 1)))
        return logits.scatter(-1, tokens.unsqueeze(-1), math.log(self.p))


def kv_for(capacity=8):
    config = ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_positions=64)
    return KVBuffers.allocate(config, 1, capacity, "cpu", torch.float32)


def run(model, draft, span_len=6, decode=DecodeSettings(confidence_threshold=0.5)):
    kv = kv_for()
    check = check_draft(model, kv, 4, span_len, draft)
    batcher = SpanBatcher(model, device="cpu", dtype=torch.float32)
    result = batcher.denoise(kv, 4, span_len, decode, start=check.start) if check.start else None
    return check, result


def test_a_draft_the_model_agrees_with_is_accepted_whole_in_one_pass():
    model = ScriptedModel([5, 6, 7, EOS_ID, PAD_ID, PAD_ID])
    check, result = run(model, [5, 6, 7])
    assert (check.outcome, check.accepted, check.proposed) == ("accepted", 4, 4)
    assert len(model.calls) == 1 and model.calls[0].shape == (2, 6)  # one pass, two rows
    assert result.tokens == (5, 6, 7) and result.ended and result.steps == 1
    # The confidence is the probability the model gave each kept token and the end.
    assert result.scored == 4 and math.isclose(result.log_confidence, 4 * math.log(0.8), rel_tol=1e-6)


def test_each_position_is_judged_while_masked_in_a_checkerboard():
    model = ScriptedModel([5, 6, 7, EOS_ID, PAD_ID, PAD_ID])
    check_draft(model, kv_for(), 4, 6, [5, 6, 7])
    rows = model.calls[0].tolist()
    assert rows[0] == [5, MASK_ID, 7, MASK_ID, PAD_ID, PAD_ID]
    assert rows[1] == [MASK_ID, 6, MASK_ID, EOS_ID, PAD_ID, PAD_ID]


def test_rejected_positions_are_refilled_from_the_checked_state():
    model = ScriptedModel([5, 6, 7, 8, EOS_ID, PAD_ID])
    check, result = run(model, [5, 6, 9, 8])
    assert (check.outcome, check.accepted) == ("repaired", 4)
    assert check.start.span == (5, 6, MASK_ID, 8, EOS_ID, PAD_ID) and check.start.steps == 1
    assert result.tokens == (5, 6, 7, 8) and result.ended and result.steps == 2
    assert len(model.calls) == 2


def test_a_rejected_end_opens_everything_after_it():
    model = ScriptedModel([5, 6, 7, EOS_ID, PAD_ID, PAD_ID])
    check, result = run(model, [5, 6])
    assert check.outcome == "repaired"
    assert check.start.span == (5, 6, MASK_ID, MASK_ID, MASK_ID, MASK_ID)
    assert result.tokens == (5, 6, 7) and result.ended


def test_a_draft_rejected_outright_leaves_nothing_to_start_from():
    model = ScriptedModel([9, 9, 9, 9, 9, 9])
    check = check_draft(model, kv_for(), 4, 6, [5, 6, 7])
    assert check.outcome == "rejected" and check.start is None and len(model.calls) == 1


def test_a_draft_longer_than_the_span_is_cut_and_has_no_end():
    assert draft_positions([5, 6, 7, 8], 3) == [5, 6, 7]
    assert draft_positions([5], 3) == [5, EOS_ID, PAD_ID]


# --- with a real (random) model -----------------------------------------------------
@pytest.fixture(scope="module")
def model():
    config = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_positions=256)
    m = SpanDenoiser(config)
    m.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    return m.eval()


@pytest.fixture(scope="module")
def kv(model):
    ids = torch.randint(6, VOCAB, (1, 30), generator=torch.Generator().manual_seed(1))
    kv = KVBuffers.allocate(model.config, 1, 64, "cpu", torch.float32)
    model.prefill(ids, kv, 0)
    return kv


def test_verdicts_equal_one_masked_half_at_a_time(model, kv):
    span_len = 16
    draft = denoise_span(model, kv, 30, span_len, DecodeSettings(confidence_threshold=0.5)).tokens[:10]
    draft = list(draft) + [7] * (10 - len(draft))
    draft[3] = 11  # something to disagree with
    check = check_draft(model, kv, 30, span_len, draft)
    laid = torch.tensor([draft_positions(draft, span_len)])
    verdict = []
    for parity in (0, 1):
        row = laid.clone()
        hidden = [i for i in range(11) if i % 2 == parity]
        row[0, hidden] = MASK_ID
        tokens, confidence = model.span_tokens(row, kv, 30)
        verdict += [(i, int(tokens[0, i]) == int(laid[0, i]), float(confidence[0, i])) for i in hidden]
    for i, agreed, p in sorted(verdict):
        assert (check.start.span[i] != MASK_ID) == agreed
        if agreed:
            assert math.isclose(check.start.committed[i], p, rel_tol=1e-4)


@pytest.mark.parametrize("decode", [DecodeSettings(confidence_threshold=0.5), DecodeSettings(steps=3)])
def test_batcher_and_sampler_go_on_alike_from_a_start(model, kv, decode):
    span = [MASK_ID] * 16
    span[0], span[1], span[5] = 12, 13, 14
    start = SpanStart(tuple(span), tuple([0.7] * 16), steps=1)
    alone = denoise_span(model, kv, 30, 16, decode, start=start)
    batched = SpanBatcher(model, device="cpu", dtype=torch.float32).denoise(kv, 30, 16, decode, start=start)
    assert alone == batched
    assert alone.tokens[:2] == (12, 13) and alone.steps >= 2
    if decode.steps:
        assert alone.steps <= decode.steps  # the scoring pass counts against the budget


def test_native_backend_reports_the_drafts_fate(parafill_tiny_model):
    backend = NativeBackend(parafill_tiny_model, "cpu")
    request = FimRequest(preamble="", prefix="def add(a, b):\n    return ", suffix="\n", span=SpanPlan("line", 16))
    decode = DecodeSettings(confidence_threshold=0.5)
    plain = backend.fill(request, decode, document="a")
    assert plain.draft is None
    # The model's own answer, offered as a draft, is judged; whatever the verdict, the text is the model's.
    drafted = backend.fill(FimRequest(**{**request.__dict__, "draft": plain.text or "a + b"}), decode, document="a")
    assert drafted.draft in ("accepted", "repaired", "rejected")
    assert drafted.confidence is not None and 0 < drafted.confidence <= 1
    if drafted.draft == "accepted":
        assert drafted.text.startswith(plain.text or "a + b")


# --- calibrated drafts: a draft the model would not write, trusted by its evidence ---------------

def test_a_calibrated_draft_is_kept_whole_and_its_confidence_is_the_rated_probability():
    from denoiser.drafts import DraftCalibration
    from fim.request import DraftEvidence

    model = ScriptedModel([9, 9, 9, 9, 9, 9], p=0.3)  # disagrees everywhere: the plain check rejects it
    calibration = DraftCalibration({"log_matched_chars": 1.0, "mean_log_prob": 1.0, "next_line": 2.0,
                                    "log_rivals": -1.0}, bias=2.0)
    kv = kv_for()
    assert check_draft(model, kv, 4, 6, [5, 6, 7]).outcome == "rejected"
    # The model gave each draft token (1 - 0.3) / 79: the rating is the logistic of the fitted sum.
    mean_log_prob = math.log(0.7 / (VOCAB - 1))
    for evidence, features in [(DraftEvidence(matched_chars=40), math.log1p(40)),
                               (DraftEvidence(matched_chars=2), math.log1p(2)),
                               (DraftEvidence(matched_chars=2, next_line=1, rivals=3), math.log1p(2) + 2 - math.log1p(3))]:
        check = check_draft(model, kv, 4, 6, [5, 6, 7], calibration=calibration, evidence=evidence)
        rated = 1 / (1 + math.exp(-(2.0 + features + mean_log_prob)))
        assert check.outcome == "accepted" and math.isclose(check.mean_log_prob, mean_log_prob, rel_tol=1e-5)
        result = SpanBatcher(model, device="cpu", dtype=torch.float32).denoise(
            kv, 4, 6, DecodeSettings(confidence_threshold=0.5), start=check.start)
        assert result.tokens == (5, 6, 7) and result.ended and result.steps == 1
        # Weak evidence: the same draft, rated low, which the default gate then hides.
        assert math.isclose(math.exp(result.log_confidence / result.scored), rated, rel_tol=1e-5)


def test_a_calibration_file_round_trips_and_unknown_features_are_refused(tmp_path):
    from denoiser.drafts import CALIBRATION_FILE, DraftCalibration

    assert DraftCalibration.load(tmp_path) is None  # no file: the plain check
    fitted = DraftCalibration({"agreement": 0.5, "log_occurrences": 1.25}, bias=-3.0, about={"examples": 10})
    fitted.save(tmp_path)
    assert DraftCalibration.load(tmp_path) == fitted
    (tmp_path / CALIBRATION_FILE).write_text('{"weights": {"vibes": 1.0}, "bias": 0}')
    with pytest.raises(ValueError, match="unknown draft features \\['vibes'\\]"):
        DraftCalibration.load(tmp_path)
