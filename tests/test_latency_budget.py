"""The latency budget: past its deadline denoising stops between steps and keeps the
tokens before the first still-masked position (never a hole), in the reference
sampler, the batched path and the native backend; such an answer is counted, not
cached, never grown, and gated on the confidence of what it returns. Also the
`threads` setting reaching the backend. Behaviour only: a deadline already past
stands for a budget spent, so no assertion here depends on timing."""
import math
import threading
from dataclasses import replace

import pytest
import torch

from denoiser.backend import DecodeSettings
from denoiser.batching import SpanBatcher
from denoiser.config import EOS_ID, MASK_ID, PAD_ID
from denoiser.engine import Engine
from denoiser.native_backend import NativeBackend
from denoiser.sampler import denoise_span
from fim.request import FimRequest, SpanPlan
from lsp_server.settings import DEFAULT_LATENCY_BUDGET_MS, Settings, latency_budget_ms, parse_settings
from lsp_server.suggest import decode_settings, suggest
from tests.test_batching import CASES, context, make_model
from tools.tiny_native import make_tiny_model

SPENT = 0.0  # a deadline every clock has passed: the budget is spent before the first step ends


def spent(decode: DecodeSettings) -> DecodeSettings:
    return DecodeSettings(steps=decode.steps, confidence_threshold=decode.confidence_threshold, deadline=SPENT)


def assert_hole_free_start_of(cut, full):
    assert MASK_ID not in cut.tokens and EOS_ID not in cut.tokens and PAD_ID not in cut.tokens
    # Committed tokens never change, so what the cut run kept starts the full answer.
    assert tuple(full.tokens[:len(cut.tokens)]) == cut.tokens
    assert cut.scored == len(cut.tokens)  # its confidence covers what it returns, nothing more


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def contexts(model):
    return [context(model, n, seed) for seed, (n, _, _) in enumerate(CASES)]


def test_the_reference_sampler_stops_after_one_step_with_a_hole_free_prefix(model, contexts):
    cut_any = False
    for kv, (n, span_len, decode) in zip(contexts, CASES):
        full = denoise_span(model, kv, n, span_len, decode)
        cut = denoise_span(model, kv, n, span_len, spent(decode))
        assert cut.steps == 1
        if cut.ended:  # finished in its one step: a whole answer, not a cut one
            assert not cut.cut and cut == full
            continue
        cut_any = True
        assert cut.cut
        assert_hole_free_start_of(cut, full)
    assert cut_any


def test_the_batched_path_cuts_like_the_reference_alone_and_together(model, contexts):
    reference = [denoise_span(model, kv, n, span_len, spent(decode))
                 for kv, (n, span_len, decode) in zip(contexts, CASES)]
    alone = SpanBatcher(model, device="cpu", dtype=torch.float32)
    for kv, (n, span_len, decode), expected in zip(contexts, CASES, reference):
        got = alone.denoise(kv, n, span_len, spent(decode))
        assert (got.tokens, got.steps, got.ended, got.cut) == (expected.tokens, 1, expected.ended, expected.cut)
    assert alone.stats()["budget_cuts"] == sum(r.cut for r in reference)

    together = SpanBatcher(model, device="cpu", dtype=torch.float32)
    results: dict[int, object] = {}
    start = threading.Barrier(len(CASES))

    def run(i):
        kv, (n, span_len, decode) = contexts[i], CASES[i]
        start.wait()
        results[i] = together.denoise(kv, n, span_len, spent(decode))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(CASES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i, expected in enumerate(reference):
        got = results[i]
        assert got.cut == expected.cut and got.steps == 1 and MASK_ID not in got.tokens
        assert got.tokens == expected.tokens


def test_a_live_budget_changes_nothing(model, contexts):
    far = 1e18  # a deadline no run reaches
    for kv, (n, span_len, decode) in zip(contexts, CASES):
        budgeted = DecodeSettings(steps=decode.steps, confidence_threshold=decode.confidence_threshold, deadline=far)
        assert denoise_span(model, kv, n, span_len, budgeted) == denoise_span(model, kv, n, span_len, decode)


# --- the native backend and the engine ------------------------------------------------------
PREAMBLE = "# path: demo.py\n"


def request(prefix="def add(a, b):\n    return", mode="block", max_tokens=16):
    return FimRequest(PREAMBLE, prefix, "\n\nprint(add(1, 2))\n", SpanPlan(mode, max_tokens),
                      language="python", path="demo.py")


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    return NativeBackend(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model"), "cpu")


def test_a_spent_budget_gives_one_step_no_growth_and_no_cache(native):
    engine = Engine(native)
    cut = engine.complete(request(), DecodeSettings(steps=8, deadline=SPENT), document="a")
    full_fill = native.fill(request(), DecodeSettings(steps=8), document="b")
    # A block span that fills up grows once; a cut one stops at its first step, grown or not.
    assert cut.steps == 1 and cut.budget_cut and cut.source == "model"
    assert full_fill.steps >= 1 and not full_fill.budget_cut
    assert full_fill.text.startswith(cut.text)
    if cut.confidence is not None:
        assert 0.0 < cut.confidence <= 1.0
    engine.forget("a")
    again = engine.complete(request(), DecodeSettings(steps=8, deadline=SPENT), document="a")
    assert again.source == "model", "a budget-cut answer must not be served from the completion cache"
    status = engine.status()
    assert status["budget_cuts"] == 2 and status["caches"]["completion_cache"]["entries"] == 0
    whole = engine.complete(request(), DecodeSettings(steps=8), document="c")
    assert not whole.budget_cut and whole.text == full_fill.text
    assert engine.complete(request(), DecodeSettings(steps=8), document="d").source == "completion_cache"


def test_the_threads_setting_reaches_every_fill_thread(native):
    before = torch.get_num_threads()
    seen = []
    go, done = threading.Event(), threading.Event()

    def fill_on_an_older_thread():
        torch.set_num_threads(1)
        go.wait(timeout=30)
        native.fill(request(max_tokens=8, mode="line"), DecodeSettings(steps=2), document="threads")
        seen.append(torch.get_num_threads())
        done.set()

    worker = threading.Thread(target=fill_on_an_older_thread)
    worker.start()
    try:
        engine = Engine(native)
        engine.set_threads(2)
        assert engine.status()["threads"] == 2
        go.set()
        worker.join(timeout=60)
        assert seen == [2]  # torch keeps threads per thread: the fill itself applies the setting
    finally:
        native.set_cpu_threads(0)
        torch.set_num_threads(before)


# --- settings and the suggestion path ---------------------------------------------------------
def test_the_budget_setting_defaults_per_device_and_zero_means_none():
    assert latency_budget_ms(Settings(), "cpu") == DEFAULT_LATENCY_BUDGET_MS["cpu"]
    assert latency_budget_ms(Settings(), "cuda:0") == DEFAULT_LATENCY_BUDGET_MS["cuda"]
    assert DEFAULT_LATENCY_BUDGET_MS["cuda"] < DEFAULT_LATENCY_BUDGET_MS["cpu"]
    zero, problems = parse_settings({"latencyBudgetMs": 0, "threads": 3})
    assert problems == [] and zero.threads == 3
    assert latency_budget_ms(zero, "cuda") == 0
    assert decode_settings(zero, "cpu").deadline is None
    assert decode_settings(Settings(latency_budget_ms=100), "cpu", budget_started=5.0).deadline == pytest.approx(5.1)
    back, _ = parse_settings({"latencyBudgetMs": None}, zero)
    assert back.latency_budget_ms is None
    for bad in (-1, 1.5, "fast", True):
        kept, problems = parse_settings({"latencyBudgetMs": bad}, zero)
        assert kept.latency_budget_ms == 0 and len(problems) == 1 and "latencyBudgetMs" in problems[0]
    kept, problems = parse_settings({"threads": -2}, zero)
    assert kept.threads == 3 and "threads" in problems[0]


def test_a_cut_suggestion_is_gated_on_the_confidence_of_what_it_returns(native):
    text = "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n"
    settings = Settings(latency_budget_ms=1, min_confidence=0.0, span_tokens_block=16, span_tokens_line=16, steps=8)
    shown = suggest(Engine(native), text, 1, 10, document="g1", settings=settings, budget_started=SPENT)
    assert shown.budget_cut and shown.steps == 1
    if shown.confidence is not None:
        assert math.isfinite(shown.confidence)
        fussy = replace(settings, min_confidence=min(1.0, shown.confidence + 1e-6))
        hidden = suggest(Engine(native), text, 1, 10, document="g2", settings=fussy, budget_started=SPENT)
        assert hidden.text is None and hidden.dropped in ("unsure", "empty", "postprocess")
