"""The open-model settings through a real server: `openModelWeights` and `openModelKeystrokeCache`.

A tiny random Open-dCoder checkpoint is loaded by `parafill serve` over stdio.
The weights setting decides how the model is held (and reloads it when it
changes); the keystroke cache is applied to the loaded model without a reload,
shows its bytes in `parafill/status` and its reuse in the context counts, and
drops everything when turned off.
"""
from __future__ import annotations

import asyncio

import pytest
import pytest_lsp
from pytest_lsp import ClientServerConfig, LanguageClient

from tests.conftest import PARAFILL_ENV, PARAFILL_SERVE

CONFIG = ClientServerConfig(server_command=PARAFILL_SERVE, server_env=PARAFILL_ENV)
pytestmark = pytest.mark.asyncio(loop_scope="module")

URI = "file:///w/typing.py"
BODY = "def total(values):\n    result = 0\n    for value in values:\n        result += value\n    return result\n\n"


@pytest.fixture(scope="module")
def tiny_open_dir(tmp_path_factory):
    from tools.tiny_open import make_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny-open-dcoder")
    make_tiny_checkpoint(path, "open-dcoder")
    return path


@pytest_lsp.fixture(config=CONFIG, scope="module")
async def client(lsp_client: LanguageClient, parafill_lsp, tiny_open_dir):
    settings = {"openModelWeights": "int8", "openModelKeystrokeCache": True, "contextTokens": 512}
    await lsp_client.initialize_session(parafill_lsp.init_params(tiny_open_dir, settings))
    await parafill_lsp.wait_for_state(lsp_client)
    yield
    await lsp_client.shutdown_session()


async def _type_two_requests(client, parafill_lsp, version: int) -> None:
    """Open (or reset) the document, ask once, type three characters, ask again."""
    text = BODY + "def mean(values):\n    return "
    parafill_lsp.replace_all(client, URI, text, version) if version > 1 else parafill_lsp.open(client, URI, text)
    line = text.count("\n")
    await parafill_lsp.inline(client, URI, line, len("    return "))
    parafill_lsp.replace_all(client, URI, text + "tot", version + 1)
    await parafill_lsp.inline(client, URI, line, len("    return tot"))


async def test_weights_setting_decides_how_the_model_is_held(client: LanguageClient, parafill_lsp):
    status = await parafill_lsp.status(client)
    assert status["model"].startswith("open-dcoder:"), status
    assert status["message"].endswith("(int8 weights)"), status["message"]


async def test_keystroke_cache_reuses_context_and_turning_it_off_drops_it(client: LanguageClient, parafill_lsp):
    await _type_two_requests(client, parafill_lsp, 1)
    status = await parafill_lsp.status(client)
    held = status["caches"]["keystrokeKv"]
    assert held["entries"] == 1 and 0 < held["bytes"] <= held["maxBytes"], held
    assert status["engine"]["contextTokens"]["reused"] > 0, status["engine"]

    parafill_lsp.configure(client, {"parafill": {"openModelKeystrokeCache": False}})
    for _ in range(100):
        status = await parafill_lsp.status(client)
        if status["caches"]["keystrokeKv"]["maxBytes"] == 0:
            break
        await asyncio.sleep(0.05)
    assert status["caches"]["keystrokeKv"] == {"entries": 0, "bytes": 0, "maxBytes": 0}, status["caches"]
    assert status["state"] == "ready" and status["message"].endswith("(int8 weights)"), status  # no reload
    reused_before = status["engine"]["contextTokens"]["reused"]
    await _type_two_requests(client, parafill_lsp, 3)
    status = await parafill_lsp.status(client)
    assert status["engine"]["contextTokens"]["reused"] == reused_before, status["engine"]
    assert status["caches"]["keystrokeKv"]["bytes"] == 0


async def test_changing_the_weights_reloads_the_model(client: LanguageClient, parafill_lsp):
    parafill_lsp.configure(client, {"parafill": {"openModelWeights": "fp32"}})
    for _ in range(400):
        status = await parafill_lsp.status(client)
        if status["state"] == "ready" and status["message"].endswith("(fp32 weights)"):
            break
        await asyncio.sleep(0.05)
    assert status["state"] == "ready" and status["message"].endswith("(fp32 weights)"), status
