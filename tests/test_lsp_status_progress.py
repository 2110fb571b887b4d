"""Model loading reports $/progress; `parafill/status` reports model, device, state,
latency percentiles, cache hit rates and request counts; a broken model
directory is an error state with a message, not a crash."""
from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

REPO = Path(__file__).resolve().parents[1]
CONFIG = ClientServerConfig(
    server_command=[sys.executable, "-m", "lsp_server", "serve", "--device", "cpu"],
    server_env={**os.environ, "PYTHONPATH": str(REPO)},
)
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_lsp.fixture(config=CONFIG, scope="module")
async def client(lsp_client: LanguageClient, parafill_lsp, parafill_tiny_model):
    await lsp_client.initialize_session(parafill_lsp.init_params(parafill_tiny_model))
    await parafill_lsp.wait_for_state(lsp_client)
    yield
    await lsp_client.shutdown_session()


@pytest_lsp.fixture(config=CONFIG, loop_scope="module")
async def broken_client(lsp_client: LanguageClient, parafill_lsp, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json", encoding="utf-8")
    await lsp_client.initialize_session(parafill_lsp.init_params(broken, progress=False))
    yield
    await lsp_client.shutdown_session()


# The server as an editor whose server command says --device cuda would start it.
CUDA_COMMAND_CONFIG = ClientServerConfig(
    server_command=[sys.executable, "-m", "lsp_server", "serve", "--device", "cuda"],
    server_env={**os.environ, "PYTHONPATH": str(REPO)},
)


@pytest_lsp.fixture(config=CONFIG, loop_scope="module")
async def cuda_setting_client(lsp_client: LanguageClient, parafill_lsp, parafill_tiny_model):
    await lsp_client.initialize_session(parafill_lsp.init_params(parafill_tiny_model, {"device": "cuda"}))
    yield
    await lsp_client.shutdown_session()


@pytest_lsp.fixture(config=CUDA_COMMAND_CONFIG, loop_scope="module")
async def cuda_command_client(lsp_client: LanguageClient, parafill_lsp, parafill_tiny_model):
    await lsp_client.initialize_session(parafill_lsp.init_params(parafill_tiny_model))
    yield
    await lsp_client.shutdown_session()


def skip_if_this_machine_has_cuda() -> None:
    if pytest.importorskip("torch").cuda.is_available():
        pytest.skip("this machine has CUDA, so device cuda loads")


async def load_error(client: LanguageClient, parafill_lsp) -> tuple[dict, list[str]]:
    status = await parafill_lsp.wait_for_state(client, ("ready", "error"))
    for _ in range(100):
        errors = [m.message for m in client.messages if m.type == types.MessageType.Error]
        if errors:
            break
        await asyncio.sleep(0.05)
    return status, errors


async def test_a_device_the_machine_lacks_names_the_editor_setting(cuda_setting_client: LanguageClient, parafill_lsp):
    skip_if_this_machine_has_cuda()
    status, errors = await load_error(cuda_setting_client, parafill_lsp)
    assert status["state"] == "error"
    fix = '; set parafill\'s `device` setting to "cpu" or "auto"'
    assert status["message"].startswith("device 'cuda': no CUDA device is available (")
    assert status["message"].endswith(fix) and "--device" not in status["message"]
    assert errors == [f"parafill: the model did not load: {status['message']}"]


async def test_a_device_from_the_server_command_names_the_setting_that_overrides_it(
        cuda_command_client: LanguageClient, parafill_lsp):
    skip_if_this_machine_has_cuda()
    status, errors = await load_error(cuda_command_client, parafill_lsp)
    assert status["state"] == "error"
    assert status["message"].endswith('; set parafill\'s `device` setting to "cpu" or "auto" '
                                      "(it overrides the --device cuda the server was started with)")
    assert errors == [f"parafill: the model did not load: {status['message']}"]


async def test_loading_reports_progress_from_begin_to_end(client: LanguageClient, parafill_lsp):
    for _ in range(100):  # the end notification may trail the state change by a moment
        reports = [r for token, r in client.progress_reports.items() if str(token).startswith("parafill/load")]
        if reports and reports[0] and isinstance(reports[0][-1], types.WorkDoneProgressEnd):
            break
        await asyncio.sleep(0.05)
    assert len(reports) == 1
    kinds = [type(r) for r in reports[0]]
    assert kinds[0] is types.WorkDoneProgressBegin
    assert kinds[-1] is types.WorkDoneProgressEnd
    assert types.WorkDoneProgressReport in kinds
    percents = [r.percentage for r in reports[0] if isinstance(r, types.WorkDoneProgressReport) and r.percentage is not None]
    assert percents == sorted(percents) and percents[-1] == 100
    assert "ready" in reports[0][-1].message


async def test_status_reports_model_device_latency_and_caches(client: LanguageClient, parafill_lsp, parafill_tiny_model):
    uri = "file:///project/status.py"
    parafill_lsp.open(client, uri, "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    \n")
    for _ in range(2):  # the second answer comes from a cache
        await parafill_lsp.inline(client, uri, 5, 4)
    status = await parafill_lsp.status(client)
    assert status["state"] == "ready"
    assert status["model"] == parafill_tiny_model.name
    assert status["device"] == "cpu"
    assert status["parameters"] > 0
    assert status["requests"]["inline"] == 2
    for key in ("latency", "modelLatency"):
        assert set(status[key]) == {"p50", "p90", "p99"}
    answered = status["requests"]["answered"]
    if answered:
        assert status["latency"]["p50"] <= status["latency"]["p90"] <= status["latency"]["p99"]
    assert set(status["hitRates"]) == {"typedAhead", "completionCache", "contextKvReuse"}
    assert status["engine"]["answered"]["model"] == 1
    assert status["hitRates"]["completionCache"] + status["hitRates"]["typedAhead"] == 0.5
    assert status["cacheHitRate"] == 0.5
    # Every cache says what it holds and may hold, in bytes.
    caches = status["caches"]
    assert set(caches) == {"completionCache", "typedAhead", "contextKv", "batchRows", "snippetWindows",
                           "snippetChoices", "draftsIndex"}
    for name, cache in caches.items():
        assert set(cache) == {"entries", "bytes", "maxBytes"}, name
        assert 0 <= cache["bytes"] <= cache["maxBytes"], (name, cache)
    assert caches["completionCache"]["entries"] == 1 and caches["completionCache"]["bytes"] > 0
    assert caches["typedAhead"]["entries"] == 1 and caches["contextKv"]["entries"] == 1
    assert caches["contextKv"]["bytes"] > 0
    assert status["openDocuments"]["count"] >= 1 and status["openDocuments"]["bytes"] > 0


async def test_a_broken_model_directory_is_an_error_state(broken_client: LanguageClient, parafill_lsp):
    status = await parafill_lsp.wait_for_state(broken_client, ("ready", "error"))
    assert status["state"] == "error"
    assert "config.json" in status["message"] and "JSON" in status["message"]
    for _ in range(100):
        errors = [m.message for m in broken_client.messages if m.type == types.MessageType.Error]
        if errors:
            break
        await asyncio.sleep(0.05)
    assert any("did not load" in e and "config.json" in e for e in errors)
    parafill_lsp.open(broken_client, "file:///x.py", "x = 1\n")
    result = await parafill_lsp.inline(broken_client, "file:///x.py", 0, 5)
    assert list(result.items) == []


async def test_a_new_model_setting_reloads_the_model(client: LanguageClient, parafill_lsp, parafill_tiny_model, tmp_path):
    missing = tmp_path / "not-a-model"
    parafill_lsp.configure(client, {"parafill": {**parafill_lsp.fast_settings, "model": str(missing)}})
    status = await parafill_lsp.wait_for_state(client, ("error",))
    assert str(missing) in status["message"]
    parafill_lsp.open(client, "file:///project/reload.py", "x = 1\n")
    assert list((await parafill_lsp.inline(client, "file:///project/reload.py", 0, 5)).items) == []

    parafill_lsp.configure(client, {"parafill": {**parafill_lsp.fast_settings, "model": str(parafill_tiny_model)}})
    status = await parafill_lsp.wait_for_state(client, ("ready",))
    assert status["model"] == parafill_tiny_model.name
