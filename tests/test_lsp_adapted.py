"""A model adapted to a repository answers for documents under it, and only there; a named model wins."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import pytest_lsp
from pytest_lsp import ClientServerConfig, LanguageClient

from tests.conftest import PARAFILL_ENV, PARAFILL_SERVE

CACHE = Path(tempfile.mkdtemp(prefix="parafill-adapted-cache-"))
CONFIG = ClientServerConfig(server_command=PARAFILL_SERVE, server_env={**PARAFILL_ENV, "PARAFILL_CACHE": str(CACHE)})
pytestmark = pytest.mark.asyncio(loop_scope="module")
SOURCE = "def count_words(text):\n    words = text.split()\n    return len(words)\n"


@pytest_lsp.fixture(config=CONFIG, loop_scope="module")
async def client(lsp_client: LanguageClient):
    yield lsp_client
    await lsp_client.shutdown_session()


async def test_the_adapted_model_answers_under_its_repository_only(client: LanguageClient, parafill_lsp,
                                                                   parafill_tiny_model, tmp_path, monkeypatch):
    from denoiser.adapted import RECORD, adapted_dir

    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    (repo / "pkg").mkdir(parents=True)
    elsewhere.mkdir()
    monkeypatch.setenv("PARAFILL_CACHE", str(CACHE))
    adapted = adapted_dir(repo)
    shutil.copytree(parafill_tiny_model, adapted)
    (adapted / RECORD).write_text(json.dumps({"repository": str(repo.resolve())}))

    await client.initialize_session(parafill_lsp.init_params(None))  # no model named: the embedded one
    assert (await parafill_lsp.wait_for_state(client))["state"] == "ready"
    inside, outside = (repo / "pkg" / "a.py").as_uri(), (elsewhere / "b.py").as_uri()
    parafill_lsp.open(client, inside, SOURCE)
    parafill_lsp.open(client, outside, SOURCE)

    await parafill_lsp.inline(client, inside, 2, 4)
    status = await parafill_lsp.status(client)
    assert status["answeredBy"] == adapted.name
    assert status["adaptedModels"] == [{"directory": str(adapted), "name": adapted.name}]
    await parafill_lsp.inline(client, outside, 2, 4)
    assert (await parafill_lsp.status(client))["answeredBy"] == "default_model"

    parafill_lsp.configure(client, {"parafill": {**parafill_lsp.fast_settings, "model": str(parafill_tiny_model)}})
    status = await parafill_lsp.wait_for_state(client)
    for _ in range(100):  # the reload has begun once the model named in the settings is the one loaded
        if status.get("model") == parafill_tiny_model.name and status["state"] == "ready":
            break
        status = await parafill_lsp.status(client)
    await parafill_lsp.inline(client, inside, 2, 4)
    assert (await parafill_lsp.status(client))["answeredBy"] == parafill_tiny_model.name
