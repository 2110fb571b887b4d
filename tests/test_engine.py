"""The engine over a real tiny native backend: caches, counts, status, faults."""
import threading
import time
from dataclasses import replace

import pytest
import torch

from denoiser.autoregressive import AutoregressiveBackend
from denoiser.backend import Cancelled, DecodeSettings
from denoiser.engine import Engine, _Suggestion, percentiles, typed_ahead_remainder
from denoiser.native_backend import NativeBackend, native_context_ids, span_bucket
from fim.request import FimRequest, SpanPlan
from tools.tiny_native import make_tiny_model

PREAMBLE = "# path: demo.py\n"
PREFIX = "def add(a, b):\n    return"
SUFFIX = "\n\nprint(add(1, 2))\n"


def request(prefix=PREFIX, suffix=SUFFIX, mode="line", max_tokens=16):
    return FimRequest(PREAMBLE, prefix, suffix, SpanPlan(mode, max_tokens), language="python", path="demo.py")


class CountingBackend:
    """The real backend, with its calls counted (and a fault injectable)."""

    def __init__(self, backend, faults=()):
        self.backend = backend
        self.name, self.device, self.parameters = backend.name, backend.device, backend.parameters
        self.context_cache = backend.context_cache
        self.calls: list[FimRequest] = []
        self.faults = list(faults)

    def fill(self, request, decode, *, document, is_cancelled):
        self.calls.append(request)
        if self.faults:
            raise self.faults.pop(0)
        return self.backend.fill(request, decode, document=document, is_cancelled=is_cancelled)

    def forget(self, document):
        self.backend.forget(document)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def backend(model_dir):
    return CountingBackend(NativeBackend(model_dir, "cpu"))


def test_model_answer_then_typed_ahead_without_the_backend(backend):
    engine = Engine(backend)
    first = engine.complete(request(), document="file:///demo.py")
    assert first.source == "model" and len(backend.calls) == 1
    assert len(first.text) >= 3, "the tiny model should write something here"
    assert first.tokens > 0 and first.steps >= 1 and first.context_tokens > 0
    # The user types the first two characters of the suggestion.
    typed = engine.complete(request(PREFIX + first.text[:2]), document="file:///demo.py")
    assert (typed.source, typed.text) == ("typed_ahead", first.text[2:])
    typed = engine.complete(request(PREFIX + first.text[:3]), document="file:///demo.py")
    assert (typed.source, typed.text) == ("typed_ahead", first.text[3:])
    assert len(backend.calls) == 1
    # Typing all of it leaves nothing to suggest.
    done = engine.complete(request(PREFIX + first.text), document="file:///demo.py")
    assert (done.source, done.text) == ("typed_ahead", "")
    # Typing something else asks the model again.
    other = engine.complete(request(PREFIX + first.text + "\u00e9z"), document="file:///demo.py")
    assert other.source == "model" and len(backend.calls) == 2


def test_typed_ahead_needs_the_same_suffix_preamble_and_document(backend):
    engine = Engine(backend)
    first = engine.complete(request(), document="a")
    engine.complete(request(PREFIX + first.text[:1]), document="b")
    assert len(backend.calls) == 2  # another document has no typed-ahead state
    engine.complete(request(PREFIX + first.text[:1], suffix=SUFFIX + "x"), document="a")
    assert len(backend.calls) == 3


def test_typed_ahead_remainder_rules():
    last = _Suggestion(request(), "(a + b)")
    assert typed_ahead_remainder(last, request(PREFIX + " (a")) is None  # " " is not the suggestion's start
    assert typed_ahead_remainder(last, request(PREFIX + "(a")) == " + b)"
    assert typed_ahead_remainder(last, request(PREFIX)) is None  # nothing typed: not typed-ahead
    assert typed_ahead_remainder(last, request("x" + PREFIX + "(")) is None


def test_completion_cache_keyed_by_context_and_decode_settings(backend):
    engine = Engine(backend)
    first = engine.complete(request(), document="a")
    again = engine.complete(request(), document="b")
    assert again.source == "completion_cache" and again.text == first.text and len(backend.calls) == 1
    assert again.tokens == first.tokens and again.steps == first.steps
    engine.complete(request(), DecodeSettings(steps=2), document="b")
    assert len(backend.calls) == 2
    engine.complete(request(mode="block"), document="b")
    assert len(backend.calls) == 3


def test_completion_cache_expires(backend):
    engine = Engine(backend, cache_ttl_s=0.0001)
    engine.complete(request(), document="a")
    time.sleep(0.01)
    assert engine.complete(request(), document="b").source == "model"


def test_status_reports_model_latency_and_hit_rates(backend):
    engine = Engine(backend)
    first = engine.complete(request(), document="a")
    engine.complete(request(), document="b")
    engine.complete(request(PREFIX + first.text[:1]), document="a")
    grown = engine.complete(request(PREFIX + " a +"), document="a")  # same document, prefix grew: K/V reuse
    assert grown.source == "model" and grown.reused_context_tokens >= grown.context_tokens - 5
    status = engine.status()
    assert status["model"] == backend.name and status["device"] == "cpu"
    assert status["parameters"] == sum(p.numel() for p in backend.backend.model.parameters())
    assert status["requests"] == 4
    assert status["answered"] == {"model": 2, "completion_cache": 1, "typed_ahead": 1}
    assert status["hit_rates"]["typed_ahead"] == 0.25 and status["hit_rates"]["completion_cache"] == 0.25
    reuse = grown.reused_context_tokens / (first.context_tokens + grown.context_tokens)
    assert status["hit_rates"]["context_kv_reuse"] == round(reuse, 4)
    lat = status["latency_ms"]
    assert 0 <= lat["p50"] <= lat["p90"] <= lat["p99"]
    assert status["errors"] == 0 and status["fallbacks"] == 0 and status["cancelled"] == 0


def test_percentiles_nearest_rank():
    assert percentiles(range(1, 101)) == {"p50": 50, "p90": 90, "p99": 99}
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}
    assert percentiles([7.0]) == {"p50": 7.0, "p90": 7.0, "p99": 7.0}


def test_forget_drops_context_kv_and_typed_ahead(backend):
    engine = Engine(backend)
    first = engine.complete(request(), document="a")
    assert "a" in backend.context_cache
    engine.forget("a")
    assert "a" not in backend.context_cache
    after = engine.complete(request(PREFIX + first.text[:1]), document="a")
    assert after.source == "model" and after.reused_context_tokens == 0


def test_cancelled_requests_raise_and_are_counted(backend):
    engine = Engine(backend)
    with pytest.raises(Cancelled):
        engine.complete(request(), document="a", is_cancelled=lambda: True)
    assert backend.calls == []
    calls = {"n": 0}

    def cancel_after_one_step():
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(Cancelled):
        engine.complete(request(), DecodeSettings(confidence_threshold=1.0), document="a", is_cancelled=cancel_after_one_step)
    assert len(backend.calls) == 1
    assert engine.status()["cancelled"] == 2
    # A cancelled request leaves nothing in the completion cache.
    assert engine.complete(request(), DecodeSettings(confidence_threshold=1.0), document="a").source == "model"


def test_out_of_memory_falls_back_to_a_smaller_span(model_dir):
    backend = CountingBackend(NativeBackend(model_dir, "cpu"), faults=[torch.cuda.OutOfMemoryError("CUDA out of memory")])
    engine = Engine(backend)
    result = engine.complete(request(max_tokens=64), document="a")
    assert result.source == "model"
    assert [r.span.max_tokens for r in backend.calls] == [64, 32]
    status = engine.status()
    assert status["fallbacks"] == 1 and status["errors"] == 1 and "out of memory" in status["last_error"]


def test_other_errors_are_counted_and_raised(model_dir):
    backend = CountingBackend(NativeBackend(model_dir, "cpu"), faults=[ValueError("bad input")])
    engine = Engine(backend)
    with pytest.raises(ValueError):
        engine.complete(request(), document="a")
    assert engine.status()["errors"] == 1 and engine.status()["fallbacks"] == 0


def test_concurrent_callers_get_the_serial_answers(model_dir):
    engine = Engine(NativeBackend(model_dir, "cpu"))
    prefixes = [PREFIX + s for s in ("", " a", " b", " a +")]
    serial = {p: engine.complete(request(p), document=p).text for p in prefixes}
    parallel_engine = Engine(NativeBackend(model_dir, "cpu"))
    results: dict[str, str] = {}

    def work(p):
        results[p] = parallel_engine.complete(request(p), document="shared").text

    threads = [threading.Thread(target=work, args=(p,)) for p in prefixes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == serial


def test_engine_load_from_a_directory(model_dir):
    seen = []
    engine = Engine.load(model_dir, device="cpu", progress=lambda message, percent: seen.append(percent))
    assert seen[-1] == 100 and seen == sorted(seen)
    assert engine.complete(request(), document="a").source == "model"


def favour_token(native, text):
    """Make the tiny model write `text`'s token everywhere, never <eos> (tied head: a huge embedding row)."""
    (token,) = native.tokenizer.encode(text)
    with torch.no_grad():
        native.model.embed.weight[token] = native.model.final_norm(native.model.embed.weight.sum(0)) * 50
    return token


@pytest.mark.parametrize(
    ("mode", "text", "grows"), [("block", "x", True), ("line", "x", True), ("block", "\n", True), ("line", "\n", False)]
)
def test_span_grows_once_when_it_fills_without_eos(model_dir, mode, text, grows):
    native = NativeBackend(model_dir, "cpu")
    token = favour_token(native, text)
    req = request(mode=mode, max_tokens=16)
    result = native.fill(req, DecodeSettings(), document="a")
    ids = native_context_ids(native.tokenizer, req, native.max_context_tokens)
    assert result.context_tokens == len(ids)
    length = 32 if grows else 16
    assert result.tokens == length and result.text == text * length
    # Growing made the first span part of the cached context; a second growth never happens.
    assert native.context_cache.cached_ids("a") == ids + ([token] * 16 if grows else [])


def test_autoregressive_baseline_uses_the_same_prompt(backend):
    ar = AutoregressiveBackend(backend.backend)
    result = ar.fill(request(), DecodeSettings(), document="a")
    ids = native_context_ids(backend.backend.tokenizer, request(), backend.backend.max_context_tokens)
    assert result.context_tokens == len(ids)
    assert result.tokens <= span_bucket(16) and result.steps >= result.tokens
    # Again for the same document: the context K/V is reused (all but the last token, whose state it needs).
    assert ar.fill(request(), DecodeSettings(), document="a") == replace(result, reused_context_tokens=len(ids) - 1)


def test_a_shortened_fallback_answer_is_not_cached(model_dir):
    backend = CountingBackend(NativeBackend(model_dir, "cpu"), faults=[torch.cuda.OutOfMemoryError("CUDA out of memory")])
    engine = Engine(backend)
    assert engine.complete(request(max_tokens=64), document="a").source == "model"
    # The fault is over: the same request runs the model again at its full span.
    engine.forget("a")  # no typed-ahead either
    assert engine.complete(request(max_tokens=64), document="a").source == "model"
    assert [r.span.max_tokens for r in backend.calls] == [64, 32, 64]


def test_a_fault_after_another_request_moved_the_model_runs_again_there(model_dir):
    # Two requests share a GPU batch; the first to recover moves the model to the CPU.
    # The second must simply run again on the new backend: no halved span, no second move.
    moved = CountingBackend(NativeBackend(model_dir, "cpu"))
    engine = Engine(moved)

    class GpuBackend(CountingBackend):
        concurrent_fill = True

        def fill(self, request, decode, *, document, is_cancelled):
            self.calls.append(request)
            engine.backend = moved  # another thread's recovery happened meanwhile
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    gpu = GpuBackend(NativeBackend(model_dir, "cpu"))
    engine.backend = gpu
    result = engine.complete(request(max_tokens=32), document="a")
    assert result.source == "model"
    assert [r.span.max_tokens for r in gpu.calls] == [32] and [r.span.max_tokens for r in moved.calls] == [32]
    assert engine.backend is moved and engine.status()["fallbacks"] == 1


def test_a_request_cancelled_while_waiting_for_its_document_never_prefills(model_dir):
    native = NativeBackend(model_dir, "cpu")
    with pytest.raises(Cancelled):
        native.fill(request(), DecodeSettings(), document="closed", is_cancelled=lambda: True)
    assert "closed" not in native.context_cache


def test_releasing_device_memory_waits_for_a_prefill_in_progress(model_dir):
    native = NativeBackend(model_dir, "cpu")
    native.fill(request(), DecodeSettings(steps=2), document="a")
    released = threading.Event()
    with native._cache_lock:  # stands for another thread's prefill
        worker = threading.Thread(target=lambda: (native.release_device_memory(), released.set()))
        worker.start()
        assert not released.wait(0.2) and "a" in native.context_cache
    worker.join(timeout=10)
    assert released.is_set() and "a" not in native.context_cache


def test_cpu_threads_take_half_the_cores_unless_told(monkeypatch):
    from denoiser.native_backend import configure_cpu_threads, cpu_threads_for

    assert [cpu_threads_for(n) for n in (1, 2, 3, 4, 8, 16, 64)] == [1, 1, 1, 2, 4, 8, 8]
    # Never more threads than the cores other running tasks leave idle, and always one.
    assert [cpu_threads_for(8, busy) for busy in (0, 2, 4, 5, 7, 8, 30)] == [4, 4, 4, 3, 1, 1, 1]
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    monkeypatch.setattr("denoiser.native_backend.busy_tasks", lambda: 0)
    try:
        configure_cpu_threads()
        assert torch.get_num_threads() == 2
        configure_cpu_threads(3)  # the threads setting
        assert torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        configure_cpu_threads()  # the user's environment stands over the automatic choice
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr("denoiser.native_backend.busy_tasks", lambda: 3)
        configure_cpu_threads()  # a job busy on three of the four cores
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_busy_tasks_counts_the_others_running_now():
    from denoiser.native_backend import busy_tasks

    assert isinstance(busy_tasks(), int) and busy_tasks() >= 0


def test_an_automatic_fill_chooses_its_threads_for_the_load_it_meets(model_dir, monkeypatch):
    native = NativeBackend(model_dir, "cpu")
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    seen = []
    real_denoise = native.batcher.denoise

    def denoise(*args, **kwargs):  # the step runs on the filling thread, with its thread count
        seen.append(torch.get_num_threads())
        return real_denoise(*args, **kwargs)

    monkeypatch.setattr(native.batcher, "denoise", denoise)
    try:
        for busy in (0, 3):
            monkeypatch.setattr("denoiser.native_backend.busy_tasks", lambda busy=busy: busy)
            native.fill(request(PREFIX), DecodeSettings(steps=1), document="a")
            assert native.cpu_threads == seen[-1]
        assert seen[0] == 2 and seen[-1] == 1  # idle: half the 4 cores; beside a 3-core job: one
        native.set_cpu_threads(2)  # the threads setting stands whatever the load
        native.fill(request(PREFIX + " b"), DecodeSettings(steps=1), document="a")
        assert seen[-1] == 2
    finally:
        native.set_cpu_threads(0)
        torch.set_num_threads(before)


def test_suggestions_the_model_doubts_are_not_shown(model_dir):
    from lsp_server.settings import Settings
    from lsp_server.suggest import suggest

    engine = Engine(NativeBackend(model_dir, "cpu"))
    text = PREFIX + "\n" + SUFFIX
    line, character = 1, len("    return")
    shown = suggest(engine, text, line, character, document="a", settings=Settings(steps=4, latency_budget_ms=0, min_confidence=0.0))
    assert shown.confidence is not None and 0 < shown.confidence < 1  # random weights: unsure
    assert shown.text is not None, "the tiny model writes something here, or the check below proves little"
    doubted = suggest(engine, text, line, character, document="b",
                      settings=Settings(steps=4, latency_budget_ms=0, min_confidence=min(1.0, shown.confidence * 1.5)))
    assert doubted.text is None and doubted.raw == shown.raw and doubted.confidence == pytest.approx(shown.confidence)


def test_typed_ahead_keeps_the_confidence_of_the_fill_it_continues(model_dir):
    from lsp_server.settings import Settings
    from lsp_server.suggest import suggest

    engine = Engine(NativeBackend(model_dir, "cpu"))
    text = PREFIX + "\n" + SUFFIX
    line, character = 1, len("    return")
    first = suggest(engine, text, line, character, document="a", settings=Settings(steps=4, latency_budget_ms=0, min_confidence=0.0))
    assert first.text and first.confidence is not None
    typed = first.text[0]
    doubtful = Settings(steps=4, latency_budget_ms=0, min_confidence=min(1.0, first.confidence * 1.5))
    text_typed = PREFIX + typed + "\n" + SUFFIX
    after = suggest(engine, text_typed, line, character + 1, document="a", settings=doubtful)
    assert after.source == "typed_ahead" and after.confidence == pytest.approx(first.confidence)
    assert after.text is None, "a doubted suggestion must not come back through typed-ahead"
