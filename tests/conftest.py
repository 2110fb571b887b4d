"""Shared fixtures. Keep each one small and clearly named after what it gives.

`parafill_tiny_model`: a tiny random native model directory, built once per session.
`parafill_lsp`: helpers for the end-to-end LSP tests (tests/test_lsp_*.py), which
talk to a real `python -m lsp_server serve` over stdio with pytest-lsp.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from lsprotocol import types

from tools.bench import plain_json as _plain

# CI has 2 cores and many tests start a server process: one torch thread each
# keeps them from fighting over the cores (set before anything imports torch).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Compiling span steps takes seconds of CPU per shape in the background; tests/test_cpu_compile.py
# turns it on where it is the subject.
os.environ.setdefault("PARAFILL_CPU_COMPILE", "off")

REPO = Path(__file__).resolve().parents[1]

# The model is named in initializationOptions (it exists by the time the client
# initializes), so one static command serves every LSP test.
PARAFILL_SERVE = [sys.executable, "-m", "lsp_server", "serve", "--device", "cpu"]
PARAFILL_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
}
# Short spans and few steps: random weights write junk anyway, and CI has 2 cores.
# minConfidence 0: the tiny random model is never sure, and these tests need its items.
# latencyBudgetMs 0: a busy CI machine must not turn a whole answer into a cut one.
FAST_SETTINGS = {"spanTokensLine": 8, "spanTokensBlock": 8, "steps": 4, "debounceMs": 0, "contextTokens": 256,
                 "minConfidence": 0, "latencyBudgetMs": 0}


@pytest.fixture(scope="session")
def parafill_tiny_model(tmp_path_factory) -> Path:
    from tools.tiny_native import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("parafill-tiny-model"))


def _init_params(model_dir: Path | str | None, settings: dict | None = None, *, progress: bool = True,
                 encodings: list[str] | None = None, raw_options=None) -> types.InitializeParams:
    options = raw_options
    if options is None:
        options = {"parafill": {**FAST_SETTINGS, **({"model": str(model_dir)} if model_dir else {}), **(settings or {})}}
    return types.InitializeParams(
        capabilities=types.ClientCapabilities(
            window=types.WindowClientCapabilities(work_done_progress=progress),
            workspace=types.WorkspaceClientCapabilities(configuration=True, did_change_configuration=types.DidChangeConfigurationClientCapabilities()),
            general=types.GeneralClientCapabilities(position_encodings=encodings) if encodings else None,
            text_document=types.TextDocumentClientCapabilities(
                inline_completion=types.InlineCompletionClientCapabilities(),
                completion=types.CompletionClientCapabilities(),
                synchronization=types.TextDocumentSyncClientCapabilities(),
            ),
        ),
        initialization_options=options,
    )


async def _status(client) -> dict:
    return _plain(await client.protocol.send_request_async("parafill/status", {}))


async def _wait_for_state(client, states=("ready",), timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = await _status(client)
        if status["state"] in states:
            return status
        assert time.monotonic() < deadline, f"server still {status['state']!r} after {timeout} s: {status['message']}"
        await asyncio.sleep(0.2)


def _open(client, uri: str, text: str, language: str = "python", version: int = 1) -> None:
    client.text_document_did_open(types.DidOpenTextDocumentParams(
        text_document=types.TextDocumentItem(uri=uri, language_id=language, version=version, text=text)))


def _replace_all(client, uri: str, text: str, version: int) -> None:
    client.text_document_did_change(types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
        content_changes=[types.TextDocumentContentChangeWholeDocument(text=text)]))


async def _inline(client, uri: str, line: int, character: int, *, automatic: bool = False,
                  selected: tuple[types.Range, str] | None = None):
    kind = types.InlineCompletionTriggerKind.Automatic if automatic else types.InlineCompletionTriggerKind.Invoked
    info = types.SelectedCompletionInfo(range=selected[0], text=selected[1]) if selected else None
    return await client.text_document_inline_completion_async(types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri),
        position=types.Position(line=line, character=character),
        context=types.InlineCompletionContext(trigger_kind=kind, selected_completion_info=info)))


def _configure(client, settings) -> None:
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings=settings))


@pytest.fixture(scope="session")
def parafill_lsp() -> SimpleNamespace:
    """Helpers for driving the parafill server from a pytest-lsp client."""
    return SimpleNamespace(
        serve=PARAFILL_SERVE, env=PARAFILL_ENV, fast_settings=FAST_SETTINGS, init_params=_init_params,
        status=_status, wait_for_state=_wait_for_state, open=_open, replace_all=_replace_all,
        inline=_inline, configure=_configure,
    )
