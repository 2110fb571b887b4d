"""Drafts for the open families: each draft position judged while masked (a checkerboard of
two rows in one exact pass), agreed ones kept, the rest refilled by the usual steps."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from denoiser.backend import DecodeSettings
from denoiser.drafts import checkerboard, draft_positions
from denoiser.open_models import load_open_model
from denoiser.open_models.span_decoder import SpanDecoder, SpanDecodeSettings
from fim.request import FimRequest, SpanPlan
from tools.tiny_open import make_tiny_checkpoint

MASK, END, VOCAB = 1, 0, 40
HEAD, TAIL = [30, 31, 32], [33, 34]


class ScriptedModel:
    """Predicts `target[i]` at span position i with a clear margin, whatever it sees; records its inputs."""

    device = torch.device("cpu")

    def __init__(self, target: list[int], shift: int = 0):
        self.target, self.shift, self.calls = target, shift, []

    def full(self, ids, rows=None, kv=None):
        self.calls.append(ids.clone())
        span_position = rows + self.shift - len(HEAD)
        logits = torch.zeros(*ids.shape[:-1], len(rows), VOCAB)
        picked = torch.tensor([self.target[min(int(p), len(self.target) - 1)] for p in span_position])
        logits[..., torch.arange(len(rows)), picked] = 8.0
        return logits


def decode(model, draft=None, *, initial=6, maximum=6, steps=0, shift=False):
    decoder = SpanDecoder(model, mask_id=MASK, stop_ids=frozenset({END}), shift_logits=shift)
    settings = SpanDecodeSettings(initial=initial, maximum=maximum, grow_by=4, threshold=0.9, steps=steps,
                                  cache_mode="none")
    return decoder.decode(HEAD, TAIL, settings, draft=draft)


@pytest.mark.parametrize("shift", [False, True])
def test_a_draft_the_model_agrees_with_is_accepted_whole_in_one_pass(shift):
    model = ScriptedModel([5, 6, 7, END, END, END], shift=int(shift))
    result = decode(model, [5, 6, 7], shift=shift)
    assert (result.draft, result.tokens, result.steps, result.full_passes) == ("accepted", [5, 6, 7], 1, 1)
    assert len(model.calls) == 1 and model.calls[0].shape == (2, len(HEAD) + 6 + len(TAIL))


def test_each_position_is_judged_while_masked_in_a_checkerboard():
    model = ScriptedModel([5, 6, 7, END, END, END])
    decode(model, [5, 6, 7])
    rows = model.calls[0][:, len(HEAD):len(HEAD) + 6].tolist()
    assert rows == [[5, MASK, 7, MASK, END, END], [MASK, 6, MASK, END, END, END]]
    assert model.calls[0][:, :len(HEAD)].tolist() == [HEAD, HEAD]


def test_rejected_positions_are_refilled_by_the_usual_steps():
    model = ScriptedModel([5, 6, 7, 8, END, END])
    result = decode(model, [5, 6, 9, 8])
    assert (result.draft, result.tokens, result.steps) == ("repaired", [5, 6, 7, 8], 2)
    # The second pass sees the kept positions and only the rejected one masked.
    assert model.calls[1][len(HEAD):len(HEAD) + 6].tolist() == [5, 6, MASK, 8, END, END]


def test_a_draft_rejected_outright_costs_one_pass_and_changes_nothing():
    target = [5, 6, 7, END, END, END]
    plain = decode(ScriptedModel(target))
    rejected = decode(ScriptedModel(target), [9, 9, 9, 9, 9, 9, 9, 9])  # longer than the span: laid cut
    assert rejected.draft == "rejected" and plain.draft is None
    assert rejected.tokens == plain.tokens and rejected.steps == plain.steps + 1


def test_the_scoring_pass_counts_against_the_step_budget():
    model = ScriptedModel([5, 6, 7, 8, 9, 10])
    result = decode(model, [5, 20, 21, 22, 23, 24], steps=2)
    assert result.draft == "repaired" and result.steps == 2 and result.tokens == [5, 6, 7, 8, 9, 10]


# --- the tiny random checkpoints of each family -------------------------------------------------
@pytest.fixture(scope="module", params=["dream", "llada", "open-dcoder"])
def backend(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    make_tiny_checkpoint(d, request.param, seed=1)
    return load_open_model(d, "cpu", initial_span=8)


REQUEST = FimRequest(preamble="", prefix="def add(a, b):\n    return ", suffix="\n", span=SpanPlan("line", 12))
DECODE = DecodeSettings(confidence_threshold=0.5)


def fill(backend, draft=""):
    return backend.fill(replace(REQUEST, draft=draft), DECODE, document="d", is_cancelled=lambda: False)


def test_a_garbage_draft_is_rejected_and_the_text_is_the_one_without_it(backend):
    plain = fill(backend)
    drafted = fill(backend, "zq~~#!`")
    assert plain.draft is None and drafted.draft == "rejected"
    assert drafted.text == plain.text and drafted.steps == plain.steps + 1


def test_the_two_row_pass_judges_like_one_masked_half_at_a_time(backend):
    decoder = backend.decoder
    head, tail = backend.layout(REQUEST, 12)
    plain = fill(backend)
    draft = backend.tokenizer.encode(plain.text or "a + b")[:7]
    check = decoder.check_draft(head, tail, draft, 10)
    laid = torch.tensor(draft_positions(draft, 10, end_id=decoder.end_id, pad_id=decoder.end_id))
    proposed = len(draft) + 1
    rows = checkerboard(laid, proposed, decoder.mask_id)
    kept = {}
    for parity, row in ((1, rows[0]), (0, rows[1])):
        seq = torch.tensor(head + row.tolist() + tail)
        logits = decoder._span_logits(seq, len(head), 10, None, True)
        for i in range(parity, proposed, 2):
            kept[i] = int(logits[i].argmax()) == int(laid[i])
    assert check.proposed == proposed and check.accepted == sum(kept.values())
    if check.start is not None:
        assert all((check.start.span[i] != decoder.mask_id) == kept[i] for i in range(proposed - 1))
