"""textDocument/inlineCompletion over a real LSP session: items, debounce, selectedCompletionInfo.

The tiny model's weights are random, so the text is junk; these tests check the
protocol: an item carries insertText and a range at the cursor, Automatic
requests wait `debounceMs` and Invoked ones do not, and a selected menu item
is treated as already typed.
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
pytestmark = pytest.mark.asyncio(loop_scope="module")

SOURCE = """import os


def read_lines(path):
    with open(path) as handle:
        return [line.rstrip() for line in handle]


def count_words(text):
    words = text.split()
    return len(words)
"""
URI = "file:///project/words.py"
CURSORS = [(3, 21), (5, 15), (9, 24), (10, 10), (10, 4), (4, 8)]


@pytest_lsp.fixture(config=CONFIG, scope="module")
async def client(lsp_client: LanguageClient, parafill_lsp, parafill_tiny_model):
    await lsp_client.initialize_session(parafill_lsp.init_params(parafill_tiny_model))
    await parafill_lsp.wait_for_state(lsp_client)
    parafill_lsp.open(lsp_client, URI, SOURCE)
    yield
    await lsp_client.shutdown_session()


async def first_item(client, parafill_lsp, uri=URI):
    """(cursor, item) at the first cursor where the model suggests something."""
    for line, character in CURSORS:
        result = await parafill_lsp.inline(client, uri, line, character)
        if result.items:
            return (line, character), result.items[0]
    pytest.fail("no cursor produced a suggestion")


async def test_invoked_items_carry_insert_text_and_a_range_at_the_cursor(client: LanguageClient, parafill_lsp):
    answered = 0
    for line, character in CURSORS:
        result = await parafill_lsp.inline(client, URI, line, character)
        assert isinstance(result, types.InlineCompletionList)
        assert len(result.items) <= 1
        for item in result.items:
            answered += 1
            assert isinstance(item.insert_text, str) and item.insert_text
            assert item.range.start == types.Position(line=line, character=character)
            assert item.range.end == item.range.start
    assert answered, "the server suggested nothing at any cursor"
    status = await parafill_lsp.status(client)
    assert status["requests"]["inline"] >= len(CURSORS)
    assert status["requests"]["answered"] == answered


async def test_same_cursor_twice_gives_the_same_item_from_a_cache(client: LanguageClient, parafill_lsp):
    cursor, item = await first_item(client, parafill_lsp)
    again = await parafill_lsp.inline(client, URI, *cursor)
    assert [i.insert_text for i in again.items] == [item.insert_text]
    status = await parafill_lsp.status(client)
    assert status["cacheHitRate"] > 0


async def test_automatic_waits_for_the_debounce_and_invoked_does_not(client: LanguageClient, parafill_lsp):
    cursor, item = await first_item(client, parafill_lsp)  # now cached: the model costs ~nothing
    parafill_lsp.configure(client, {"parafill": {**parafill_lsp.fast_settings, "debounceMs": 1500}})
    try:
        started = time.monotonic()
        automatic = await parafill_lsp.inline(client, URI, *cursor, automatic=True)
        automatic_s = time.monotonic() - started
        started = time.monotonic()
        invoked = await parafill_lsp.inline(client, URI, *cursor)
        invoked_s = time.monotonic() - started
    finally:
        parafill_lsp.configure(client, {"parafill": parafill_lsp.fast_settings})
    assert automatic_s >= 1.5
    assert invoked_s < 1.5
    assert [i.insert_text for i in automatic.items] == [item.insert_text]
    assert [i.insert_text for i in invoked.items] == [item.insert_text]


async def test_selected_completion_is_treated_as_typed(client: LanguageClient, parafill_lsp):
    # The document with the menu item typed out, and the same document where the
    # menu shows "rstrip" over the typed "rs": the model sees the same text, so
    # the item is "rstrip" + the same suggestion, over the selected range.
    uri = "file:///project/selected.py"
    typed = "import os\n\nname = os.path.basename('x').rstrip"
    partial = "import os\n\nname = os.path.basename('x').rs"
    line = 2
    start = len(partial.splitlines()[2]) - 2
    parafill_lsp.open(client, uri, typed)
    plain = await parafill_lsp.inline(client, uri, line, len(typed.splitlines()[2]))
    if not plain.items:
        pytest.skip("the random model suggests nothing here; nothing to compare")
    parafill_lsp.replace_all(client, uri, partial, version=2)
    selected_range = types.Range(start=types.Position(line=line, character=start),
                                 end=types.Position(line=line, character=start + 2))
    result = await parafill_lsp.inline(client, uri, line, start + 2, selected=(selected_range, "rstrip"))
    assert len(result.items) == 1
    item = result.items[0]
    assert item.range == selected_range
    assert item.insert_text == "rstrip" + plain.items[0].insert_text
