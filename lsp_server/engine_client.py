"""The language server's side of a team engine: fills sent over HTTP to the URL the user gave.

`RemoteBackend` is a denoiser `Backend` whose `fill` is answered by a team
engine (`parafill engine`, docs/TEAM_ENGINE.md), so the server's own `Engine`
sits in front of it unchanged: documents, context windows, debounce,
cancellation, typed-ahead, the completion cache and the confidence gate all
stay in this process; only the `FimRequest` crosses (`denoiser/wire.py`).

- Routing: each document is named by a hash of its URI (salted per server, so
  no path leaves the machine) in the `x-session-id` header; the engine's router
  sends all of a document's requests to one replica, the one that holds its
  context keys and values. The replica that answered is counted, and
  `remote_status` reports the context reuse seen through the engine.
- Cancellation: a fill watches its ticket while it waits; a superseded or
  cancelled request closes its connection, and the engine stops its denoising
  at the next step.
- Faults: an engine that cannot be reached, or that refuses the token, is
  reported once (`notify`), after which fills fail at once with
  `EngineUnavailable` (an empty answer) or go to the local model when one is
  configured, while a background probe reconnects by itself and reports it.
  A request that fails inside the engine (a replica that died, say) fails
  once with the engine's reason; nothing waits past a deadline.

This is the one module of the server that opens network connections, and only
to the configured engine's host and port.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import secrets
import select
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from denoiser import wire
from denoiser.backend import Cancelled, DecodeSettings, FillResult
from fim.request import FimRequest

log = logging.getLogger(__name__)

TOKEN_ENV = "PARAFILL_ENGINE_TOKEN"
ROUTING_HEADER = "x-session-id"  # the engine routes a document's requests to one replica by it
CONNECT_TIMEOUT_S = 3.0
# How long past its latency budget a fill may take to come back (queueing, the hop) before
# it is given up; a fill without a budget gets NO_BUDGET_TIMEOUT_S.
ANSWER_GRACE_S = 15.0
NO_BUDGET_TIMEOUT_S = 120.0
CHORE_TIMEOUT_S = 5.0  # health checks and forgets
PROBE_FIRST_S, PROBE_MAX_S = 1.0, 10.0  # reconnection attempts: every second at first, then less often
POLL_S = 0.02  # how often a waiting fill looks at its ticket

State = str  # "connecting" | "connected" | "unreachable" | "refused" | "incompatible" | "closed"


class EngineUnavailable(Exception):
    """The team engine cannot answer now (unreachable, or it refused the token); already reported once."""

    reported = True  # the server answers empty without logging an error each time


class EngineError(Exception):
    """The team engine failed this one request; the message carries its reason."""


class EngineConfigError(Exception):
    """The engine settings cannot work as given (a bad URL, no token); the message says what to set."""


@dataclass(frozen=True)
class EngineAddress:
    scheme: str
    host: str
    port: int
    base_path: str  # "" or "/prefix", without a trailing slash

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.base_path}"


def parse_engine_url(url: str) -> EngineAddress:
    """An engine URL such as http://127.0.0.1:8765; raises EngineConfigError saying what is wrong."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise EngineConfigError(f"engine URL {url!r} is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EngineConfigError(f"engine URL {url!r} must look like http://HOST:PORT (e.g. http://127.0.0.1:8765)")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise EngineConfigError(f"engine URL {url!r} must hold no user, password, query or fragment "
                                f"(the token comes from {TOKEN_ENV} or the engineTokenFile setting)")
    return EngineAddress(parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80),
                         parts.path.rstrip("/"))


def client_token(token_file: str = "") -> str:
    """The engine's token: PARAFILL_ENGINE_TOKEN, else the first line of `token_file`."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    if not token_file:
        raise EngineConfigError(f"the team engine needs its token: set {TOKEN_ENV} in the environment the editor "
                                "starts parafill with, or the engineTokenFile setting to the engine's token file")
    path = Path(token_file).expanduser()
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise EngineConfigError(f"engineTokenFile {str(path)!r}: cannot read it ({exc.strerror or exc})") from None
    if not token:
        raise EngineConfigError(f"engineTokenFile {str(path)!r} is empty")
    return token.splitlines()[0].strip()


def _latencies() -> deque:
    return deque(maxlen=1000)


class RemoteBackend:
    """A team engine, seen by the server's `Engine` as a backend (the `Backend` protocol)."""

    concurrent_fill = True  # requests from several threads go out side by side; the engine batches them

    def __init__(self, url: str, token: str, *, notify: Callable[[str, str], None] | None = None,
                 fallback: Callable[[], Any] | None = None, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 probe_first_s: float = PROBE_FIRST_S, probe_max_s: float = PROBE_MAX_S):
        self.address = parse_engine_url(url)
        self.url = str(self.address)
        self._token = token
        self._notify = notify or (lambda kind, message: None)
        self._fallback_factory = fallback
        self._connect_timeout_s = connect_timeout_s
        self._probe_first_s, self._probe_max_s = probe_first_s, probe_max_s
        self._salt = secrets.token_hex(8)  # document keys differ per server: no URI is recognisable
        self._lock = threading.Lock()
        self._local = threading.local()
        self._connections: set[http.client.HTTPConnection] = set()
        self._state: State = "connecting"
        self._reason = "connecting"
        self._since = time.time()
        self._info: dict[str, Any] = {}
        self._probing = False  # a reconnection thread is running (it stops once connected)
        self._closed = threading.Event()
        self._counts = dict(fills=0, answered=0, cancelled=0, errors=0, unavailable=0, local=0, reconnects=0)
        self._replicas: dict[str, dict[str, int]] = {}
        self._documents: dict[str, str] = {}  # document key -> replica that answered it last
        self._hop_ms: deque[float] = _latencies()  # round trip minus the engine's own time
        self.last_error: str | None = None
        self._threads = 0
        self._fallback: Any = None
        self._fallback_state = "none" if fallback is None else "unloaded"
        self._fallback_lock = threading.Lock()

    # --- what the server's Engine reads -------------------------------------------------------
    @property
    def name(self) -> str:
        model = self._info.get("model")
        return f"{model} via {self.url}" if model else f"team engine at {self.url}"

    @property
    def device(self) -> str:
        return str(self._info.get("device") or "cpu")

    @property
    def parameters(self) -> int:
        return int(self._info.get("parameters") or 0)

    @property
    def max_context_tokens(self) -> int | None:
        return self._info.get("max_context_tokens")

    @property
    def state(self) -> State:
        return self._state

    def document_key(self, document: str) -> str:
        return hashlib.sha256(f"{self._salt}\0{document}".encode("utf-8", "surrogatepass")).hexdigest()[:32]

    def replica_of(self, document: str) -> str | None:
        """The engine replica that answered the document's last fill (None: none yet)."""
        with self._lock:
            return self._documents.get(self.document_key(document))

    # --- connecting -------------------------------------------------------------------------
    def connect(self) -> bool:
        """Check the engine once (GET /v1/health); True if it answers. Never raises: an engine
        that does not answer is reported and retried in the background."""
        return self._check_health(initial=True)

    def _check_health(self, initial: bool = False) -> bool:
        try:
            status, data = self._exchange("GET", "/v1/health", None, key=None, timeout_s=CHORE_TIMEOUT_S)
        except (_Unreachable, _TimedOut) as exc:
            self._set_state("unreachable", f"cannot reach it ({exc})", initial=initial)
            return False
        if status == 401:
            self._set_state("refused", "it refused parafill's token: give parafill the engine's token "
                            f"({TOKEN_ENV} or the engineTokenFile setting)", initial=initial)
            return False
        info = _json_object(data)
        if status != 200 or info.get("protocol") != wire.PROTOCOL:
            self._set_state("incompatible", f"it does not answer as a parafill engine of this version "
                            f"(HTTP {status} from /v1/health); check the engine setting", initial=initial)
            return False
        self._info = info
        self._set_state("connected", f"{info.get('model')} on {info.get('device')}", initial=initial)
        return True

    def _set_state(self, state: State, reason: str, initial: bool = False) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            before, self._state, self._reason = self._state, state, reason
            if state != before:
                self._since = time.time()
            start_probe = state != "connected" and not self._probing
            self._probing = self._probing or start_probe
        if start_probe:
            threading.Thread(target=self._probe_loop, name="parafill-engine-probe", daemon=True).start()
        if state == before:
            return
        if state == "connected":
            if not initial:
                self._count("reconnects")
                log.warning("team engine %s is back: %s", self.url, reason)
                self._notify("back", f"parafill: the team engine at {self.url} is back ({reason})")
            else:
                log.info("team engine %s: %s", self.url, reason)
            return
        meanwhile = ("the local model answers meanwhile" if self._fallback_state != "none"
                     else "suggestions stay empty until it answers")
        log.warning("team engine %s: %s", self.url, reason)
        self._notify(state, f"parafill: the team engine at {self.url}: {reason}; {meanwhile} "
                            "(parafill reconnects by itself)")
        if self._fallback_state == "unloaded":
            self._start_fallback()

    def _probe_loop(self) -> None:
        delay = self._probe_first_s
        while not self._closed.wait(delay):
            if self._state != "connected":
                self._check_health()
            with self._lock:  # decided under the lock: a failure now finds no probe and starts one
                if self._state == "connected":
                    self._probing = False
                    return
            delay = min(delay * 2, self._probe_max_s)

    # --- answering ------------------------------------------------------------------------------
    def fill(self, request: FimRequest, decode: DecodeSettings, *, document: str,
             is_cancelled: Callable[[], bool]) -> FillResult:
        if self._state != "connected":
            local = self._fallback
            if local is not None:
                return self._fill_locally(local, request, decode, document, is_cancelled)
            self._count("unavailable")
            raise EngineUnavailable(f"the team engine at {self.url} is not answering: {self._reason}")
        key = self.document_key(document)
        now = time.monotonic()
        payload = {"document": key, "request": wire.request_to_json(request), "decode": wire.decode_to_json(decode, now)}
        budget = payload["decode"]["budget_ms"]
        timeout_s = NO_BUDGET_TIMEOUT_S if budget is None else budget / 1000 + ANSWER_GRACE_S
        self._count("fills")
        started = time.perf_counter()
        try:
            status, data = self._exchange("POST", "/v1/fill", json.dumps(payload).encode(), key=key,
                                          is_cancelled=is_cancelled, timeout_s=timeout_s)
        except Cancelled:
            self._count("cancelled")
            raise
        except _Unreachable as exc:
            self._set_state("unreachable", f"cannot reach it ({exc})")
            self._count("unavailable")
            raise EngineUnavailable(f"the team engine at {self.url} is not answering: {exc}") from None
        except _TimedOut as exc:
            raise self._error(str(exc)) from None
        elapsed_ms = (time.perf_counter() - started) * 1000
        answer = _json_object(data)
        if status == 200:
            try:
                result = wire.fill_from_json(answer)
            except wire.WireError as exc:
                raise self._error(f"the engine's answer was not understood ({exc})") from None
            self._answered(key, answer, result, elapsed_ms)
            return result
        if status == 401:
            self._set_state("refused", "it refused parafill's token: give parafill the engine's token "
                            f"({TOKEN_ENV} or the engineTokenFile setting)")
            self._count("unavailable")
            raise EngineUnavailable(f"the team engine at {self.url} refused the token")
        if status == 499:
            self._count("cancelled")
            raise Cancelled("the engine stopped this request")
        reason = answer.get("error") or (data or b"").decode("utf-8", "replace").strip()[:300] or "no reason given"
        if status in (500, 502, 503, 504) and "error" not in answer:
            # Not the replica's own answer: Ray Serve's, when the replica serving it failed or is gone.
            reason = (f"{reason} (HTTP {status}: the replica serving this document failed or is being "
                      "replaced by Ray; the next request goes to a live one)")
        raise self._error(f"the team engine failed this request: {reason}")

    def _answered(self, key: str, answer: dict, result: FillResult, elapsed_ms: float) -> None:
        replica = str(answer.get("replica") or "?")
        engine_ms = answer.get("elapsed_ms")
        with self._lock:
            self._counts["answered"] += 1
            figures = self._replicas.setdefault(replica, dict(requests=0, context_tokens=0, reused_context_tokens=0))
            figures["requests"] += 1
            figures["context_tokens"] += result.context_tokens
            figures["reused_context_tokens"] += result.reused_context_tokens
            self._documents[key] = replica
            if len(self._documents) > 4096:  # documents closed long ago
                self._documents.pop(next(iter(self._documents)))
            if isinstance(engine_ms, (int, float)):
                self._hop_ms.append(max(0.0, elapsed_ms - engine_ms))

    def _error(self, message: str) -> EngineError:
        self._count("errors")
        self.last_error = message
        log.error("%s", message)
        return EngineError(message)

    def forget(self, document: str) -> None:
        key = self.document_key(document)
        with self._lock:
            self._documents.pop(key, None)
        local = self._fallback
        if local is not None:
            local.forget(document)
        if self._state != "connected":
            return  # the engine drops documents it has not seen for a while by itself
        try:
            self._exchange("POST", "/v1/forget", json.dumps({"document": key}).encode(), key=key,
                           timeout_s=CHORE_TIMEOUT_S)
        except (_Unreachable, _TimedOut) as exc:
            log.info("team engine: forgetting a document failed: %s", exc)

    # --- the local model, when the engine is away ----------------------------------------------
    def _start_fallback(self) -> None:
        with self._fallback_lock:
            if self._fallback_state != "unloaded":
                return
            self._fallback_state = "loading"
        threading.Thread(target=self._load_fallback, name="parafill-local-model", daemon=True).start()

    def _load_fallback(self) -> None:
        try:
            backend = self._fallback_factory()
            apply = getattr(backend, "set_cpu_threads", None)
            if apply is not None:
                apply(self._threads)
        except Exception as exc:
            self._fallback_state = "failed"
            log.error("the local model did not load, so nothing answers while the team engine is away: %s", exc)
            return
        self._fallback = backend
        self._fallback_state = "loaded"
        log.info("the local model %s answers while the team engine is away", getattr(backend, "name", "?"))

    def _fill_locally(self, local: Any, request, decode, document, is_cancelled) -> FillResult:
        self._count("local")
        if getattr(local, "concurrent_fill", False):
            return local.fill(request, decode, document=document, is_cancelled=is_cancelled)
        with self._fallback_lock:
            return local.fill(request, decode, document=document, is_cancelled=is_cancelled)

    def set_cpu_threads(self, threads: int = 0) -> None:
        self._threads = threads
        apply = getattr(self._fallback, "set_cpu_threads", None)
        if apply is not None:
            apply(threads)

    # --- reports --------------------------------------------------------------------------------
    def cache_stats(self) -> dict:
        stats = getattr(self._fallback, "cache_stats", None)
        return {f"local_{name}": figures for name, figures in (stats() if stats else {}).items()}

    def remote_status(self) -> dict[str, Any]:
        """The `teamEngine` part of parafill/status (camelCase)."""
        from lsp_server.status import percentiles

        with self._lock:
            replicas = {name: {"requests": f["requests"], "contextKvReuse": _rate(f["reused_context_tokens"],
                                                                                  f["context_tokens"])}
                        for name, f in self._replicas.items()}
            context = sum(f["context_tokens"] for f in self._replicas.values())
            reused = sum(f["reused_context_tokens"] for f in self._replicas.values())
            counts = dict(self._counts)
            documents = len(self._documents)
            hop = percentiles(self._hop_ms)
        return {
            "url": self.url, "state": self._state, "reason": self._reason,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self._since)),
            "model": self._info.get("model"), "device": self._info.get("device"),
            "contextKvReuse": _rate(reused, context), "replicas": replicas, "documents": documents,
            "hopMs": hop, "requests": counts, "lastError": self.last_error,
            "localModel": {"state": self._fallback_state, "name": getattr(self._fallback, "name", None)},
        }

    def close(self) -> None:
        """Stop reconnecting and close every connection (the model is being replaced)."""
        self._closed.set()
        with self._lock:
            self._state = "closed"
            connections, self._connections = list(self._connections), set()
        for connection in connections:
            connection.close()

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    # --- HTTP ---------------------------------------------------------------------------------
    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's keep-alive connection (reused: True), or a new one."""
        connection = getattr(self._local, "connection", None)
        if connection is not None and connection.sock is not None:
            return connection, True
        kind = http.client.HTTPSConnection if self.address.scheme == "https" else http.client.HTTPConnection
        connection = kind(self.address.host, self.address.port, timeout=self._connect_timeout_s)
        self._local.connection = connection
        with self._lock:
            self._connections.add(connection)
        return connection, False

    def _drop(self, connection: http.client.HTTPConnection) -> None:
        connection.close()
        if getattr(self._local, "connection", None) is connection:
            self._local.connection = None
        with self._lock:
            self._connections.discard(connection)

    def _exchange(self, method: str, path: str, body: bytes | None, *, key: str | None, timeout_s: float,
                  is_cancelled: Callable[[], bool] = lambda: False) -> tuple[int, bytes]:
        """One request; (status, body). Raises Cancelled (the connection is closed, so the engine
        stops), _Unreachable (no connection could be made or it broke), or EngineError (timeout)."""
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if key:
            headers[ROUTING_HEADER] = key
        deadline = time.monotonic() + timeout_s
        for attempt in range(2):
            connection, reused = self._connection()
            try:
                connection.request(method, self.address.base_path + path, body=body, headers=headers)
                self._wait_for_answer(connection, is_cancelled, deadline, timeout_s)
                response = connection.getresponse()
                data = response.read()
            except (Cancelled, _TimedOut):
                self._drop(connection)
                raise
            except socket.timeout:
                self._drop(connection)
                raise _Unreachable(f"no connection within {self._connect_timeout_s:g} s") from None
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self._drop(connection)
                if reused and attempt == 0:
                    continue  # a kept-alive connection the engine had closed meanwhile: once more, fresh
                raise _Unreachable(_describe(exc)) from None
            except (OSError, http.client.HTTPException) as exc:
                self._drop(connection)
                raise _Unreachable(_describe(exc)) from None
            if response.will_close:
                self._drop(connection)
            return response.status, data
        raise _Unreachable("the connection kept closing")  # not reached: the loop returns or raises

    def _wait_for_answer(self, connection: http.client.HTTPConnection, is_cancelled: Callable[[], bool],
                         deadline: float, timeout_s: float) -> None:
        """Until the answer starts arriving (the caller closes the connection if this raises)."""
        sock = connection.sock
        while True:
            if is_cancelled():
                raise Cancelled("cancelled while the team engine worked; its request was closed")
            left = deadline - time.monotonic()
            if left <= 0:
                raise _TimedOut(f"the team engine did not answer within {timeout_s:.0f} s; the request was given up")
            readable, _, _ = select.select([sock], [], [], min(POLL_S, left))
            if readable:
                return


class _Unreachable(Exception):
    """No connection to the engine, or it broke before an answer came."""


class _TimedOut(Exception):
    """The engine took the connection but gave no answer in time (busy, or stuck)."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: is `parafill engine` running there?"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror or exc})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _json_object(data: bytes | None) -> dict:
    try:
        value = json.loads(data or b"{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _rate(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def connect_engine(url: str, token_file: str = "", *, notify: Callable[[str, str], None] | None = None,
                   fallback: Callable[[], Any] | None = None, threads: int = 0):
    """The server's `Engine` in front of the team engine at `url` (checked once; never raises for an
    engine that is down, only EngineConfigError for settings that cannot work)."""
    from denoiser.engine import Engine

    backend = RemoteBackend(url, client_token(token_file), notify=notify, fallback=fallback)
    backend.set_cpu_threads(threads)
    backend.connect()
    return Engine(backend)
