"""Bad input never crashes or hangs the server: an empty result, or a JSON-RPC
InvalidParams error for params that do not match their type.

Unknown URIs, positions past the end, empty documents, a 1 MB line and control
characters get an empty result or an item at a clamped position; a negative
line or a string for a number gets InvalidParams (plain pygls 2.1.1 leaves such
a request unanswered). The server answers `parafill/status` afterwards.
"""
from __future__ import annotations

import asyncio
import os
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest
import pytest_lsp
from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams
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


def send_raw_request(client, method: str, params: dict) -> asyncio.Future:
    """Send params as raw JSON (the client's own types would refuse to build these)."""
    send_raw_request.count += 1
    msg_id = f"raw-{send_raw_request.count}"
    reply: Future = Future()
    client.protocol._request_futures[msg_id] = reply  # where pygls matches the response
    client.protocol._send_data({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
    return asyncio.wrap_future(reply)


send_raw_request.count = 0


async def assert_alive(client, parafill_lsp) -> dict:
    status = await asyncio.wait_for(parafill_lsp.status(client), timeout=30)
    assert status["state"] == "ready"
    return status


def check_items(result, max_line: int) -> None:
    for item in result.items:
        assert isinstance(item.insert_text, str)
        assert 0 <= item.range.start.line <= max_line


async def test_unknown_uri_gets_an_empty_result(client: LanguageClient, parafill_lsp):
    result = await parafill_lsp.inline(client, "file:///never/opened.py", 0, 0)
    assert list(result.items) == []
    menu = await client.text_document_completion_async(types.CompletionParams(
        text_document=types.TextDocumentIdentifier(uri="file:///never/opened.py"), position=types.Position(line=3, character=1)))
    assert list(menu.items) == []
    await assert_alive(client, parafill_lsp)


async def test_positions_past_the_end_are_clamped(client: LanguageClient, parafill_lsp):
    uri = "file:///project/short.py"
    parafill_lsp.open(client, uri, "x = 1\ny = 2")
    for line, character in [(0, 999), (1, 10**6), (50, 0), (2**31 - 1, 2**31 - 1)]:
        result = await parafill_lsp.inline(client, uri, line, character)
        for item in result.items:
            expected = types.Position(line=0, character=5) if line == 0 else types.Position(line=1, character=5)
            assert item.range.start == expected
    assert (await assert_alive(client, parafill_lsp))["requests"]["errors"] == 0


async def test_empty_document(client: LanguageClient, parafill_lsp):
    uri = "file:///project/empty.py"
    parafill_lsp.open(client, uri, "")
    result = await parafill_lsp.inline(client, uri, 0, 0)
    check_items(result, 0)
    for item in result.items:
        assert item.range.start == types.Position(line=0, character=0)
    assert (await assert_alive(client, parafill_lsp))["requests"]["errors"] == 0


async def test_a_one_megabyte_line(client: LanguageClient, parafill_lsp):
    uri = "file:///project/minified.js"
    line = "var a=[" + "1," * 500_000 + "];"
    parafill_lsp.open(client, uri, line + "\n", language="javascript")
    result = await asyncio.wait_for(parafill_lsp.inline(client, uri, 0, len(line) // 2), timeout=60)
    check_items(result, 0)
    result = await asyncio.wait_for(parafill_lsp.inline(client, uri, 1, 0), timeout=60)
    check_items(result, 1)
    assert (await assert_alive(client, parafill_lsp))["requests"]["errors"] == 0


async def test_control_characters(client: LanguageClient, parafill_lsp):
    uri = "file:///project/control.py"
    text = "a = '\x00\x01\x1b[31m'\x0c\nb = '\x7f\u2028\ud7ff'\r\nc = 1\r"
    parafill_lsp.open(client, uri, text)
    for line, character in [(0, 3), (0, 8), (1, 6), (2, 5), (3, 0)]:
        result = await parafill_lsp.inline(client, uri, line, character)
        check_items(result, 3)
    assert (await assert_alive(client, parafill_lsp))["requests"]["errors"] == 0


@pytest.mark.parametrize("position", [
    {"line": -1, "character": 0},
    {"line": "three", "character": 0},
    {"line": 0},
    {"line": 0, "character": 2**40},
])
async def test_malformed_params_get_invalid_params(client: LanguageClient, parafill_lsp, position):
    params = {
        "textDocument": {"uri": "file:///project/short.py"},
        "position": position,
        "context": {"triggerKind": 1},
    }
    for method in (types.TEXT_DOCUMENT_INLINE_COMPLETION, types.TEXT_DOCUMENT_COMPLETION):
        reply = send_raw_request(client, method, params)
        with pytest.raises(JsonRpcInvalidParams) as caught:
            await asyncio.wait_for(reply, timeout=10)
        assert method in str(caught.value.message)
    await assert_alive(client, parafill_lsp)
