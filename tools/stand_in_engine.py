"""A one-process stand-in for `parafill engine` on 127.0.0.1, for tests and benchmarks.

It answers the engine's routes with the same `ReplicaService` a Ray Serve
replica runs (token check, fill, forget, health, status), one model, no Ray:
tests of the language server's side (faults, cancellation, reconnection, what
the server connects to) run in seconds with it. A fill notices its client
closing the connection, as a replica does, and stops at the next step.
`stop()` takes it off the network (connections refused, as when an engine
dies); `start()` on the same port brings it back.
"""
from __future__ import annotations

import json
import select
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from team_engine.auth import digest
from team_engine.service import FILL, ReplicaService


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # a client that closed its connection mid-request (a cancelled fill): expected


class StandInEngine:
    def __init__(self, model_dir: str | Path, token: str, *, port: int = 0, replica: str = "stand-in"):
        self.service = ReplicaService.load(str(model_dir), "cpu", threads=1, token_sha256=digest(token),
                                           replica=replica)
        self.port = port
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, the refused ones too
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._open: set[socket.socket] = set()  # connections being served (closed by `stop`)
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "StandInEngine":
        engine = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as Serve's proxy

            def log_message(self, *args) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with engine._lock:
                    engine._open.add(self.connection)

            def finish(self) -> None:
                with engine._lock:
                    engine._open.discard(self.connection)
                super().finish()

            def do_GET(self) -> None:
                self._handle()

            def do_POST(self) -> None:
                self._handle()

            def _handle(self) -> None:
                engine.requests.append((self.command, self.path))
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                service = engine.service
                headers = [(k.lower(), v) for k, v in self.headers.items()]
                if not service.authorized(headers):
                    return self._send(*service.unauthorized())
                route, error = service.route(self.command, self.path)
                if error is not None:
                    return self._send(*error)
                payload = None
                if self.command == "POST":
                    payload, error = service.parse(body)
                    if error is not None:
                        return self._send(*error)
                if route != FILL:
                    return self._send(*service.answer(route, payload))
                self._send(*service.fill(payload, self._client_gone))

            def _client_gone(self) -> bool:
                readable, _, _ = select.select([self.connection], [], [], 0)
                if not readable:
                    return False
                try:
                    return self.connection.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    return True

            def _send(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client left
                    self.close_connection = True

        server = _QuietServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="stand-in-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Off the network: new connections are refused and open ones are closed."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            connections, self._open = list(self._open), set()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "StandInEngine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
