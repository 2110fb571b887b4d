"""What one engine replica answers, apart from how requests reach it.

`ReplicaService` owns a denoiser `Engine` (the model, its context cache, its
device-fault fallbacks) and answers the engine's routes: `POST /v1/fill`,
`POST /v1/forget`, `GET /v1/health`, `GET /v1/status`. Every request passes
the token check first (`team_engine.auth`), whatever its route, so a request
without the token causes no model work. Typed-ahead and the completion cache
stay in the language server; the replica keeps only what must live beside the
model, the context keys and values of the documents routed to it. The Ray Serve
deployment (`team_engine.app`) and the stand-in engine the tests use
(`tools/stand_in_engine.py`) both wrap this class; it imports neither Ray nor a
web framework.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Callable, Iterable

from denoiser import wire
from team_engine.auth import UNAUTHORIZED_MESSAGE, TokenGate

log = logging.getLogger(__name__)

FILL, FORGET, HEALTH, STATUS = "/v1/fill", "/v1/forget", "/v1/health", "/v1/status"
ROUTES = {FILL: "POST", FORGET: "POST", HEALTH: "GET", STATUS: "GET"}
MAX_BODY_BYTES = 16 << 20  # a request carries at most the context window's text
MAX_DOCUMENT_KEY = 128
# The status a fill gets when its client went away (nobody reads it; nginx's convention).
CLIENT_CLOSED = 499

Answer = tuple[int, dict[str, Any]]


def json_answer(status: int, payload: dict[str, Any]) -> tuple[int, bytes]:
    return status, json.dumps(payload, separators=(",", ":")).encode()


class ReplicaService:
    def __init__(self, engine: Any, token_sha256: str | None, replica: str = ""):
        self.engine = engine
        self.gate = TokenGate(token_sha256)
        self.replica = replica or f"pid-{os.getpid()}"
        self.counts = dict(fills=0, answered=0, cancelled=0, errors=0, refused=0, forgets=0)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model: str | None, device: str, *, threads: int, token_sha256: str | None, replica: str = "",
             documents: int = 64, context_cache_mb: int = 512, max_batch: int | None = None,
             cpus: float | None = None) -> "ReplicaService":
        from denoiser.engine import Engine
        from denoiser.loading import load_backend

        backend = load_backend(model, device)
        cache = getattr(backend, "context_cache", None)
        if cache is not None:  # a shared engine holds many more documents than one editor's server
            cache.max_documents = max(cache.max_documents, documents)
            cache.max_bytes = max(cache.max_bytes, context_cache_mb << 20)
        batcher = getattr(backend, "batcher", None)
        # The fills one denoising step serves; a batcher captured in CUDA graphs keeps the rows it was built for.
        if max_batch and batcher is not None and getattr(batcher, "fixed_capacity", True) is None:
            batcher.max_batch = max_batch
        # The language server keeps typed-ahead and the completion cache: none here.
        engine = Engine(backend, cache_bytes=0, typed_ahead_bytes=0)
        engine.set_threads(threads)
        # A prefill beside a step runs 2 x `threads` threads: on a CPU, only where the replica's
        # CPU reservation (`cpus`, default `threads`) has room for both.
        if (hasattr(backend, "take_turns") and backend.device.type == "cpu"
                and 2 * threads > (cpus if cpus is not None else threads)):
            backend.take_turns()
        return cls(engine, token_sha256, replica)

    # --- the checks every request passes --------------------------------------------------
    def authorized(self, headers: Iterable[tuple[str, str]]) -> bool:
        if self.gate.allows(headers):
            return True
        self._count("refused")
        return False

    @staticmethod
    def unauthorized() -> Answer:
        return 401, {"error": UNAUTHORIZED_MESSAGE}

    @staticmethod
    def route(method: str, path: str) -> tuple[str | None, Answer | None]:
        """(route, None) for a known route and method; else (None, the error answer)."""
        path = "/" + path.strip("/")
        expected = ROUTES.get(path)
        if expected is None:
            return None, (404, {"error": f"no route {path}; the engine answers {', '.join(sorted(ROUTES))}"})
        if method != expected:
            return None, (405, {"error": f"{path} takes {expected}"})
        return path, None

    @staticmethod
    def parse(body: bytes) -> tuple[dict | None, Answer | None]:
        if len(body) > MAX_BODY_BYTES:
            return None, (413, {"error": f"the request is larger than {MAX_BODY_BYTES >> 20} MiB"})
        try:
            payload = json.loads(body or b"{}")
        except (ValueError, UnicodeDecodeError):
            return None, (400, {"error": "the body is not JSON"})
        if not isinstance(payload, dict):
            return None, (400, {"error": "the body must be a JSON object"})
        document = payload.get("document", "")
        if not isinstance(document, str) or len(document) > MAX_DOCUMENT_KEY:
            return None, (400, {"error": f"document must be a string of at most {MAX_DOCUMENT_KEY} characters"})
        return payload, None

    # --- the routes -------------------------------------------------------------------------
    def fill(self, payload: dict, is_cancelled: Callable[[], bool]) -> Answer:
        """Blocking: runs the model. `is_cancelled` turns true when the client went away."""
        from denoiser.backend import Cancelled

        arrived = time.monotonic()
        try:
            request = wire.request_from_json(payload.get("request"))
            decode = wire.decode_from_json(payload.get("decode"), now=arrived)
        except wire.WireError as exc:
            return 400, {"error": str(exc)}
        self._count("fills")
        try:
            completion = self.engine.complete(request, decode, document=payload.get("document", ""),
                                              is_cancelled=is_cancelled)
        except Cancelled:
            self._count("cancelled")
            return CLIENT_CLOSED, {"error": "cancelled: the client closed the request"}
        except Exception as exc:  # the model failed this request; the replica stays up
            self._count("errors")
            log.error("fill failed: %s: %s", type(exc).__name__, exc)
            return 500, {"error": f"the engine's model failed this request ({type(exc).__name__}: {exc})",
                         "replica": self.replica}
        self._count("answered")
        return 200, {**wire.fill_to_json(completion), "elapsed_ms": round(completion.elapsed_ms, 3),
                     "replica": self.replica}

    def forget(self, payload: dict) -> Answer:
        document = payload.get("document", "")
        if document:
            self._count("forgets")
            self.engine.forget(document)
        return 200, {"replica": self.replica}

    def health(self) -> Answer:
        backend = self.engine.backend
        return 200, {"protocol": wire.PROTOCOL, "model": backend.name, "device": str(backend.device),
                     "parameters": backend.parameters, "max_context_tokens": self.engine.max_context_tokens,
                     "replica": self.replica, "pid": os.getpid()}

    def status(self) -> Answer:
        with self._lock:
            counts = dict(self.counts)
        return 200, {"replica": self.replica, "pid": os.getpid(), "counts": counts, "engine": self.engine.status()}

    # --- a request's whole work, from its body to its encoded answer (one call, off the event loop) ---
    def fill_request(self, body: bytes, is_cancelled: Callable[[], bool]) -> tuple[int, bytes]:
        """Blocking: parse the body, run the model, encode the answer."""
        payload, error = self.parse(body)
        return json_answer(*(error if error is not None else self.fill(payload, is_cancelled)))

    def forget_request(self, body: bytes) -> tuple[int, bytes]:
        """Blocking: waits for a fill of the document in flight."""
        payload, error = self.parse(body)
        return json_answer(*(error if error is not None else self.forget(payload)))

    def answer(self, route: str, payload: dict | None) -> Answer:
        """Any route but fill (which blocks on the model and needs a cancellation signal)."""
        if route == FORGET:
            return self.forget(payload or {})
        if route == HEALTH:
            return self.health()
        return self.status()

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1
