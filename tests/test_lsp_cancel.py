"""Superseded and cancelled work: a newer request or an edit wins, $/cancelRequest is
honoured, and cancelled work stops between denoising steps instead of holding the
model thread.

The slow settings (a 128-token block span, as many steps as it needs) make one
completion take hundreds of denoising steps, far longer than a message takes to
arrive, so the later message always lands while the first is still running.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest
import pytest_lsp
from lsprotocol import types
from pygls.exceptions import JsonRpcRequestCancelled
from pytest_lsp import ClientServerConfig, LanguageClient

REPO = Path(__file__).resolve().parents[1]
CONFIG = ClientServerConfig(
    server_command=[sys.executable, "-m", "lsp_server", "serve", "--device", "cpu"],
    server_env={**os.environ, "PYTHONPATH": str(REPO)},
)
pytestmark = pytest.mark.asyncio(loop_scope="module")

SLOW = {"spanTokensBlock": 128, "spanTokensLine": 128, "steps": 0, "confidenceThreshold": 1.0, "debounceMs": 0}


@pytest_lsp.fixture(config=CONFIG, scope="module")
async def client(lsp_client: LanguageClient, parafill_lsp, parafill_tiny_model):
    await lsp_client.initialize_session(parafill_lsp.init_params(parafill_tiny_model, SLOW))
    await parafill_lsp.wait_for_state(lsp_client)
    yield
    await lsp_client.shutdown_session()


def source(tag: str) -> str:
    # A distinct document per test, so no cache answers for the model.
    return f"# {tag}\nimport os\n\n\ndef handle_{tag}(path):\n    \n"


async def test_a_newer_request_supersedes_the_running_one(client: LanguageClient, parafill_lsp):
    uri = "file:///project/newer.py"
    parafill_lsp.open(client, uri, source("newer"))
    before = await parafill_lsp.status(client)
    first = asyncio.ensure_future(parafill_lsp.inline(client, uri, 5, 4))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(parafill_lsp.inline(client, uri, 4, 8))
    first_result, _ = await asyncio.gather(first, second)
    assert list(first_result.items) == []
    after = await parafill_lsp.status(client)
    assert after["requests"]["superseded"] == before["requests"]["superseded"] + 1


async def test_an_edit_supersedes_the_running_request(client: LanguageClient, parafill_lsp):
    uri = "file:///project/edit.py"
    text = source("edit")
    parafill_lsp.open(client, uri, text)
    before = await parafill_lsp.status(client)
    pending = asyncio.ensure_future(parafill_lsp.inline(client, uri, 5, 4))
    await asyncio.sleep(0.05)
    parafill_lsp.replace_all(client, uri, text + "x = 1\n", version=2)
    result = await pending
    assert list(result.items) == []
    after = await parafill_lsp.status(client)
    assert after["requests"]["superseded"] == before["requests"]["superseded"] + 1


async def test_cancel_request_stops_the_denoiser_between_steps(client: LanguageClient, parafill_lsp):
    uri = "file:///project/cancel.py"
    parafill_lsp.open(client, uri, source("cancel"))
    before = await parafill_lsp.status(client)
    params = types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(line=5, character=4),
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked))
    pending = asyncio.wrap_future(client.protocol.send_request(
        types.TEXT_DOCUMENT_INLINE_COMPLETION, params, msg_id="cancel-me"))
    await asyncio.sleep(0.3)  # let it start on the model thread
    client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id="cancel-me"))
    with pytest.raises(JsonRpcRequestCancelled):
        await pending

    # The model thread is free again at once: a fast request on another document
    # is answered although the cancelled one had hundreds of steps left.
    parafill_lsp.configure(client, {**parafill_lsp.fast_settings, **{"debounceMs": 0}})
    parafill_lsp.open(client, "file:///project/after.py", "def f(x):\n    return x\n")
    started = time.monotonic()
    await parafill_lsp.inline(client, "file:///project/after.py", 1, 12)
    after = await parafill_lsp.status(client)
    parafill_lsp.configure(client, SLOW)
    assert after["requests"]["cancelled"] == before["requests"]["cancelled"] + 1
    # The engine saw the cancellation: it stopped between denoising steps.
    assert after["engine"]["cancelled"] == before["engine"]["cancelled"] + 1
    assert after["engine"]["answered"]["model"] == before["engine"]["answered"]["model"] + 1
    assert time.monotonic() - started < 30


async def test_requests_on_two_documents_share_denoising_steps(client: LanguageClient, parafill_lsp):
    # Two documents, two requests in flight together: the server hands both to the
    # engine at once and the batcher runs their spans in the same forward passes.
    uris = ["file:///project/batch_a.py", "file:///project/batch_b.py"]
    for uri in uris:
        parafill_lsp.open(client, uri, source(uri[-4]))
    before = (await parafill_lsp.status(client))["engine"]["batching"]
    results = await asyncio.gather(*(parafill_lsp.inline(client, uri, 5, 4) for uri in uris))
    after = (await parafill_lsp.status(client))["engine"]["batching"]
    assert all(result is not None for result in results)
    assert after["requests"] >= before["requests"] + 2  # a span that fills up grows once more
    assert after["sharedSteps"] > before["sharedSteps"]
    assert after["maxBatch"] >= 2
