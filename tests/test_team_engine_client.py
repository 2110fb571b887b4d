"""The language server's side of a team engine, against a one-process stand-in (no Ray needed).

The stand-in (`tools/stand_in_engine.py`) answers with the same `ReplicaService`
a Ray Serve replica runs, so these check the client in seconds: fills carry
the token and a hashed document key, a cancelled fill closes its request and
the engine stops, an engine that goes away is reported once, answers are
empty (or the local model's) until it is back, and the client reconnects by
itself. tests/test_team_engine.py runs the real Ray Serve engine.
"""
from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

from denoiser.backend import Cancelled, DecodeSettings
from fim.request import FimRequest, SpanPlan
from lsp_server.engine_client import (EngineConfigError, EngineUnavailable, RemoteBackend, client_token,
                                      connect_engine, parse_engine_url)
from lsp_server.settings import Settings
from lsp_server.suggest import suggest
from tools.stand_in_engine import StandInEngine

REPO = Path(__file__).resolve().parents[1]
TOKEN = "stand-in-token-0123456789"
FAST = Settings(min_confidence=0, steps=4, span_tokens_line=8, span_tokens_block=8, context_tokens=256,
                latency_budget_ms=0)
SLOW = Settings(min_confidence=0, steps=0, confidence_threshold=1.0, span_tokens_line=128, span_tokens_block=128,
                latency_budget_ms=0)
TEXT = "import os\n\n\ndef read_lines(path):\n    with open(path) as handle:\n        return handle.re"


@pytest.fixture(scope="module")
def stand_in(parafill_tiny_model):
    with StandInEngine(parafill_tiny_model, TOKEN) as engine:
        yield engine


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("PARAFILL_ENGINE_TOKEN", TOKEN)


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_engine_urls_and_tokens_are_checked_before_anything_connects(tmp_path, monkeypatch):
    assert str(parse_engine_url("http://127.0.0.1:8765/")) == "http://127.0.0.1:8765"
    assert str(parse_engine_url("https://gpu-box.example/parafill")) == "https://gpu-box.example:443/parafill"
    for bad in ("ftp://host:1", "127.0.0.1:8765", "http://user:secret@host:1", "http://host:1/?q=1"):
        with pytest.raises(EngineConfigError):
            parse_engine_url(bad)
    monkeypatch.delenv("PARAFILL_ENGINE_TOKEN", raising=False)
    with pytest.raises(EngineConfigError, match="PARAFILL_ENGINE_TOKEN"):
        client_token("")
    token_file = tmp_path / "token"
    token_file.write_text("from-the-file\n")
    assert client_token(str(token_file)) == "from-the-file"
    monkeypatch.setenv("PARAFILL_ENGINE_TOKEN", "from-the-environment")
    assert client_token(str(token_file)) == "from-the-environment"


def test_fills_go_through_the_engine_with_the_token_and_a_hashed_document_key(stand_in, token):
    engine = connect_engine(stand_in.url)
    backend = engine.backend
    assert backend.state == "connected"
    assert backend.name == f"{stand_in.service.engine.backend.name} via {stand_in.url}"
    assert engine.max_context_tokens == stand_in.service.engine.max_context_tokens
    key = backend.document_key("file:///project/a.py")
    assert len(key) == 32 and "project" not in key
    first = suggest(engine, TEXT, 5, 26, document="file:///project/a.py", settings=FAST)
    again = suggest(engine, TEXT + "a", 5, 27, document="file:///project/a.py", settings=FAST)
    assert first.source == again.source == "model"
    # The second request reuses the document's context on the replica that holds it.
    status = engine.status()
    assert status["hit_rates"]["context_kv_reuse"] > 0
    remote = backend.remote_status()
    assert remote["state"] == "connected" and remote["replicas"]["stand-in"]["requests"] == 2
    assert remote["contextKvReuse"] > 0 and remote["documents"] == 1
    backend.close()


def test_a_wrong_token_is_refused_once_and_fills_then_fail_at_once(stand_in):
    events = []
    backend = RemoteBackend(stand_in.url, "not-the-token-0123456789", notify=lambda *e: events.append(e))
    assert backend.connect() is False
    assert backend.state == "refused"
    refused_before = stand_in.service.counts["refused"]
    fills_before = stand_in.service.counts["fills"]
    for _ in range(3):
        with pytest.raises(EngineUnavailable):
            backend.fill(FimRequest("", "x = ", "", SpanPlan("line", 8)), DecodeSettings(), document="d",
                         is_cancelled=lambda: False)
    assert [kind for kind, _ in events] == ["refused"], events
    assert "token" in events[0][1] and "PARAFILL_ENGINE_TOKEN" in events[0][1]
    # Refused fills never reach the engine again: no model work, not even a refused request.
    assert stand_in.service.counts["fills"] == fills_before
    assert stand_in.service.counts["refused"] == refused_before
    backend.close()


def test_a_cancelled_fill_closes_its_request_and_the_engine_stops(stand_in, token):
    engine = connect_engine(stand_in.url)
    cancelled_before = stand_in.service.counts["cancelled"]
    flag = threading.Event()
    threading.Timer(0.3, flag.set).start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        suggest(engine, "def handle(event):\n    \n", 1, 4, document="file:///slow.py", settings=SLOW,
                is_cancelled=flag.is_set)
    assert time.monotonic() - started < 5
    wait_until(lambda: stand_in.service.counts["cancelled"] == cancelled_before + 1)
    assert engine.backend.remote_status()["requests"]["cancelled"] == 1
    engine.backend.close()


def test_an_engine_that_goes_away_is_reported_once_and_comes_back_by_itself(parafill_tiny_model, token):
    events = []
    with StandInEngine(parafill_tiny_model, TOKEN) as engine_side:
        engine = connect_engine(engine_side.url, notify=lambda *e: events.append(e))
        assert suggest(engine, TEXT, 5, 26, document="file:///a.py", settings=FAST).source == "model"
        engine_side.stop()
        for column in (20, 21, 22):
            with pytest.raises(EngineUnavailable):
                suggest(engine, TEXT, 5, column, document="file:///a.py", settings=FAST)
        assert [kind for kind, _ in events] == ["unreachable"]
        assert "suggestions stay empty" in events[0][1] and "reconnects by itself" in events[0][1]
        engine_side.start()
        wait_until(lambda: engine.backend.state == "connected")
        assert [kind for kind, _ in events] == ["unreachable", "back"]
        assert suggest(engine, TEXT, 5, 23, document="file:///a.py", settings=FAST).source == "model"
        assert engine.backend.remote_status()["requests"]["reconnects"] == 1
        engine.backend.close()


def test_the_local_model_answers_while_the_engine_is_away(parafill_tiny_model, token):
    from denoiser.loading import load_backend

    events = []
    with StandInEngine(parafill_tiny_model, TOKEN) as engine_side:
        engine = connect_engine(engine_side.url, notify=lambda *e: events.append(e),
                                fallback=lambda: load_backend(str(parafill_tiny_model), "cpu"))
        engine_side.stop()
        with pytest.raises(EngineUnavailable):
            suggest(engine, TEXT, 5, 26, document="file:///a.py", settings=FAST)
        assert "the local model answers meanwhile" in events[0][1]
        wait_until(lambda: engine.backend.remote_status()["localModel"]["state"] == "loaded", timeout=60)
        found = suggest(engine, TEXT, 5, 25, document="file:///a.py", settings=FAST)
        assert found.source == "model" and engine.backend.remote_status()["requests"]["local"] == 1
        engine.backend.close()


# --- the same through a real LSP session -----------------------------------------------------

CONFIG = ClientServerConfig(
    server_command=[sys.executable, "-m", "lsp_server", "serve", "--device", "cpu"],
    server_env={**os.environ, "PYTHONPATH": str(REPO), "PARAFILL_ENGINE_TOKEN": TOKEN},
)
URI = "file:///project/words.py"
SOURCE = "import os\n\n\ndef count_words(text):\n    words = text.split()\n    return len(wo\n"


@pytest_lsp.fixture(config=CONFIG)
async def client(lsp_client: LanguageClient, parafill_lsp, stand_in):
    await lsp_client.initialize_session(parafill_lsp.init_params(None, {"engine": stand_in.url}))
    await parafill_lsp.wait_for_state(lsp_client)
    yield
    await lsp_client.shutdown_session()


async def test_an_lsp_session_through_the_engine_and_through_its_outage(client: LanguageClient, parafill_lsp,
                                                                        stand_in):
    status = await parafill_lsp.status(client)
    assert status["state"] == "ready" and status["teamEngine"]["state"] == "connected", status
    assert status["model"].endswith(f"via {stand_in.url}")
    parafill_lsp.open(client, URI, SOURCE)
    first = await parafill_lsp.inline(client, URI, 5, 17)
    assert first.items and first.items[0].range.start == types.Position(line=5, character=17)
    await parafill_lsp.inline(client, URI, 4, 24)
    status = await parafill_lsp.status(client)
    assert status["teamEngine"]["requests"]["answered"] == 2 and status["hitRates"]["contextKvReuse"] > 0
    # With an engine and no local fallback, the server never loads torch (its memory and start-up time).
    maps = Path(f"/proc/{client._server.pid}/maps").read_text()
    assert "libtorch" not in maps and "libc10" not in maps
    # The engine goes away: one message, then empty answers; it comes back by itself.
    stand_in.stop()
    try:
        for column in (10, 11, 12):
            assert not (await parafill_lsp.inline(client, URI, 5, column)).items
        warnings = [m.message for m in client.messages if "team engine" in m.message]
        assert len(warnings) == 1 and "reconnects by itself" in warnings[0], warnings
        assert (await parafill_lsp.status(client))["requests"]["engineUnavailable"] == 3
    finally:
        stand_in.start()
    deadline = time.monotonic() + 30
    while (await parafill_lsp.status(client))["teamEngine"]["state"] != "connected":
        assert time.monotonic() < deadline, "the server did not reconnect"
        await asyncio.sleep(0.2)
    assert (await parafill_lsp.inline(client, URI, 5, 14)).items
    back = [m for m in client.messages if "is back" in m.message]
    assert len(back) == 1 and back[0].type == types.MessageType.Info


@pytest.mark.parametrize("threads, cpus, turns", [(1, None, True), (1, 2.0, False), (2, None, True), (2, 4.0, False)])
def test_a_cpu_replica_takes_turns_unless_its_reservation_fits_a_prefill_beside_a_step(
        parafill_tiny_model, threads, cpus, turns):
    from team_engine.service import ReplicaService

    service = ReplicaService.load(str(parafill_tiny_model), "cpu", threads=threads, token_sha256=None, cpus=cpus)
    assert isinstance(service.engine.backend.batcher.compute, type(threading.Lock())) is turns
