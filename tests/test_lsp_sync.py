"""Incremental document sync with positions in UTF-16 code units (emoji take two).

The server's view of a document after incremental edits must equal the text the
client holds: a suggestion there is the same as in a freshly opened copy, and a
position past the end of a line is clamped to the line's UTF-16 length.
"""
from __future__ import annotations

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


def utf16(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


@pytest_lsp.fixture(config=CONFIG, scope="module")
async def client(lsp_client: LanguageClient, parafill_lsp, parafill_tiny_model):
    await lsp_client.initialize_session(parafill_lsp.init_params(parafill_tiny_model))
    await parafill_lsp.wait_for_state(lsp_client)
    yield
    await lsp_client.shutdown_session()


def change(client, uri, version, line, start, end, text):
    client.text_document_did_change(types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
        content_changes=[types.TextDocumentContentChangePartial(
            range=types.Range(start=types.Position(line=line, character=start),
                              end=types.Position(line=line, character=end)),
            text=text)]))


async def test_incremental_edits_after_emoji_use_utf16_columns(client: LanguageClient, parafill_lsp):
    uri = "file:///project/emoji.py"
    parafill_lsp.open(client, uri, 'label = "😀😀"\nname = "日本"\n')
    # Type after the emoji: columns count each emoji as two units.
    line0 = 'label = "😀😀"'
    change(client, uri, 2, 0, utf16(line0), utf16(line0), " + suffix")
    line0 += " + suffix"
    # Replace the second emoji (two units) by a word.
    at = utf16('label = "😀')
    change(client, uri, 3, 0, at, at + 2, "ok")
    line0 = 'label = "😀ok" + suffix'
    # Append on the CJK line (BMP characters: one unit each).
    line1 = 'name = "日本"'
    change(client, uri, 4, 1, utf16(line1), utf16(line1), "  # 🐍 x")
    line1 += "  # 🐍 x"
    expected = f"{line0}\n{line1}\n"

    # Ask past the end of each line: the item's range is clamped to the line's
    # UTF-16 length as the server sees it.
    edited = []
    for line, text in enumerate([line0, line1]):
        result = await parafill_lsp.inline(client, uri, line, 10_000)
        edited.append(result)
        for item in result.items:
            assert item.range.start == types.Position(line=line, character=utf16(text))

    # A fresh copy of the expected text, same URI: the same suggestions.
    client.text_document_did_close(types.DidCloseTextDocumentParams(text_document=types.TextDocumentIdentifier(uri=uri)))
    parafill_lsp.open(client, uri, expected, version=5)
    for line, text in enumerate([line0, line1]):
        fresh = await parafill_lsp.inline(client, uri, line, utf16(text))
        assert [(i.insert_text, i.range) for i in fresh.items] == [(i.insert_text, i.range) for i in edited[line].items]
    assert any(r.items for r in edited), "the server suggested nothing; nothing was compared"


async def test_a_position_inside_a_surrogate_pair_does_not_break_the_server(client: LanguageClient, parafill_lsp):
    uri = "file:///project/pair.py"
    parafill_lsp.open(client, uri, 's = "🐍🐍"\n')
    result = await parafill_lsp.inline(client, uri, 0, utf16('s = "') + 1)  # between the halves
    for item in result.items:
        assert item.range.start.character == utf16('s = "')  # snapped to the pair's start
    status = await parafill_lsp.status(client)
    assert status["requests"]["errors"] == 0
