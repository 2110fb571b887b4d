"""The server's model threads: completions run side by side; a reload stops them first."""
import asyncio
import threading
import time

import pytest

from lsp_server.worker import ModelChoice, ModelWorker, Superseded, Supersession

pytestmark = pytest.mark.asyncio


class FakeEngine:
    def __init__(self, name):
        self.name = name
        self.backend = type("B", (), {"name": name, "device": "cpu"})()

    def set_threads(self, threads):
        pass


async def loaded_worker(monkeypatch, events):
    from denoiser.engine import Engine

    def fake_load(model=None, device="auto", progress=None, open_model_weights="auto"):
        events.append(f"load {model}")
        return FakeEngine(model)

    monkeypatch.setattr(Engine, "load", staticmethod(fake_load))
    worker = ModelWorker()
    await worker.load(ModelChoice("first", "cpu"), lambda *a: None)
    assert worker.ready
    return worker


def until_cancelled(events, started):
    def fn(engine, *, is_cancelled):
        started.set()
        deadline = time.monotonic() + 20
        while not is_cancelled() and time.monotonic() < deadline:
            time.sleep(0.005)
        events.append(f"stopped on {engine.name}")
        from denoiser.backend import Cancelled

        raise Cancelled("stopped between steps")

    return fn


async def test_completions_on_two_documents_run_at_the_same_time(monkeypatch):
    worker = await loaded_worker(monkeypatch, [])
    board = Supersession()
    both = threading.Barrier(2, timeout=10)

    def meet(engine, *, is_cancelled):
        both.wait()  # only returns if the other completion is running at the same time
        return engine.name

    results = await asyncio.gather(worker.run(board.begin("a", "inline"), meet),
                                   worker.run(board.begin("b", "inline"), meet))
    assert results == ["first", "first"]
    worker.shutdown()


async def test_a_reload_cancels_running_completions_before_loading(monkeypatch):
    events: list[str] = []
    worker = await loaded_worker(monkeypatch, events)
    board = Supersession()
    started = threading.Event()
    running = asyncio.ensure_future(worker.run(board.begin("a", "inline"), until_cancelled(events, started)))
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
    await worker.load(ModelChoice("second", "cpu"), lambda *a: None)
    with pytest.raises(Superseded):
        await running
    # The old model's completion ended before the new model started loading.
    assert events == ["load first", "stopped on first", "load second"]
    assert worker.ready and worker.engine.name == "second"
    worker.shutdown()


async def test_a_reload_waits_for_the_thread_of_a_request_the_client_cancelled(monkeypatch):
    events: list[str] = []
    worker = await loaded_worker(monkeypatch, events)
    started = threading.Event()

    def slow(engine, *, is_cancelled):
        started.set()
        time.sleep(0.5)  # a step in progress: the thread runs on after $/cancelRequest
        events.append("old model's step done")
        return "late"

    request = asyncio.ensure_future(worker.run(Supersession().begin("a", "inline"), slow))
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
    request.cancel()  # what pygls does on $/cancelRequest
    with pytest.raises(asyncio.CancelledError):
        await request
    await worker.load(ModelChoice("second", "cpu"), lambda *a: None)
    assert events == ["load first", "old model's step done", "load second"]
    worker.shutdown()
