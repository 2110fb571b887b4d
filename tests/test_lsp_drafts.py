"""Drafts over a real LSP session: the workspace folder is read in the background,
requests carry drafts the model judges, `parafill/status` counts them, and the
`repoDrafts` setting turns it all off."""
from __future__ import annotations

import asyncio
import time

import pytest
import pytest_lsp
from pytest_lsp import ClientServerConfig, LanguageClient

from tests.conftest import PARAFILL_ENV, PARAFILL_SERVE

CONFIG = ClientServerConfig(server_command=PARAFILL_SERVE, server_env=PARAFILL_ENV)
pytestmark = pytest.mark.asyncio(loop_scope="module")
FILLER = "".join(f"def helper_{i}(value):\n    return value * {i}\n\n" for i in range(8))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("workspace")
    (root / "shapes.py").write_text("area = compute_area(width, height, scale=2)\n" + FILLER)
    return root


async def _wait_indexed(parafill_lsp, client, documents: int) -> dict:
    deadline = time.monotonic() + 60
    while True:
        status = await parafill_lsp.status(client)
        index = status["drafts"]["index"]
        if not index["indexing"] and index["documents"] >= documents:
            return status
        assert time.monotonic() < deadline, f"index still {index}"
        await asyncio.sleep(0.1)


@pytest_lsp.fixture(config=CONFIG, scope="module")
async def client(lsp_client: LanguageClient, parafill_lsp, parafill_tiny_model, workspace):
    params = parafill_lsp.init_params(parafill_tiny_model)
    params.root_uri = workspace.as_uri()
    await lsp_client.initialize_session(params)
    await parafill_lsp.wait_for_state(lsp_client)
    yield
    await lsp_client.shutdown_session()


async def test_a_request_whose_line_starts_like_workspace_code_carries_a_draft(client, parafill_lsp):
    status = await _wait_indexed(parafill_lsp, client, 1)
    assert status["drafts"]["index"]["folders"] == 1
    uri = "untitled:drafted.py"
    parafill_lsp.open(client, uri, "def f(width, height):\n    area = compute_\n")
    await parafill_lsp.inline(client, uri, 1, len("    area = compute_"))
    status = await parafill_lsp.status(client)
    drafts = status["drafts"]
    assert drafts["proposed"] == 1
    assert drafts["accepted"] + drafts["repaired"] + drafts["rejected"] == 1
    assert status["stepsPerRequest"] >= 1
    # A line with nothing like it in your code proposes nothing.
    parafill_lsp.open(client, "untitled:plain.py", "zzz_unrelated = qqq\n", version=1)
    await parafill_lsp.inline(client, "untitled:plain.py", 0, len("zzz_unrelated = qqq"))
    assert (await parafill_lsp.status(client))["drafts"]["proposed"] == 1


async def test_repo_drafts_off_sends_no_draft_and_forgets_the_index(client, parafill_lsp):
    parafill_lsp.configure(client, {"parafill": {"repoDrafts": False}})
    before = (await parafill_lsp.status(client))["drafts"]["proposed"]
    uri = "untitled:off.py"
    parafill_lsp.open(client, uri, "def g(width, height):\n    area = compute_\n")
    await parafill_lsp.inline(client, uri, 1, len("    area = compute_"))
    status = await parafill_lsp.status(client)
    assert status["drafts"]["proposed"] == before
    assert status["settings"]["repoDrafts"] is False
    deadline = time.monotonic() + 30
    while (await parafill_lsp.status(client))["drafts"]["index"]["documents"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
