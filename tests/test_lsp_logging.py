"""The server's log (here --log-file at debug level) holds no source text or
suggestions unless `verboseLogging` is on.

The selected completion menu item is echoed at the start of the inline item,
so a secret typed there would reach the log through pygls's message tracing if
it were let through.
"""
from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

REPO = Path(__file__).resolve().parents[1]
LOG_FILE = Path(tempfile.gettempdir()) / f"parafill-test-lsp-logging-{os.getpid()}.log"
CONFIG = ClientServerConfig(
    server_command=[sys.executable, "-m", "lsp_server", "serve", "--device", "cpu",
                    "--log-level", "debug", "--log-file", str(LOG_FILE)],
    server_env={**os.environ, "PYTHONPATH": str(REPO)},
)
pytestmark = pytest.mark.asyncio(loop_scope="module")

SECRET = "hunter2_SECRET_in_source"
URI = "file:///project/secret.py"


@pytest_lsp.fixture(config=CONFIG, scope="module")
async def client(lsp_client: LanguageClient, parafill_lsp, parafill_tiny_model):
    await lsp_client.initialize_session(parafill_lsp.init_params(parafill_tiny_model))
    await parafill_lsp.wait_for_state(lsp_client)
    yield
    await lsp_client.shutdown_session()
    LOG_FILE.unlink(missing_ok=True)


async def ask_with_secret(client, parafill_lsp) -> int:
    """Inline requests whose items start with SECRET; returns how many items came back."""
    items = 0
    for n, prefix in enumerate(["value = ", "result = compute(", "    return ", "x = [", "name = os."]):
        text = f"import os\n{SECRET} = 1\n{prefix}hu\n"
        if n == 0:
            parafill_lsp.open(client, URI, text)
        else:
            parafill_lsp.replace_all(client, URI, text, version=n + 1)
        start = len(prefix)
        selected = types.Range(start=types.Position(line=2, character=start), end=types.Position(line=2, character=start + 2))
        result = await parafill_lsp.inline(client, URI, 2, start + 2, selected=(selected, SECRET))
        items += len(result.items)
        for item in result.items:
            assert item.insert_text.startswith(SECRET)
    return items


async def test_no_source_text_in_the_log_unless_verbose(client: LanguageClient, parafill_lsp):
    items = await ask_with_secret(client, parafill_lsp)
    assert items, "no item came back, so nothing could have leaked; the test proves nothing"
    await asyncio.sleep(0.2)
    log = LOG_FILE.read_text(encoding="utf-8")
    assert "inline file:///project/secret.py:2:" in log  # the server does log its requests
    assert SECRET not in log

    parafill_lsp.configure(client, {"parafill": {**parafill_lsp.fast_settings, "verboseLogging": True}})
    await ask_with_secret(client, parafill_lsp)
    await asyncio.sleep(0.2)
    assert SECRET in LOG_FILE.read_text(encoding="utf-8")
