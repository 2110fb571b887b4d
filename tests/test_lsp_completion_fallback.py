"""textDocument/completion, the fallback for clients without inline completion.

One item carries the whole suggestion as a text edit that starts at the cursor;
it is the same suggestion the inline feature gives at that cursor.
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

SOURCE = """class Counter:
    def __init__(self, start=0):
        self.value = start

    def increment(self, step=1):
        self.value += step
        return self.value
"""
URI = "file:///project/counter.py"
CURSORS = [(1, 32), (2, 20), (5, 14), (6, 15), (4, 4)]


@pytest_lsp.fixture(config=CONFIG, scope="module")
async def client(lsp_client: LanguageClient, parafill_lsp, parafill_tiny_model):
    await lsp_client.initialize_session(parafill_lsp.init_params(parafill_tiny_model))
    await parafill_lsp.wait_for_state(lsp_client)
    parafill_lsp.open(lsp_client, URI, SOURCE)
    yield
    await lsp_client.shutdown_session()


async def complete(client, line, character, kind=types.CompletionTriggerKind.Invoked):
    return await client.text_document_completion_async(types.CompletionParams(
        text_document=types.TextDocumentIdentifier(uri=URI),
        position=types.Position(line=line, character=character),
        context=types.CompletionContext(trigger_kind=kind)))


async def test_one_item_with_the_whole_suggestion_from_the_cursor(client: LanguageClient, parafill_lsp):
    answered = 0
    for line, character in CURSORS:
        result = await complete(client, line, character)
        assert isinstance(result, types.CompletionList)
        assert result.is_incomplete is True  # the suggestion changes with every keystroke
        assert len(result.items) <= 1
        inline = await parafill_lsp.inline(client, URI, line, character)
        assert len(inline.items) == len(result.items)
        for item, ghost in zip(result.items, inline.items):
            answered += 1
            cursor = types.Position(line=line, character=character)
            assert item.text_edit.range == types.Range(start=cursor, end=cursor)
            assert item.text_edit.new_text == ghost.insert_text
            assert item.label and "\n" not in item.label
            assert item.insert_text_format == types.InsertTextFormat.PlainText
    assert answered, "the server suggested nothing at any cursor"


async def test_trigger_kinds_other_than_invoked_are_answered_too(client: LanguageClient, parafill_lsp):
    line, character = CURSORS[0]
    invoked = await complete(client, line, character)
    incomplete = await complete(client, line, character, types.CompletionTriggerKind.TriggerForIncompleteCompletions)
    assert [i.text_edit.new_text for i in incomplete.items] == [i.text_edit.new_text for i in invoked.items]
    status = await parafill_lsp.status(client)
    assert status["requests"]["completion"] >= len(CURSORS) + 2
