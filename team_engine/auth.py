"""The engine's bearer token: where it comes from, and the check every request passes first.

The token comes from `PARAFILL_ENGINE_TOKEN`, or from a token file (created with a
fresh random token, readable by its owner only, when it does not exist yet). The
engine keeps only its SHA-256 digest and compares digests in constant time, so
neither the token nor a timing difference leaks from the check. `TokenGate` is
the check of one request's headers; `proxy_middlewares` puts the same check in
front of Ray Serve's HTTP proxy, so even the proxy's own routes (`/-/routes`,
`/-/healthz`) answer 401 without the token. No model work happens before it.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import time
from pathlib import Path
from typing import Iterable

TOKEN_ENV = "PARAFILL_ENGINE_TOKEN"
# What the proxy middleware reads in the engine's own Ray processes (a digest, never the token).
DIGEST_ENV = "PARAFILL_ENGINE_TOKEN_SHA256"
# Where the middleware finds the digest on a cluster started by someone else (Ray's key-value store).
DIGEST_KV_KEY = b"parafill/engine-token-sha256"
DIGEST_KV_NAMESPACE = "parafill"
MIN_TOKEN_CHARS = 16
UNAUTHORIZED_MESSAGE = ("this engine needs the team's token: send `Authorization: Bearer TOKEN` "
                        "(parafill reads it from PARAFILL_ENGINE_TOKEN or the engineTokenFile setting)")


class TokenError(Exception):
    """No usable token; the message says how to give one."""


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def read_token_file(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise TokenError(f"{path}: cannot read the token file ({exc.strerror or exc})") from None
    if not token:
        raise TokenError(f"{path}: the token file is empty")
    return token


def create_token_file(path: Path) -> str:
    """A fresh random token written to `path` (mode 0600; its folder is created 0700)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    return token


def engine_token(token_file: str | Path | None, *, create: bool) -> tuple[str, str]:
    """(token, where it came from): `PARAFILL_ENGINE_TOKEN` first, else the token file
    (made when missing and `create`). Raises TokenError with the fix."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    source = TOKEN_ENV
    if not token:
        if not token_file:
            raise TokenError(f"the engine needs a token: set {TOKEN_ENV}, or pass --token-file FILE "
                             "(a file that does not exist yet gets a fresh random token)")
        path = Path(token_file).expanduser()
        if path.exists():
            token = read_token_file(path)
            mode = path.stat().st_mode
            if mode & (stat.S_IRGRP | stat.S_IROTH):
                raise TokenError(f"{path}: other users can read this token file; run `chmod 600 {path}`")
        elif create:
            token = create_token_file(path)
        else:
            raise TokenError(f"{path}: no such token file")
        source = str(path)
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenError(f"the token from {source} is too short ({len(token)} characters; at least "
                         f"{MIN_TOKEN_CHARS}): `python -c 'import secrets; print(secrets.token_urlsafe(32))'` makes one")
    return token, source


def bearer(headers: Iterable[tuple[str, str]]) -> str | None:
    """The bearer token of `Authorization: Bearer ...` among (lower-case name, value) headers."""
    for name, value in headers:
        if name == "authorization":
            scheme, _, credentials = value.strip().partition(" ")
            return credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None
    return None


class TokenGate:
    """Whether a request carries the engine's token (compared as SHA-256 digests, in constant time)."""

    def __init__(self, token_sha256: str | None):
        self.token_sha256 = token_sha256

    def allows(self, headers: Iterable[tuple[str, str]]) -> bool:
        presented = bearer(headers)
        if presented is None or not self.token_sha256:
            return False  # no token configured on this side: nothing is allowed (fail closed)
        return hmac.compare_digest(digest(presented), self.token_sha256)


# --- in front of Ray Serve's HTTP proxy --------------------------------------------------------

class _ProxyDigest:
    """The digest the proxy checks against: from the engine's environment, else Ray's key-value
    store (a cluster started by someone else), looked up again at most every few seconds."""

    REFRESH_S = 5.0

    def __init__(self) -> None:
        self._value: str | None = os.environ.get(DIGEST_ENV) or None
        self._fixed = self._value is not None
        self._checked = 0.0

    def get(self) -> str | None:
        if self._fixed or time.monotonic() - self._checked < self.REFRESH_S:
            return self._value
        self._checked = time.monotonic()
        try:
            from ray.experimental.internal_kv import _internal_kv_get  # inside a Ray process only

            raw = _internal_kv_get(DIGEST_KV_KEY, namespace=DIGEST_KV_NAMESPACE)
            self._value = raw.decode() if raw else None
        except Exception:  # not connected, or the store is unreachable: keep what we had
            pass
        return self._value


class BearerTokenMiddleware:
    """A plain ASGI middleware: every HTTP request without the token gets 401 before routing."""

    def __init__(self, app) -> None:
        self.app = app
        self._digest = _ProxyDigest()

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") == "http":
            headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers") or ()]
            if not TokenGate(self._digest.get()).allows(headers):
                await send_unauthorized(send)
                return
        elif scope.get("type") == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await self.app(scope, receive, send)


async def send_unauthorized(send) -> None:
    import json

    body = json.dumps({"error": UNAUTHORIZED_MESSAGE}).encode()
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b'Bearer realm="parafill"'),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def proxy_middlewares() -> list:
    """For RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=team_engine.auth.proxy_middlewares."""
    from starlette.middleware import Middleware

    return [Middleware(BearerTokenMiddleware)]
