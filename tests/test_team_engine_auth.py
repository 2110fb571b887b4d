"""The team engine's token and its check, and `parafill engine --help`, without Ray.

The token comes from PARAFILL_ENGINE_TOKEN or a file made readable by its owner
only; the check compares SHA-256 digests, and fails closed when no token is
configured. The proxy middleware answers 401 to a request without the token
before the wrapped application sees it. tests/test_team_engine.py checks the
same on a real Ray cluster.
"""
from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from team_engine.auth import (BearerTokenMiddleware, TokenError, TokenGate, bearer, digest, engine_token)
from team_engine.service import ReplicaService

REPO = Path(__file__).resolve().parents[1]


def test_a_token_file_is_made_for_its_owner_only_and_read_back(tmp_path, monkeypatch):
    monkeypatch.delenv("PARAFILL_ENGINE_TOKEN", raising=False)
    path = tmp_path / "config" / "engine.token"
    token, source = engine_token(path, create=True)
    assert source == str(path) and len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert engine_token(path, create=True) == (token, str(path))  # the same token next time
    path.chmod(0o644)
    with pytest.raises(TokenError, match="chmod 600"):
        engine_token(path, create=False)


def test_a_missing_or_short_token_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("PARAFILL_ENGINE_TOKEN", raising=False)
    with pytest.raises(TokenError, match="PARAFILL_ENGINE_TOKEN"):
        engine_token(None, create=True)
    with pytest.raises(TokenError, match="no such token file"):
        engine_token(tmp_path / "absent", create=False)
    monkeypatch.setenv("PARAFILL_ENGINE_TOKEN", "short")
    with pytest.raises(TokenError, match="too short"):
        engine_token(None, create=True)
    monkeypatch.setenv("PARAFILL_ENGINE_TOKEN", "x" * 20)
    assert engine_token(tmp_path / "unused", create=True) == ("x" * 20, "PARAFILL_ENGINE_TOKEN")
    assert not (tmp_path / "unused").exists()


def test_the_gate_takes_only_the_bearer_token_and_fails_closed():
    token = "the-right-token-0123456789"
    gate = TokenGate(digest(token))
    assert gate.allows([("authorization", f"Bearer {token}")])
    assert gate.allows([("authorization", f"bearer   {token} ")])
    for value in (f"Basic {token}", f"Bearer {token}x", "Bearer", "", token):
        assert not gate.allows([("authorization", value)]), value
    assert not gate.allows([])
    assert not TokenGate(None).allows([("authorization", f"Bearer {token}")])
    assert bearer([("x-other", "1"), ("authorization", "Bearer abc")]) == "abc"


def test_the_proxy_middleware_refuses_before_the_application_runs(monkeypatch):
    token = "the-right-token-0123456789"
    monkeypatch.setenv("PARAFILL_ENGINE_TOKEN_SHA256", digest(token))
    reached = []

    async def app(scope, receive, send):
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = BearerTokenMiddleware(app)

    def call(path, headers):
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "path": path, "headers": [(k.encode(), v.encode()) for k, v in headers]}
        asyncio.run(middleware(scope, receive, send))
        return sent[0]["status"], json.loads(sent[1]["body"]) if sent[0]["status"] == 401 else None

    for path in ("/-/routes", "/-/healthz", "/v1/fill", "/nowhere"):
        for headers in ([], [("authorization", "Bearer wrong-token-0123456789")]):
            status, body = call(path, headers)
            assert status == 401 and "token" in body["error"]
    assert reached == []
    assert call("/v1/health", [("authorization", f"Bearer {token}")])[0] == 200
    assert reached == ["/v1/health"]


def test_the_replica_checks_routes_and_bodies_before_the_model():
    assert ReplicaService.route("GET", "/v1/health") == ("/v1/health", None)
    assert ReplicaService.route("GET", "/v1/fill")[1][0] == 405
    assert ReplicaService.route("POST", "/v2/anything")[1][0] == 404
    assert ReplicaService.parse(b"not json")[1][0] == 400
    assert ReplicaService.parse(b"[1]")[1][0] == 400
    assert ReplicaService.parse(json.dumps({"document": "x" * 500}).encode())[1][0] == 400
    assert ReplicaService.parse(json.dumps({"document": "abc"}).encode()) == ({"document": "abc"}, None)
    # A request's whole work in one call (the replica's one thread hop) answers a bad body there too.
    service = ReplicaService(engine=None, token_sha256=digest("t" * 32))  # no model: none may be asked
    status, body = service.fill_request(b"not json", lambda: False)
    assert status == 400 and json.loads(body) == {"error": "the body is not JSON"}
    assert service.forget_request(b"[1]")[0] == 400


def test_engine_help_imports_neither_torch_nor_ray():
    script = ("import contextlib, io, json, sys\nfrom lsp_server.cli import main\ntext = io.StringIO()\n"
              "with contextlib.redirect_stdout(text):\n    try:\n        main(['engine', '--help'])\n"
              "    except SystemExit:\n        pass\n"
              "print(json.dumps({'help': text.getvalue(), 'heavy': [m for m in ('torch', 'ray') if m in sys.modules]}))")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout.strip().splitlines()[-1])
    assert "usage: parafill engine" in shown["help"] and "--replicas" in shown["help"]
    assert "--address" in shown["help"] and "--token-file" in shown["help"]
    assert shown["heavy"] == []
