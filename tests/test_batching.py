"""Dynamic batching: shared steps give the unbatched answers, cancelled requests leave,
the device-side step rules equal the sampler's, and (on CUDA) the graphed step equals
the eager one."""
import threading
import time

import pytest
import torch

from denoiser.backend import Cancelled, DecodeSettings
from denoiser.batching import SpanBatcher, StepState, apply_commits, span_status
from denoiser.config import EOS_ID, MASK_ID, PAD_ID, ModelConfig
from denoiser.model import KVBuffers, SpanDenoiser
from denoiser.native_backend import NativeBackend
from denoiser.sampler import choose_commits, commit_count, denoise_span, finished_at, pad_after_first_end
from denoiser.step_graph import batch_bucket
from fim.request import FimRequest, SpanPlan

VOCAB = 80


def make_model(device="cpu", dtype=torch.float32):
    config = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_positions=512)
    model = SpanDenoiser(config)
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)  # sharp random weights: varied tokens, confident steps, some <eos>
    return model.to(device=device, dtype=dtype).eval()


def context(model, length, seed, capacity=128):
    ids = torch.randint(6, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))
    kv = KVBuffers.allocate(model.config, 1, capacity, model.embed.weight.device, model.embed.weight.dtype)
    model.prefill(ids.to(kv.k.device), kv, 0)
    return kv


# (context length, span length, decode settings): mixed lengths, buckets, thresholds and step caps.
CASES = [
    (24, 32, DecodeSettings(confidence_threshold=0.5)),
    (40, 32, DecodeSettings(confidence_threshold=0.9)),
    (17, 32, DecodeSettings(steps=4, confidence_threshold=0.9)),
    (60, 16, DecodeSettings(confidence_threshold=1.0)),
    (33, 32, DecodeSettings(steps=8, confidence_threshold=0.3)),
]


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def contexts(model):
    return [context(model, n, seed) for seed, (n, _, _) in enumerate(CASES)]


@pytest.fixture(scope="module")
def unbatched(model, contexts):
    return [denoise_span(model, kv, n, span, decode, vocab_limit=VOCAB - 3)
            for kv, (n, span, decode) in zip(contexts, CASES)]


def test_cases_are_not_trivial(unbatched):
    # Equality below proves little if every span were the same junk.
    assert len({r.tokens for r in unbatched}) == len(unbatched)
    assert any(r.ended for r in unbatched) and len({r.steps for r in unbatched}) > 2


def run_together(batcher, contexts, cases, cancel_after=None):
    """Submit every case from its own thread; case 0 waits until the others are queued,
    so they all share steps. cancel_after: {case: number of is_cancelled calls before True}."""
    results, errors = {}, {}
    others = len(cases) - 1
    driving = threading.Event()

    def gate():
        if not driving.is_set():  # the first step waits for the others to queue up
            driving.set()
            deadline = time.monotonic() + 10
            while batcher.pending < others and time.monotonic() < deadline:
                time.sleep(0.001)
        return False

    def counter(limit):
        calls = [0]

        def is_cancelled():
            calls[0] += 1
            return calls[0] > limit

        return is_cancelled

    def work(i):
        (n, span, decode), kv = cases[i], contexts[i]
        if i == 0:
            check = gate
        elif cancel_after and i in cancel_after:
            check = counter(cancel_after[i])
        else:
            check = lambda: False  # noqa: E731
        try:
            results[i] = batcher.denoise(kv, n, span, decode, check)
        except Cancelled as exc:
            errors[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    threads[0].start()
    assert driving.wait(timeout=10)  # case 0 is driving (held in its gate) before the others arrive
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results, errors


def test_alone_equals_the_sampler_and_shares_nothing(model, contexts, unbatched):
    batcher = SpanBatcher(model, device="cpu", dtype=torch.float32, vocab_limit=VOCAB - 3)
    alone = [batcher.denoise(kv, n, span, decode) for kv, (n, span, decode) in zip(contexts, CASES)]
    assert alone == unbatched
    stats = batcher.stats()
    assert stats["shared_steps"] == 0 and stats["max_batch"] == 1
    assert stats["request_steps"] == stats["steps"] == sum(r.steps for r in unbatched)


def test_concurrent_requests_share_steps_and_get_the_unbatched_answers(model, contexts, unbatched):
    batcher = SpanBatcher(model, device="cpu", dtype=torch.float32, vocab_limit=VOCAB - 3)
    results, errors = run_together(batcher, contexts, CASES)
    assert not errors
    assert [results[i] for i in range(len(CASES))] == unbatched
    # The model's certainty of each span is the same, to float rounding of a batched forward.
    for i, alone in enumerate(unbatched):
        assert results[i].scored == alone.scored > 0
        assert results[i].log_confidence == pytest.approx(alone.log_confidence, rel=1e-4, abs=1e-4)
    stats = batcher.stats()
    # Every request's steps were run, but fewer driver steps than requests x steps.
    assert stats["request_steps"] == sum(r.steps for r in unbatched)
    assert stats["max_batch"] == len(CASES)
    assert stats["shared_steps"] >= min(r.steps for r in unbatched)
    assert stats["steps"] < stats["request_steps"]
    # Two span buckets (16 and 32) run as separate forwards inside one step.
    assert stats["forwards"] > stats["steps"]


def test_a_cancelled_request_leaves_at_the_next_step_while_the_others_finish(model, contexts, unbatched):
    batcher = SpanBatcher(model, device="cpu", dtype=torch.float32, vocab_limit=VOCAB - 3)
    # Case 1 holds an early row: its leaving moves the last row's context into its place.
    results, errors = run_together(batcher, contexts, CASES, cancel_after={1: 2})
    assert set(errors) == {1}
    assert {i: results[i] for i in results} == {i: unbatched[i] for i in range(len(CASES)) if i != 1}
    stats = batcher.stats()
    assert stats["cancelled"] == 1
    # Case 1 was stepped exactly twice (its third check said cancelled), the rest to the end.
    assert stats["request_steps"] == 2 + sum(r.steps for i, r in enumerate(unbatched) if i != 1)


def test_max_batch_limits_a_step_and_the_rest_wait(model, contexts, unbatched):
    batcher = SpanBatcher(model, device="cpu", dtype=torch.float32, vocab_limit=VOCAB - 3, max_batch=2)
    results, errors = run_together(batcher, contexts, CASES)
    assert not errors and [results[i] for i in range(len(CASES))] == unbatched
    assert batcher.stats()["max_batch"] == 2


def random_step_inputs(seed, rows=6, length=16):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 12, (rows, length), generator=g)
    # Coarse confidences make ties common (ties must go to the lowest position).
    confidence = torch.randint(0, 5, (rows, length), generator=g).float() / 4
    masked = torch.rand(rows, length, generator=g) < 0.7
    span = torch.where(masked, torch.full_like(tokens, MASK_ID), torch.randint(0, 12, (rows, length), generator=g))
    steps = torch.randint(0, 6, (rows,), generator=g)
    max_steps = torch.randint(0, 8, (rows,), generator=g)
    threshold = torch.tensor([0.3, 0.5, 0.75, 0.9, 1.0, 0.6])[:rows]
    return tokens, confidence, span, masked, steps, max_steps, threshold


@pytest.mark.parametrize("seed", range(20))
def test_device_step_rules_equal_the_sampler(seed):
    tokens, confidence, span, masked, steps, max_steps, threshold = random_step_inputs(seed)
    state = StepState(span.clone(), masked.clone(), steps.clone(), torch.ones(len(span), dtype=torch.bool),
                      threshold, max_steps, 0)
    apply_commits(tokens, confidence, state)
    done, ended, first = span_status(state.span, state.masked)
    for r in range(len(span)):
        at_least = commit_count(int(masked[r].sum()), int(steps[r]), int(max_steps[r]))
        commit = choose_commits(confidence[r], masked[r].clone(), float(threshold[r]), at_least)
        want_span = torch.where(commit, tokens[r], span[r])
        want_masked = masked[r] & ~commit
        pad_after_first_end(want_span, want_masked)
        assert torch.equal(state.span[r], want_span) and torch.equal(state.masked[r], want_masked)
        assert int(state.steps[r]) == int(steps[r]) + 1
        end = finished_at(want_span, want_masked)
        assert bool(ended[r]) == (end is not None)
        assert bool(done[r]) == (end is not None or not bool(want_masked.any()))
        if end is not None:
            assert int(first[r]) == end


def test_finished_rows_stay_put_when_not_live():
    span = torch.tensor([[5, EOS_ID, MASK_ID, MASK_ID], [7, 8, PAD_ID, MASK_ID]])
    masked = span == MASK_ID
    state = StepState(span.clone(), masked.clone(), torch.tensor([3, 2]), torch.tensor([False, True]),
                      torch.tensor([0.0, 0.0]), torch.tensor([0, 0]), 0)
    apply_commits(torch.full((2, 4), 9), torch.ones(2, 4), state)
    assert torch.equal(state.span[0], span[0]) and int(state.steps[0]) == 3
    assert state.span[1].tolist() == [7, 8, PAD_ID, 9] and int(state.steps[1]) == 3
    done, ended, first = span_status(state.span, state.masked)
    assert done.tolist() == [True, True] and ended.tolist() == [True, True] and first.tolist() == [1, 2]


def test_batch_bucket():
    assert [batch_bucket(n, 16) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert batch_bucket(5, 6) == 6 and batch_bucket(7, 4) == 7


def test_native_backend_concurrent_documents_equal_serial(parafill_tiny_model):
    def req(prefix):
        return FimRequest("# demo.py\n", prefix, "\n\nprint(1)\n", SpanPlan("line", 16), language="python",
                          path="demo.py")

    prefixes = ["def add(a, b):\n    return", "class Counter:\n    def", "import os\nfor x in", "const items ="]
    serial_backend = NativeBackend(parafill_tiny_model, "cpu")
    serial = [serial_backend.fill(req(p), DecodeSettings(), document=f"doc{i}") for i, p in enumerate(prefixes)]
    backend = NativeBackend(parafill_tiny_model, "cpu", max_documents=2)  # eviction while others run
    results = {}

    def work(i):
        results[i] = backend.fill(req(prefixes[i]), DecodeSettings(), document=f"doc{i}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prefixes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [results[i].text for i in range(len(prefixes))] == [r.text for r in serial]
    assert backend.batching_stats()["requests"] >= len(prefixes)


@pytest.mark.parametrize("turns", [False, True])
def test_taking_turns_holds_a_prefill_until_the_running_step_ends(parafill_tiny_model, turns):
    """Off, a second document's prefill runs beside a step; on, it waits for the step and the answers stay."""
    def req(prefix):
        return FimRequest("# demo.py\n", prefix, "\n", SpanPlan("line", 16), language="python", path="demo.py")

    backend = NativeBackend(parafill_tiny_model, "cpu")
    reference = [backend.fill(req(p), DecodeSettings(), document=f"ref{i}").text
                 for i, p in enumerate(["def add(a, b):\n    return", "import os\nfor x in"])]
    backend.take_turns(turns)
    stepping, release, prefilled = threading.Event(), threading.Event(), threading.Event()
    step, prepare = backend.batcher._step, backend.context_cache.prepare

    def held_step(batch):
        stepping.set()
        release.wait(30)
        return step(batch)

    def noted_prepare(document, ids):
        slot = prepare(document, ids)
        if document == "second":
            prefilled.set()
        return slot

    backend.batcher._step, backend.context_cache.prepare = held_step, noted_prepare
    results = {}
    first = threading.Thread(target=lambda: results.update(a=backend.fill(
        req("def add(a, b):\n    return"), DecodeSettings(), document="first")))
    second = threading.Thread(target=lambda: results.update(b=backend.fill(
        req("import os\nfor x in"), DecodeSettings(), document="second")))
    first.start()
    assert stepping.wait(30)
    second.start()
    assert prefilled.wait(1.0) is (not turns)
    release.set()
    first.join(60)
    second.join(60)
    assert prefilled.is_set() and [results["a"].text, results["b"].text] == reference


def test_taking_turns_is_for_a_cpu():
    class OnGpu:
        device = torch.device("cuda")

    with pytest.raises(ValueError, match="CPU"):
        NativeBackend.take_turns(OnGpu())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_step_equals_eager_step():
    from denoiser.step_graph import GraphStep

    model = make_model("cuda", torch.float32)
    contexts = [context(model, n, seed) for seed, (n, _, _) in enumerate(CASES)]
    eager = SpanBatcher(model, device="cuda", dtype=torch.float32, vocab_limit=VOCAB - 3, fixed_capacity=512,
                        max_batch=8)
    runner = GraphStep(max_batch=8)
    graphed = SpanBatcher(model, device="cuda", dtype=torch.float32, vocab_limit=VOCAB - 3, fixed_capacity=512,
                          max_batch=8, step_runner=runner)
    want = [eager.denoise(kv, n, span, decode) for kv, (n, span, decode) in zip(contexts, CASES)]
    alone = [graphed.denoise(kv, n, span, decode) for kv, (n, span, decode) in zip(contexts, CASES)]
    assert runner.disabled is None, runner.disabled
    assert alone == want and runner.captures >= 2 and runner.replays == sum(r.steps for r in want)
    results, errors = run_together(graphed, contexts, CASES)
    assert not errors and [results[i] for i in range(len(CASES))] == want
    assert runner.disabled is None and graphed.stats()["shared_steps"] > 0
    # Replays never re-capture a shape they have seen.
    captures = runner.captures
    assert [graphed.denoise(kv, n, span, decode) for kv, (n, span, decode) in zip(contexts, CASES)] == want
    assert runner.captures == captures


def test_a_failed_shared_step_fails_each_request_with_its_own_error(model, contexts):
    batcher = SpanBatcher(model, device="cpu", dtype=torch.float32, vocab_limit=VOCAB - 3)
    fault = RuntimeError("CUDA error: injected")
    real_step = batcher._step_bucket

    def failing(span_len, jobs):
        if len(jobs) > 1:
            raise fault
        return real_step(span_len, jobs)

    batcher._step_bucket = failing
    cases = [(n, 16, DecodeSettings(confidence_threshold=1.0)) for n, _, _ in CASES[:3]]
    errors: dict[int, BaseException] = {}
    driving = threading.Event()

    def work(i):
        def gate():
            if i == 0 and not driving.is_set():
                driving.set()
                deadline = time.monotonic() + 10
                while batcher.pending < 2 and time.monotonic() < deadline:
                    time.sleep(0.001)
            return False

        n, span, decode = cases[i]
        try:
            batcher.denoise(contexts[i], n, span, decode, gate)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            errors[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    threads[0].start()
    assert driving.wait(timeout=10)
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert set(errors) == {0, 1, 2}
    originals = [e for e in errors.values() if e is fault]
    others = [e for e in errors.values() if e is not fault]
    assert len(originals) == 1 and len(others) == 2 and len({id(e) for e in others}) == 2
    assert all(isinstance(e, RuntimeError) and e.__cause__ is fault and "CUDA error: injected" in str(e)
               for e in others)


def test_pooled_rows_double_up_to_the_batch_limit_and_keep_every_context():
    from types import SimpleNamespace

    from denoiser.batching import ContextRows

    model = make_model()
    rows = ContextRows(model.config, "cpu", torch.float32, max_rows=6)
    contexts = [context(model, 20 + i, seed=i) for i in range(7)]
    jobs, grown = [], []
    for i, kv in enumerate(contexts):
        job = SimpleNamespace(kv=kv, ctx_len=20 + i, row=None)
        before = rows.kv.k.data_ptr() if rows.rows else None
        rows.admit(job)
        jobs.append(job)
        if rows.kv.k.data_ptr() != before:
            grown.append(rows.rows)
    assert grown == [1, 2, 4, 6, 7]  # doubling, capped at max_rows, then one more when asked
    for job in jobs:
        n = job.ctx_len
        assert torch.equal(rows.kv.k[:, job.row, :, :n], job.kv.k[:, 0, :, :n])
        assert torch.equal(rows.kv.v[:, job.row, :, :n], job.kv.v[:, 0, :, :n])
