"""initialize: the capabilities editors rely on, and requests before the model loads.

Neovim sends no inline completion request unless `inlineCompletionProvider` is in
the initialize reply (pygls 2.1.1 advertises it only when the feature carries
InlineCompletionOptions), and fim counts positions in UTF-16 even when the
client prefers UTF-8.
"""
from __future__ import annotations

import os
import sys
import time
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


@pytest_lsp.fixture(config=CONFIG)
async def client(lsp_client: LanguageClient):
    yield
    await lsp_client.shutdown_session()


async def test_capabilities_and_requests_before_the_model_loads(client: LanguageClient, parafill_lsp, parafill_tiny_model):
    params = parafill_lsp.init_params(parafill_tiny_model, encodings=["utf-8", "utf-16", "utf-32"])
    client.capabilities = params.capabilities
    started = time.monotonic()
    result = await client.initialize_async(params)
    caps = result.capabilities
    assert time.monotonic() - started < 20, "initialize must not wait for torch or the model"

    assert result.server_info.name == "parafill"
    assert caps.inline_completion_provider is not None and caps.inline_completion_provider is not False
    assert caps.completion_provider is not None
    sync = caps.text_document_sync
    assert sync.change == types.TextDocumentSyncKind.Incremental
    assert sync.open_close is True
    assert caps.position_encoding == types.PositionEncodingKind.Utf16

    # Not `initialized` yet, so no model: an empty answer at once, never an error or a hang.
    parafill_lsp.open(client, "file:///early.py", "def f(x):\n    return x\n")
    started = time.monotonic()
    early = await parafill_lsp.inline(client, "file:///early.py", 1, 4)
    assert list(early.items) == []
    menu = await client.text_document_completion_async(types.CompletionParams(
        text_document=types.TextDocumentIdentifier(uri="file:///early.py"), position=types.Position(line=1, character=4)))
    assert list(menu.items) == []
    assert time.monotonic() - started < 5
    status = await parafill_lsp.status(client)
    assert status["state"] == "loading"
    assert status["requests"]["notReady"] == 2

    client.initialized(types.InitializedParams())
    status = await parafill_lsp.wait_for_state(client, ("ready", "error"))
    assert status["state"] == "ready", status["message"]
    assert status["device"] == "cpu"
