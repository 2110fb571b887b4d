"""Memory that stays flat: nothing is kept per closed document, every cache is bounded in bytes.

The whole server over a long run is `tests/test_soak_fuzz.py::test_memory_stays_flat_while_files_come_and_go`
(and `parafill bench --soak N`); these check each holder on its own.
"""
from __future__ import annotations

import asyncio
import gc
import sys
import threading
import time
import tracemalloc
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from denoiser.backend import Cancelled, DecodeSettings, FillResult
from denoiser.batching import SpanBatcher
from denoiser.config import ModelConfig
from denoiser.engine import Engine
from denoiser.kv_cache import ContextKVCache, kv_bytes
from denoiser.model import KVBuffers, SpanDenoiser
from fim import ContextOptions, build_request, snippets
from fim.drafts import DraftIndex
from fim.request import DraftEvidence, FimRequest, SpanPlan
from lsp_server.server import create_server
from lsp_server.suggest import with_draft
from lsp_server.worker import ModelWorker, Superseded, Supersession


@pytest.fixture(scope="module")
def model():
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_positions=512)
    model = SpanDenoiser(config)
    model.init_weights(torch.Generator().manual_seed(0))
    return model.eval()


# --- the protocol: a handled notification leaves nothing behind ------------------------------
def test_notifications_leave_no_future_behind():
    protocol = create_server().protocol
    done = []

    def fails(params):  # what pygls raises for an edit to a closed document
        raise KeyError(params["uri"])

    def builtin(params):  # pygls's own didOpen/didChange/didClose handlers are generators like this
        yield fails, (params,), None

    async def coroutine(params):
        return None

    for i in range(50):
        big_edit = {"uri": f"file:///closed{i}.py", "text": "x" * 100_000}
        protocol._execute_handler(f"note-{i}", builtin, done.append, args=(big_edit,))
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        protocol._execute_handler("async-note", coroutine, done.append, args=({},))
        loop.run_until_complete(asyncio.sleep(0.01))
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    assert len(done) == 51 and all(f.done() for f in done)
    assert isinstance(done[0].exception(), KeyError)
    # Before: one future per notification stayed, a failed one with its traceback and edit text.
    assert protocol._request_futures == {}
    # Reported, the error lets go of its traceback (whose frames hold the edit's text).
    assert done[0].exception().__traceback__ is None


class Held:
    """Something a piece of work holds (a stand-in for its tensors and text)."""


def test_a_superseded_completion_leaves_no_reference_cycle():
    # With the garbage collector off, only reference counting frees: what a cycle holds stays.
    worker, held = ModelWorker(), []

    def job(engine, *, is_cancelled):
        payload = Held()
        held.append(weakref.ref(payload))
        raise Cancelled("superseded between steps")

    gc.disable()
    try:
        async def ask():
            try:
                await worker.run(Supersession().begin("a", "inline"), job)
            except Superseded:
                return "superseded"

        assert asyncio.run(ask()) == "superseded"
        assert held[0]() is None  # before: the job's frames stayed until a full collection
    finally:
        gc.enable()
        worker.shutdown()


def test_a_cancelled_span_leaves_no_reference_cycle(model):
    batcher = SpanBatcher(model, device="cpu", dtype=torch.float32, vocab_limit=61)
    kv = KVBuffers.allocate(model.config, 1, 64, "cpu", torch.float32)
    model.prefill(torch.tensor([[7, 8, 9, 10]]), kv, 0)
    buffer = weakref.ref(kv.k)
    gc.disable()
    try:
        with pytest.raises(Cancelled):
            batcher.denoise(kv, 4, 16, DecodeSettings(steps=4), lambda: True)
        del kv
        assert buffer() is None  # before: the request's error held its K/V through a cycle
    finally:
        gc.enable()


# --- supersession: a closed document leaves no counters -------------------------------------
def test_closing_drops_a_documents_counters_and_a_reopened_document_starts_clean():
    board = Supersession()
    board.edited("a")
    old = board.begin("a", "inline")
    board.closed("a")
    assert old.is_cancelled()
    assert board.edits == {} and board.requests == {}
    # Reopened: fresh numbers, so the old ticket stays off and the new one is on.
    board.edited("a")
    new = board.begin("a", "inline")
    assert old.is_cancelled() and not new.is_cancelled()
    for i in range(1000):
        board.edited(f"file:///f{i}.py")
        board.begin(f"file:///f{i}.py", "inline")
        board.closed(f"file:///f{i}.py")
    assert list(board.edits) == ["a"] and list(board.requests) == [("a", "inline")]


# --- the context K/V cache: bounded in bytes -------------------------------------------------
def test_context_cache_is_bounded_in_bytes_least_recent_out(model):
    one = 2 * model.config.n_layers * model.config.n_heads * 64 * model.config.head_dim * 4  # 64 fp32 positions
    cache = ContextKVCache(model, max_documents=100, max_bytes=3 * one, capacity_step=64)
    for name in "abcd":
        cache.prepare(name, [7, 8, 9])
        assert cache.bytes <= 3 * one
    assert "a" not in cache and all(name in cache for name in "bcd")
    # A context longer than the bound alone is still served: it is the one kept.
    slot = cache.prepare("long", [6 + i % 50 for i in range(200)])
    assert kv_bytes(slot.kv) > 3 * one and len(cache) == 1 and "long" in cache
    assert cache.bytes == kv_bytes(slot.kv)


# --- the engine's caches: bounded in bytes; typed-ahead dropped on close ----------------------
class ScriptedBackend:
    """Answers every request with a fixed text (the engine's caches are what is tested)."""

    name, device, parameters = "scripted", torch.device("cpu"), 0

    def __init__(self):
        self.calls = 0

    def fill(self, request, decode, *, document, is_cancelled):
        self.calls += 1
        return FillResult(text="(a + b)", tokens=3, steps=1, context_tokens=10, reused_context_tokens=0)

    def forget(self, document):
        pass


def request(prefix: str) -> FimRequest:
    return FimRequest("# path: x.py\n", prefix, "\n", SpanPlan("line", 16), language="python", path="x.py")


def test_completion_cache_is_bounded_in_bytes_not_entries():
    class LongAnswers(ScriptedBackend):  # answers of ~40 KB: a cache of entries would keep them all
        def fill(self, request, decode, *, document, is_cancelled):
            self.calls += 1
            return FillResult(text="z" * 40_000, tokens=3, steps=1, context_tokens=10, reused_context_tokens=0)

    engine = Engine(LongAnswers(), cache_bytes=1 << 20)
    for i in range(64):
        engine.complete(request(f"x{i} = y"), document=f"d{i % 4}")
    caches = engine.status()["caches"]
    held = caches["completion_cache"]
    assert held["max_bytes"] == 1 << 20 and 0 < held["bytes"] <= 1 << 20
    assert 10 < held["entries"] < 64


def test_completion_cache_keys_hold_a_digest_not_the_context():
    engine = Engine(ScriptedBackend(), cache_bytes=1 << 20)
    for i in range(64):  # each context holds ~40 KB of text; its entry holds 32 characters of key
        engine.complete(request(f"x{i} = " + "y" * 40_000), document=f"d{i % 4}")
    caches = engine.status()["caches"]
    held = caches["completion_cache"]
    assert held["entries"] == 64 and held["bytes"] < 64 * 1024
    assert caches["typed_ahead"]["entries"] == 4 and caches["typed_ahead"]["bytes"] > 4 * 40_000
    # The same context is answered from the cache; one more character is not.
    calls = engine.backend.calls
    engine.complete(request("x3 = " + "y" * 40_000), document="d9")
    assert engine.backend.calls == calls
    engine.complete(request("x3 = " + "y" * 40_001), document="d9")
    assert engine.backend.calls == calls + 1
    # A context bigger than the whole cache is answered, and its answer kept.
    engine.complete(request("z" * (2 << 20)), document="d0")
    assert engine.cache_stats()["completion_cache"]["bytes"] <= 1 << 20


def test_context_keys_tell_every_field_apart():
    base = request("a = 1\nb")
    keys = {base.context_key(),
            replace(base, prefix="a = 1\nb2"), replace(base, suffix="\n\n"), replace(base, preamble="# path: y.py\n"),
            replace(base, span=SpanPlan("block", 16)), replace(base, span=SpanPlan("line", 32)),
            replace(base, draft="c"), replace(base, draft_evidence=DraftEvidence(matched_chars=3)),
            # the same characters split differently between prefix and suffix
            replace(base, prefix="a = 1\n", suffix="b\n")}
    keys = {k if isinstance(k, str) else k.context_key() for k in keys}
    assert len(keys) == 9 and all(len(k) == 32 for k in keys)
    assert request("a = 1\nb").context_key() == base.context_key()


def test_typed_ahead_state_goes_with_the_document_even_when_a_request_outlives_the_close():
    backend = ScriptedBackend()
    engine = Engine(backend)
    engine.complete(request("def add(a, b):\n    return"), document="a")
    assert engine.cache_stats()["typed_ahead"]["entries"] == 1
    engine.forget("a")
    assert engine.cache_stats()["typed_ahead"]["entries"] == 0
    # A request whose document closed while it ran (its ticket is off by then) leaves nothing.
    closed = threading.Event()

    def closes_while_running():
        return closed.is_set()

    class ClosingBackend(ScriptedBackend):
        concurrent_fill = True  # called without the engine's lock, as the native backend is

        def fill(self, request, decode, *, document, is_cancelled):
            result = super().fill(request, decode, document=document, is_cancelled=is_cancelled)
            closed.set()  # the close (and its forget) happen before the engine records the answer
            engine.forget(document)
            return result

    engine.backend = ClosingBackend()
    engine.complete(request("def mul(a, b):\n    return"), document="b", is_cancelled=closes_while_running)
    assert engine.cache_stats()["typed_ahead"]["entries"] == 0


# --- the batcher's pooled rows: freed once no request uses them -------------------------------
def test_pooled_rows_are_freed_when_the_batch_is_gone(model):
    batcher = SpanBatcher(model, device="cpu", dtype=torch.float32, vocab_limit=61, pool_bytes=0)
    contexts = []
    for seed, length in enumerate((20, 30, 40)):
        ids = torch.randint(6, 60, (1, length), generator=torch.Generator().manual_seed(seed))
        kv = KVBuffers.allocate(model.config, 1, 64, "cpu", torch.float32)
        model.prefill(ids, kv, 0)
        contexts.append((kv, length))
    peak = []
    gate = threading.Event()

    def first_waits():  # the first request holds its first step until the others queue up
        if not gate.is_set():
            gate.set()
            deadline = time.monotonic() + 10
            while batcher.pending < 2 and time.monotonic() < deadline:
                time.sleep(0.001)
        peak.append(batcher.pool_stats()["bytes"])
        return False

    decode = DecodeSettings(steps=4, confidence_threshold=1.0)
    threads = [threading.Thread(target=batcher.denoise, args=(kv, n, 16, decode, first_waits if i == 0 else (lambda: False)))
               for i, (kv, n) in enumerate(contexts)]
    threads[0].start()
    assert gate.wait(10)
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(60)
    assert batcher.stats()["max_batch"] == 3 and max(peak) > 0  # the three shared steps in pooled rows
    assert batcher.pool_stats() == {"entries": 0, "bytes": 0, "max_bytes": 0}


# --- snippets: both caches bounded in bytes ----------------------------------------------------
def test_snippet_caches_are_bounded_in_bytes(monkeypatch):
    monkeypatch.setattr(snippets, "_WINDOWS", snippets.ByteBoundedCache(1000, 2 << 20))
    monkeypatch.setattr(snippets, "_SELECTED", snippets.ByteBoundedCache(1000, 2 << 20))
    query = "def fetch_user(session, user_id):\n    response = session.get(user_id)\n"
    for i in range(40):  # 40 versions of a 100 KB document, as typing in it makes them
        text = f"# version {i}\n" + "def fetch_order(session, order_id):\n    return session.get(order_id)\n" * 1400
        snippets.select_snippets(query, [("other.py", text)])
    stats = snippets.cache_stats()
    windows, choices = stats["snippet_windows"], stats["snippet_choices"]
    assert 0 < windows["bytes"] <= 2 << 20 and windows["entries"] < 40, stats
    # The choices are keyed by each text's length and hash: 40 of them hold less than one text.
    assert choices["entries"] == 40 and choices["bytes"] < 100_000, stats


def test_byte_bounded_cache_drops_least_recent_first_and_skips_what_cannot_fit():
    cache = snippets.ByteBoundedCache(max_entries=10, max_bytes=100)
    for key in "abc":
        cache.put(key, key.upper(), 40)
    assert cache.get("a") is None and cache.get("b") == "B" and cache.stats()["bytes"] == 80
    cache.put("d", "D", 40)  # "c" is now the least recent ("b" was just read)
    assert cache.get("c") is None and cache.get("b") == "B"
    cache.put("huge", "H", 101)
    assert cache.get("huge") is None and cache.stats() == {"entries": 2, "bytes": 80, "max_bytes": 100}


# --- the drafts index: a closed document stays out; its bytes are what it holds ----------------
def test_a_completion_that_outlives_its_documents_close_does_not_bring_it_back_to_the_drafts_index():
    # Before: `with_draft` indexed the document (pinned, as an open one) from the completion's
    # thread after the close had taken it out, and it stayed for good: 32 closed documents
    # after 10,000 mixed soak operations, each pinned until the index passed 64 MiB.
    uri, text = "file:///closed.py", "def fetch_user(session, user_id):\n    return session.get(user_id)\n" * 50
    board, index = Supersession(), DraftIndex()
    board.edited(uri)
    ticket = board.begin(uri, "inline")  # the completion starts on the open document
    index.update(uri, text, pinned=True)
    # The close, in the server's order: the tickets first, then the index (drafts thread).
    board.closed(uri)
    index.unpin(uri)
    index.remove(uri)
    # The completion, still running, reaches the drafts now.
    request = build_request(text, 3, 4, path="closed.py", language_id="python", options=ContextOptions())
    with_draft(request, index, text, 3, 4, uri, is_cancelled=ticket.is_cancelled)
    assert uri not in index and len(index) == 0 and index.bytes == 0
    # An open document's own completion still indexes it.
    board.edited(uri)
    with_draft(request, index, text, 3, 4, uri, is_cancelled=board.begin(uri, "inline").is_cancelled)
    assert uri in index and index.is_pinned(uri)


def test_the_drafts_index_counts_what_it_holds():
    # Its byte bound means something only if the count is honest (before: 2 bytes a character
    # and 88 a line, about 0.65 of what the index really kept for real source files).
    sources = sorted(Path(__file__).resolve().parents[1].glob("lsp_server/*.py"))
    texts = [p.read_text(encoding="utf-8") + " " for p in sources]  # fresh strings: all the index's
    index = DraftIndex(max_bytes=1 << 40)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for number, text in enumerate(texts):
            index.update(f"file:///{number}.py", text, pinned=True)
        held = tracemalloc.get_traced_memory()[0] - before + sum(sys.getsizeof(text) for text in texts)
    finally:
        tracemalloc.stop()
    assert 0.9 * held <= index.bytes <= 1.5 * held, (index.bytes, held)
