"""Code files changed on disk outside the editor: the server asks the editor to watch them
(`client/registerCapability` for `workspace/didChangeWatchedFiles`, when the editor allows
it and drafts are on), and the drafts index follows what the editor then reports."""
from __future__ import annotations

import asyncio
import time

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

from tests.conftest import PARAFILL_ENV, PARAFILL_SERVE

CONFIG = ClientServerConfig(server_command=PARAFILL_SERVE, server_env=PARAFILL_ENV)
pytestmark = pytest.mark.asyncio(loop_scope="module")
# Enough code around the lines under test that the walk does not skip a file as too small.
FILLER = "".join(f"def helper_{i}(value):\n    return value * {i}\n\n" for i in range(8))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("workspace")
    (root / "first.py").write_text("total = add_numbers(left, right)\n" + FILLER)
    return root


@pytest_lsp.fixture(config=CONFIG, scope="module")
async def client(lsp_client: LanguageClient, parafill_lsp, parafill_tiny_model, workspace):
    lsp_client.registrations = []

    @lsp_client.feature(types.CLIENT_REGISTER_CAPABILITY)
    def register(params: types.RegistrationParams) -> None:
        lsp_client.registrations.extend(params.registrations)

    params = parafill_lsp.init_params(parafill_tiny_model)
    params.capabilities.workspace.did_change_watched_files = types.DidChangeWatchedFilesClientCapabilities(
        dynamic_registration=True)
    params.root_uri = workspace.as_uri()
    await lsp_client.initialize_session(params)
    await parafill_lsp.wait_for_state(lsp_client)
    yield
    await lsp_client.shutdown_session()


async def _wait_documents(parafill_lsp, client, documents: int) -> dict:
    deadline = time.monotonic() + 60
    while True:
        index = (await parafill_lsp.status(client))["drafts"]["index"]
        if not index["indexing"] and index["documents"] == documents:
            return index
        assert time.monotonic() < deadline, f"index still {index}"
        await asyncio.sleep(0.1)


async def test_the_server_asks_the_editor_to_watch_code_files(client):
    deadline = time.monotonic() + 10
    while not client.registrations:
        assert time.monotonic() < deadline, "no client/registerCapability arrived"
        await asyncio.sleep(0.05)
    (registration,) = client.registrations
    assert registration.method == types.WORKSPACE_DID_CHANGE_WATCHED_FILES
    (watcher,) = registration.register_options["watchers"]
    glob = watcher["globPattern"]
    assert glob.startswith("**/*.{") and {"py", "ts", "rs", "go"} <= set(glob[len("**/*.{"):-1].split(","))
    assert "txt" not in glob.split(",") and "env" not in glob


async def test_files_created_changed_and_deleted_on_disk_reach_the_index(client, parafill_lsp, workspace):
    await _wait_documents(parafill_lsp, client, 1)
    created = workspace / "second.py"
    created.write_text("result = multiply_values(first, second)\n" + FILLER)
    client.workspace_did_change_watched_files(types.DidChangeWatchedFilesParams(
        changes=[types.FileEvent(uri=created.as_uri(), type=types.FileChangeType.Created)]))
    await _wait_documents(parafill_lsp, client, 2)
    # A request whose line starts like the new file's code now carries a draft from it.
    before = (await parafill_lsp.status(client))["drafts"]["proposed"]
    parafill_lsp.open(client, "untitled:uses.py", "def g(first, second):\n    result = multiply_\n")
    await parafill_lsp.inline(client, "untitled:uses.py", 1, len("    result = multiply_"))
    assert (await parafill_lsp.status(client))["drafts"]["proposed"] == before + 1
    created.unlink()
    client.workspace_did_change_watched_files(types.DidChangeWatchedFilesParams(
        changes=[types.FileEvent(uri=created.as_uri(), type=types.FileChangeType.Deleted)]))
    await _wait_documents(parafill_lsp, client, 2)  # the open untitled document stays
