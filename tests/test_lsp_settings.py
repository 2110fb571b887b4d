"""Settings from initializationOptions and workspace/didChangeConfiguration.

Both `{"parafill": {...}}` and flat objects are read; an unknown key or a value
of the wrong type or range gets a window/showMessage warning naming it, and the
previous value is kept. The effective settings show in `parafill/status`.
"""
from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

from lsp_server.settings import Settings

REPO = Path(__file__).resolve().parents[1]
CONFIG = ClientServerConfig(
    server_command=[sys.executable, "-m", "lsp_server", "serve", "--device", "cpu"],
    server_env={**os.environ, "PYTHONPATH": str(REPO)},
)
pytestmark = pytest.mark.asyncio(loop_scope="module")

BAD_INIT = {"steps": "many", "colour": "blue", "debounceMs": 40, "confidenceThreshold": 0.75}


@pytest_lsp.fixture(config=CONFIG, scope="module")
async def client(lsp_client: LanguageClient, parafill_lsp, parafill_tiny_model):
    await lsp_client.initialize_session(parafill_lsp.init_params(parafill_tiny_model, BAD_INIT))
    await parafill_lsp.wait_for_state(lsp_client)
    yield
    await lsp_client.shutdown_session()


async def settings_now(client, parafill_lsp) -> dict:
    return (await parafill_lsp.status(client))["settings"]


async def warnings_after(client, count: int, timeout: float = 10.0) -> list[str]:
    for _ in range(int(timeout / 0.05)):
        if len(client.messages) >= count:
            break
        await asyncio.sleep(0.05)
    return [m.message for m in client.messages if m.type == types.MessageType.Warning]


async def test_initialization_options_are_read_and_bad_ones_reported(client: LanguageClient, parafill_lsp):
    settings = await settings_now(client, parafill_lsp)
    assert settings["debounceMs"] == 40
    assert settings["confidenceThreshold"] == 0.75
    assert settings["steps"] == Settings().steps  # "many" rejected: the default kept
    text = "\n".join(await warnings_after(client, 1))
    assert "'steps'" in text and "whole number" in text
    assert "'colour'" in text and "unknown setting" in text


async def test_a_problem_sent_again_is_not_shown_again(client: LanguageClient, parafill_lsp, parafill_tiny_model):
    # Neovim sends its settings in initializationOptions and again, unchanged, in
    # didChangeConfiguration right after initialize: the user must see each problem once.
    await warnings_after(client, 1)
    seen = len(client.messages)
    same = parafill_lsp.init_params(parafill_tiny_model, BAD_INIT).initialization_options
    parafill_lsp.configure(client, same)
    parafill_lsp.configure(client, {"parafill": {**same["parafill"], "maxSnippets": 99}})
    for _ in range(200):
        if any("'maxSnippets'" in m.message for m in client.messages[seen:]):
            break
        await asyncio.sleep(0.05)
    shown = [m.message for m in client.messages[seen:]]
    assert len(shown) == 1, shown
    assert "'maxSnippets'" in shown[0] and "'steps'" not in shown[0] and "'colour'" not in shown[0]


async def test_did_change_configuration_nested_and_flat(client: LanguageClient, parafill_lsp):
    parafill_lsp.configure(client, {"parafill": {"spanTokensLine": 12, "enabledLanguages": ["python"]}})
    settings = await settings_now(client, parafill_lsp)
    assert settings["spanTokensLine"] == 12
    assert settings["enabledLanguages"] == ["python"]
    # Layered over the initialization options, not over the previous change.
    assert settings["debounceMs"] == 40

    parafill_lsp.configure(client, {"maxSnippets": 0, "verboseLogging": False})
    settings = await settings_now(client, parafill_lsp)
    assert settings["maxSnippets"] == 0
    assert settings["spanTokensLine"] == parafill_lsp.fast_settings["spanTokensLine"]


async def test_bad_values_in_a_change_are_reported_and_the_old_value_kept(client: LanguageClient, parafill_lsp):
    seen = len(client.messages)
    parafill_lsp.configure(client, {"parafill": {
        "confidenceThreshold": 3, "device": "tpu", "enabledLanguages": "python", "debounceMs": -5, "contextTokens": 512,
    }})
    settings = await settings_now(client, parafill_lsp)
    assert settings["confidenceThreshold"] == 0.75
    assert settings["device"] == "cpu"
    assert settings["debounceMs"] == 40
    assert settings["enabledLanguages"] == []
    assert settings["contextTokens"] == 512  # the good value in the same change is taken
    text = "\n".join((await warnings_after(client, seen + 1))[-1:])
    for key in ("confidenceThreshold", "device", "enabledLanguages", "debounceMs"):
        assert repr(key) in text
    assert (await parafill_lsp.status(client))["state"] == "ready"


async def test_not_an_object_is_reported_and_defaults_stay(client: LanguageClient, parafill_lsp):
    seen = len(client.messages)
    parafill_lsp.configure(client, {"parafill": ["steps", 3]})
    text = "\n".join(await warnings_after(client, seen + 1))
    assert "must be an object" in text
    assert (await settings_now(client, parafill_lsp))["debounceMs"] == 40


async def test_enabled_languages_limits_suggestions(client: LanguageClient, parafill_lsp):
    parafill_lsp.configure(client, {"parafill": {"enabledLanguages": ["rust"]}})
    parafill_lsp.open(client, "file:///project/off.py", "def f(x):\n    return x\n")
    before = await parafill_lsp.status(client)
    result = await parafill_lsp.inline(client, "file:///project/off.py", 1, 12)
    after = await parafill_lsp.status(client)
    parafill_lsp.configure(client, {"parafill": {}})
    assert list(result.items) == []
    assert after["requests"]["empty"] == before["requests"]["empty"] + 1
    assert after["engine"]["requests"] == before["engine"]["requests"]  # the model was not asked
