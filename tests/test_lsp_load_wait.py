"""Requests that arrive while the model loads, over a real LSP session: an explicit
(invoked) one waits for the model and gets its item, an automatic one answers
within its debounce and latency budget, and $/progress shows the load meanwhile.
The first load of a server process imports torch, which takes a noticeable while:
that is the load the requests wait for. The `threads` setting reaches the loaded
model when it changes."""
from __future__ import annotations

import asyncio

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

from tests.conftest import PARAFILL_ENV, PARAFILL_SERVE

# A busy CI machine may take longer than the usual 10 s to import torch and load: the bound
# here is generous so that the test shows the waiting, not how fast this machine is.
LOAD_WAIT_S = 600
CONFIG = ClientServerConfig(server_command=PARAFILL_SERVE,
                            server_env={**PARAFILL_ENV, "PARAFILL_LOAD_WAIT_S": str(LOAD_WAIT_S)})
pytestmark = pytest.mark.asyncio(loop_scope="module")

SOURCE = "def count_words(text):\n    words = text.split()\n    return len(words)\n"
# The automatic request's bound: its debounce plus its latency budget.
SETTINGS = {"debounceMs": 100, "latencyBudgetMs": 0}


@pytest_lsp.fixture(config=CONFIG, loop_scope="module")
async def client(lsp_client: LanguageClient, parafill_lsp, parafill_tiny_model):
    yield lsp_client
    await lsp_client.shutdown_session()


async def test_requests_during_the_load_wait_for_it_within_their_bounds(client: LanguageClient, parafill_lsp,
                                                                          parafill_tiny_model):
    await client.initialize_session(parafill_lsp.init_params(parafill_tiny_model, SETTINGS))
    parafill_lsp.open(client, "file:///invoked.py", SOURCE)
    parafill_lsp.open(client, "file:///automatic.py", SOURCE)
    invoked = asyncio.ensure_future(parafill_lsp.inline(client, "file:///invoked.py", 2, 4))
    automatic = asyncio.ensure_future(parafill_lsp.inline(client, "file:///automatic.py", 2, 4, automatic=True))

    done, _ = await asyncio.wait({invoked, automatic}, return_when=asyncio.FIRST_COMPLETED)
    assert automatic in done, "the automatic request waited past its debounce and budget"
    loading = (await parafill_lsp.status(client))["state"]
    assert list(automatic.result().items) == []

    result = await invoked
    status = await parafill_lsp.wait_for_state(client, ("ready", "error"))
    assert status["state"] == "ready", status["message"]
    assert loading == "loading", "the model loaded before the automatic request's bound: nothing was shown"
    assert status["requests"]["waitedForModel"] == 1 and status["requests"]["notReady"] == 1
    assert len(result.items) == 1 and result.items[0].insert_text
    # The editor was shown the load meanwhile.
    assert any(isinstance(report, types.WorkDoneProgressBegin)
               for reports in client.progress_reports.values() for report in reports)


async def test_the_threads_setting_reaches_the_loaded_model(client: LanguageClient, parafill_lsp,
                                                          parafill_tiny_model):
    await client.initialize_session(parafill_lsp.init_params(parafill_tiny_model, {"threads": 1}))
    status = await parafill_lsp.wait_for_state(client)
    assert status["engine"]["threads"] == 1 and status["settings"]["threads"] == 1
    parafill_lsp.configure(client, {"parafill": {"threads": 2}})
    for _ in range(200):
        status = await parafill_lsp.status(client)
        if status["engine"]["threads"] == 2:
            break
        await asyncio.sleep(0.05)
    assert status["engine"]["threads"] == 2
    assert "budgetCuts" in status["engine"]
