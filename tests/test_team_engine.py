"""`parafill engine` on a real Ray cluster on 127.0.0.1, started and stopped here.

One engine (two CPU replicas of a tiny random model, one thread each) serves
the whole module: every route refuses a missing or wrong token before any model
work; no process of its cluster listens beyond 127.0.0.1; two documents land on
two replicas and keep their context caches; an LSP session completes through
it, and a cancelled request stops the replica's denoiser; a replica killed
mid-request fails that request once, clearly, and the next one is answered; the
engine killed mid-session is reported once to the editor, and when it is
started again the server reconnects by itself. Apart from it, `--address`
joins a cluster started here with `ray start`, answers a fill there, and
leaves that cluster running when it stops.
Skipped when Ray Serve is not installed (`pip install -e '.[engine]'`).
"""
from __future__ import annotations

import asyncio
import http.client
import importlib.util
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest



def ray_serve_installed() -> bool:
    """Ray with its Serve extra, found without importing Ray (that takes seconds)."""
    ray = importlib.util.find_spec("ray")
    return (ray is not None and importlib.util.find_spec("starlette") is not None
            and any((Path(p) / "serve").is_dir() for p in ray.submodule_search_locations or ()))


pytestmark = [
    pytest.mark.skipif(not ray_serve_installed(), reason="Ray Serve is not installed (pip install -e '.[engine]')"),
    pytest.mark.timeout(1200),
]

from lsprotocol import types  # noqa: E402
from pygls.exceptions import JsonRpcRequestCancelled  # noqa: E402
from pytest_lsp import ClientServerConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKEN = "team-engine-test-token-0123456789"
START_TIMEOUT_S = 360  # a busy 2-core machine starts Ray's helper processes slowly (normally ~20 s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EngineProcess:
    """`python -m lsp_server engine ...` in a session of its own, with its Ray cluster."""

    def __init__(self, model_dir: Path, port: int):
        self.model_dir, self.port = model_dir, port
        self.proc: subprocess.Popen | None = None
        self.folder: Path | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="parafill-engine-", suffix=".log", delete=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "EngineProcess":
        # Twice at most: on a machine busy enough that Ray's helper processes miss their start
        # window (`parafill engine` already retries its cluster), a second engine usually starts.
        for attempt in (1, 2):
            if self._start_once():
                return self
            if attempt == 1:
                self.stop()
        self.stop()
        pytest.fail(f"parafill engine did not start in {START_TIMEOUT_S} s:\n{self.log_text()[-4000:]}")

    def _start_once(self) -> bool:
        self.folder = Path(tempfile.mkdtemp(prefix="pfe-", dir="/tmp"))
        env = {**os.environ, "PYTHONPATH": str(REPO), "PARAFILL_ENGINE_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
        argv = [sys.executable, "-m", "lsp_server", "engine", "--model", str(self.model_dir), "--device", "cpu",
                "--replicas", "2", "--threads", "1", "--num-cpus", "2", "--port", str(self.port),
                "--ray-temp-dir", str(self.folder)]
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     start_new_session=True)
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(START_TIMEOUT_S)
        if not ready or not ready[0].strip():
            return False
        assert json.loads(ready[0])["url"] == self.url
        return True

    def log_text(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def kill(self) -> None:
        """The engine dies (SIGKILL to it and its cluster); returns once its port refuses connections."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        self._sweep()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                return
            time.sleep(0.5)
        pytest.fail("the killed engine's port still accepts connections")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self._sweep()

    def _sweep(self) -> None:
        """Whatever of its cluster outlived it (only processes of this engine's own folder)."""
        from team_engine.cluster import processes_under, stop_processes_under

        if self.folder is None:
            return
        for folder in self.folder.glob("pfray-*"):
            stop_processes_under(folder)
            assert processes_under(folder) == []
            shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(self.folder, ignore_errors=True)


def request(url: str, method: str, path: str, *, token: str | None = TOKEN, body: dict | None = None,
            headers: dict | None = None) -> tuple[int, dict]:
    host, port = url.rsplit("/", 1)[-1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        sent = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
        connection.request(method, path, body=json.dumps(body).encode() if body is not None else None, headers=sent)
        response = connection.getresponse()
        data = response.read()
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, {"raw": data.decode(errors="replace")}
    finally:
        connection.close()


def replica_counts(url: str) -> dict[str, dict]:
    """Each replica's counters (GET /v1/status lands on either replica: ask until both answered)."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, answer = request(url, "GET", "/v1/status")
        assert status == 200, answer
        seen[answer["replica"]] = answer["counts"]
        if len(seen) == 2:
            return seen
        time.sleep(0.05)
    pytest.fail(f"only {len(seen)} replica(s) answered")


@pytest.fixture(scope="module")
def engine(parafill_tiny_model):
    running = EngineProcess(parafill_tiny_model, free_port())
    try:
        yield running.start()
    finally:
        running.stop()
        Path(running.log.name).unlink(missing_ok=True)


def fill_body(document: str, prefix: str, *, slow: bool = False) -> dict:
    from denoiser import wire
    from fim.request import FimRequest, SpanPlan

    span = SpanPlan("block", 128) if slow else SpanPlan("line", 8)
    request_ = FimRequest(preamble="# app.py\n", prefix=prefix, suffix="\n", span=span)
    decode = {"steps": 0, "confidence_threshold": 1.0, "budget_ms": None} if slow else \
        {"steps": 4, "confidence_threshold": 0.9, "budget_ms": None}
    return {"document": document, "request": wire.request_to_json(request_), "decode": decode}


def test_every_route_refuses_a_missing_or_wrong_token_before_any_model_work(engine):
    before = replica_counts(engine.url)
    for path in ("/v1/fill", "/v1/health", "/v1/status", "/v1/forget", "/-/routes", "/-/healthz", "/anything"):
        for method in ("GET", "POST"):
            for token in (None, "wrong-token-0123456789abcdef", TOKEN[:-1]):
                body = fill_body("doc", "x = ") if method == "POST" else None
                status, answer = request(engine.url, method, path, token=token, body=body)
                assert status == 401, (path, method, token, status, answer)
                assert "token" in answer.get("error", ""), answer
    status, _ = request(engine.url, "GET", "/v1/health", token=None, headers={"Authorization": f"Basic {TOKEN}"})
    assert status == 401
    after = replica_counts(engine.url)
    assert {r: c["fills"] for r, c in after.items()} == {r: c["fills"] for r, c in before.items()}
    # Refused by the proxy, before routing: the replicas never saw those requests at all.
    assert {r: c["refused"] for r, c in after.items()} == {r: c["refused"] for r, c in before.items()}
    status, health = request(engine.url, "GET", "/v1/health")
    assert status == 200 and health["device"] == "cpu" and health["protocol"] == 1


def listening_addresses(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the processes `pids` listen on (Linux /proc)."""
    inodes = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    found = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        for line in (table.read_text().splitlines()[1:] if table.exists() else ()):
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)  # 32-bit words, each in host (little-endian) order
            ip = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
            ip = getattr(ip, "ipv4_mapped", None) or ip
            found.add((str(ip), int(port, 16)))
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc")
def test_no_process_of_the_engines_cluster_listens_beyond_loopback(engine):
    from team_engine.cluster import processes_under

    pids = [pid for folder in engine.folder.glob("pfray-*") for pid in processes_under(folder)]
    pids.append(engine.proc.pid)
    listening = listening_addresses(pids)
    assert ("127.0.0.1", engine.port) in listening
    assert [entry for entry in listening if not ipaddress.ip_address(entry[0]).is_loopback] == []


def test_two_documents_stay_on_two_replicas_and_keep_their_caches(engine, monkeypatch):
    from lsp_server.engine_client import connect_engine
    from lsp_server.settings import Settings
    from lsp_server.suggest import suggest

    monkeypatch.setenv("PARAFILL_ENGINE_TOKEN", TOKEN)
    client = connect_engine(engine.url)
    settings = Settings(min_confidence=0, steps=4, span_tokens_line=8, context_tokens=256, latency_budget_ms=0)

    def typing_in(document: str, typing: str = "adl") -> set[str]:
        """Three requests as the user types `typing` in `document`; the replicas that answered them."""
        # Different text per document: the server's own completion cache answers equal contexts.
        text = f"# {document}\nimport os\n\n\ndef read_lines(path):\n    with open(path) as handle:\n" \
               "        return handle.re"
        replicas = set()
        for typed in range(1, 4):  # the context grows by a character each time
            found = suggest(client, text + typing[:typed], 6, 26 + typed, document=document, settings=settings)
            assert found.source == "model"
            replicas.add(client.backend.replica_of(document))
        return replicas

    # Two active documents, two replicas: the router gives each its own (bounded loads).
    served_by: dict[str, str] = {}
    for n in range(2):
        document = f"file:///project/module_{n}.py"
        replicas = typing_in(document)
        assert len(replicas) == 1, f"{document} moved between replicas: {replicas}"
        served_by[document] = replicas.pop()
    assert len(set(served_by.values())) == 2, f"both documents went to one replica: {served_by}"
    first = next(iter(served_by))
    # Back to the first document: still its replica, whose cache still holds its context.
    assert typing_in(first, "xyz") == {served_by[first]}
    remote = client.backend.remote_status()
    assert set(remote["replicas"]) == set(served_by.values())
    for replica, figures in remote["replicas"].items():
        # After each document's first request, its replica reused the cached context.
        assert figures["contextKvReuse"] > 0.5, remote
    assert client.status()["hit_rates"]["context_kv_reuse"] > 0.5
    client.backend.close()


# --- through a real LSP session ----------------------------------------------------------------

FAST = {"spanTokensLine": 8, "spanTokensBlock": 8, "steps": 4, "debounceMs": 0, "contextTokens": 256,
        "minConfidence": 0, "latencyBudgetMs": 0}
SLOW = {**FAST, "spanTokensBlock": 128, "spanTokensLine": 128, "steps": 0, "confidenceThreshold": 1.0}
URI = "file:///project/words.py"
SOURCE = "import os\n\n\ndef count_words(text):\n    words = text.split()\n    return len(wo\n"


def lsp_config(url: str):
    return ClientServerConfig(
        server_command=[sys.executable, "-m", "lsp_server", "serve", "--device", "cpu", "--engine", url],
        server_env={**os.environ, "PYTHONPATH": str(REPO), "PARAFILL_ENGINE_TOKEN": TOKEN},
    )


@pytest.fixture
async def lsp(engine, parafill_lsp):
    client = await lsp_config(engine.url).start()
    await client.initialize_session(parafill_lsp.init_params(None, FAST))
    await parafill_lsp.wait_for_state(client)
    yield client
    await client.shutdown_session()


async def test_an_lsp_session_completes_through_the_engine_and_cancels_there(lsp, parafill_lsp, engine):
    status = await parafill_lsp.status(lsp)
    assert status["teamEngine"]["state"] == "connected" and status["model"].endswith(f"via {engine.url}")
    parafill_lsp.open(lsp, URI, SOURCE)
    found = await parafill_lsp.inline(lsp, URI, 5, 17)
    assert found.items and found.items[0].range.start == types.Position(line=5, character=17)
    await parafill_lsp.inline(lsp, URI, 4, 24)
    status = await parafill_lsp.status(lsp)
    assert status["teamEngine"]["requests"]["answered"] == 2
    assert status["hitRates"]["contextKvReuse"] > 0 and status["teamEngine"]["contextKvReuse"] > 0

    # A cancelled LSP request cancels its engine request: the replica stops denoising. The cancel
    # must land while the fill runs on a replica; how long that takes depends on the machine's
    # load, so the cancel comes after a growing delay until one lands there.
    parafill_lsp.configure(lsp, SLOW)
    params = types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=URI), position=types.Position(line=3, character=0),
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked))

    def total(name: str) -> int:
        return sum(c[name] for c in replica_counts(engine.url).values())

    stopped_there = False
    for attempt, delay in enumerate((0.05, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5)):
        fills, cancelled = total("fills"), total("cancelled")
        pending = asyncio.wrap_future(lsp.protocol.send_request(types.TEXT_DOCUMENT_INLINE_COMPLETION, params,
                                                                msg_id=f"cancel-me-{attempt}"))
        await asyncio.sleep(delay)
        lsp.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id=f"cancel-me-{attempt}"))
        try:
            await pending
            continue  # answered before the cancel arrived: nothing to stop
        except JsonRpcRequestCancelled:
            pass
        await asyncio.sleep(1.0)
        if total("fills") == fills:
            continue  # cancelled before it reached the engine
        deadline = time.monotonic() + 30
        while total("cancelled") != cancelled + 1:
            assert time.monotonic() < deadline, "the engine did not stop the cancelled request"
            await asyncio.sleep(0.5)
        stopped_there = True
        break
    assert stopped_there, "no cancel landed while a fill ran on a replica"
    parafill_lsp.configure(lsp, FAST)
    assert (await parafill_lsp.status(lsp))["teamEngine"]["requests"]["cancelled"] >= 1


def test_a_replica_killed_mid_request_fails_that_request_once_and_the_next_is_answered(engine):
    from lsp_server.engine_client import EngineError, RemoteBackend
    from denoiser import wire

    backend = RemoteBackend(engine.url, TOKEN)
    assert backend.connect()
    # The replica must die while the fill runs there; on a quiet machine a fill can finish
    # before the kill lands, so each attempt kills as soon as the fill has arrived, and a
    # fill that finished first sends the next attempt to another document.
    for attempt in range(4):
        document = f"file:///project/victim{attempt}.py"
        key = backend.document_key(document)
        body = fill_body(key, "def handle(event):\n    ", slow=True)
        request_, decode = wire.request_from_json(body["request"]), wire.decode_from_json(body["decode"])
        outcome: list = []

        def slow_fill():
            started = time.monotonic()
            try:
                outcome.append(backend.fill(request_, decode, document=document, is_cancelled=lambda: False))
            except Exception as exc:
                outcome.append(exc)
            outcome.append(time.monotonic() - started)

        status, answer = request(engine.url, "GET", "/v1/status", headers={"x-session-id": key})
        assert status == 200, answer
        fills = answer["counts"]["fills"]
        worker = threading.Thread(target=slow_fill)
        worker.start()
        deadline = time.monotonic() + 60
        while answer["counts"]["fills"] == fills and not outcome:
            assert time.monotonic() < deadline, "the fill never reached its replica"
            status, answer = request(engine.url, "GET", "/v1/status", headers={"x-session-id": key})
            assert status == 200, answer
        os.kill(answer["pid"], signal.SIGKILL)  # the replica holding the document dies mid-fill
        worker.join(120)
        assert not worker.is_alive(), "the request in flight hung"
        error, took = outcome
        if isinstance(error, EngineError):
            break
        replica_counts(engine.url)  # finished before the kill: wait until Ray has replaced the replica
    assert isinstance(error, EngineError), error
    assert "replica" in str(error) and "Ray" in str(error), str(error)
    # The next request for the document is answered (by the other replica, or Ray's replacement).
    deadline = time.monotonic() + 60
    fast = wire.decode_from_json({"steps": 4, "confidence_threshold": 0.9, "budget_ms": None})
    short = wire.request_from_json(fill_body(key, "x = ")["request"])
    while True:
        try:
            backend.fill(short, fast, document=document, is_cancelled=lambda: False)
            break
        except EngineError:
            assert time.monotonic() < deadline, "no request was answered after the replica died"
            time.sleep(1.0)
    assert backend.state == "connected"
    backend.close()


async def test_the_engine_killed_mid_session_is_reported_once_and_found_again_when_restarted(lsp, parafill_lsp,
                                                                                             engine):
    parafill_lsp.open(lsp, URI, SOURCE)
    assert (await parafill_lsp.inline(lsp, URI, 5, 17)).items
    await asyncio.get_running_loop().run_in_executor(None, engine.kill)
    for column in (10, 11, 12):
        assert not (await parafill_lsp.inline(lsp, URI, 5, column)).items
    warnings = [m.message for m in lsp.messages if "team engine" in m.message]
    assert len(warnings) == 1 and "reconnects by itself" in warnings[0], warnings
    status = await parafill_lsp.status(lsp)
    assert status["teamEngine"]["state"] == "unreachable" and status["requests"]["engineUnavailable"] == 3

    await asyncio.get_running_loop().run_in_executor(None, engine.start)
    deadline = time.monotonic() + 60
    while (await parafill_lsp.status(lsp))["teamEngine"]["state"] != "connected":
        assert time.monotonic() < deadline, "the server did not reconnect to the restarted engine"
        await asyncio.sleep(0.5)
    assert (await parafill_lsp.inline(lsp, URI, 5, 14)).items
    back = [m for m in lsp.messages if "is back" in m.message]
    assert len(back) == 1 and back[0].type == types.MessageType.Info
    assert len([m for m in lsp.messages if "team engine" in m.message]) == 2


# --- on a Ray cluster the user started --------------------------------------------------------

class UserCluster:
    """`ray start --head --node-ip-address 127.0.0.1`, as a user would start one (on Linux, Ray
    registers the node under the machine's network address all the same), in a folder of its own.
    Its processes inherit the engine's cluster mark for that folder, so they are stopped by it
    (`team_engine.cluster.stop_processes_under`) and by nothing broader, never `ray stop`."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="pfu-", dir="/tmp"))  # Ray's socket paths must stay short
        self.ray_auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self._plan()

    def _plan(self) -> None:
        from team_engine.cluster import CLUSTER_MARK, free_ports

        self.port, client, listen, grpc, export, runtime_env, node, objects = free_ports(8)
        self.address = f"127.0.0.1:{self.port}"
        # Ray's own token authentication on, as a careful user would run it: a driver that joins
        # (the engine) needs the same two variables (`ray_auth`).
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
                    CLUSTER_MARK: str(self.folder), **self.ray_auth,
                    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "team_engine.auth.proxy_middlewares"}
        self.argv = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--node-ip-address", "127.0.0.1",
                     "--port", str(self.port), "--num-cpus", "2", "--include-dashboard", "false",
                     "--disable-usage-stats", "--temp-dir", str(self.folder), "--ray-client-server-port", str(client),
                     "--dashboard-agent-listen-port", str(listen), "--dashboard-agent-grpc-port", str(grpc),
                     "--metrics-export-port", str(export), "--runtime-env-agent-port", str(runtime_env),
                     "--node-manager-port", str(node), "--object-manager-port", str(objects),
                     "--object-store-memory", str(128 << 20)]

    def start(self) -> "UserCluster":
        from team_engine.cluster import stop_processes_under

        # Twice at most, on fresh ports: a busy machine can make Ray's helpers miss their start window.
        for attempt in (1, 2):
            try:
                run = subprocess.run(self.argv, env=self.env, capture_output=True, text=True,
                                     timeout=START_TIMEOUT_S)
                output = run.stdout[-2000:] + run.stderr[-2000:]
                if run.returncode == 0:
                    return self
            except subprocess.TimeoutExpired:
                output = f"`ray start` took more than {START_TIMEOUT_S} s"
            stop_processes_under(self.folder)
            self._plan()
        pytest.fail(f"ray start failed twice:\n{output}")

    def core(self) -> dict[str, int]:
        """Pid of each of the cluster's core processes (GCS and raylet) still running."""
        from team_engine.cluster import processes_under

        found = {}
        for pid in processes_under(self.folder):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            for name in ("gcs_server", "raylet"):
                if f"/{name}".encode() in command.split(b"\0")[0]:
                    found[name] = pid
        return found

    def stop(self) -> None:
        from team_engine.cluster import processes_under, stop_processes_under

        stop_processes_under(self.folder)
        assert processes_under(self.folder) == []
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def user_cluster():
    cluster = UserCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def test_the_engine_joins_a_cluster_the_user_started_and_leaves_it_running(user_cluster, parafill_tiny_model):
    started = time.monotonic()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="parafill-engine-joined-", suffix=".log", delete=False)
    argv = [sys.executable, "-m", "lsp_server", "engine", "--address", user_cluster.address,
            "--model", str(parafill_tiny_model), "--device", "cpu", "--replicas", "1", "--threads", "1",
            "--port", str(port)]
    engine = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": str(REPO), "PARAFILL_ENGINE_TOKEN": TOKEN,
                                         "OMP_NUM_THREADS": "1", **user_cluster.ray_auth},
                              stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    try:
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(engine.stdout.readline()), daemon=True)
        reader.start()
        reader.join(START_TIMEOUT_S)
        assert ready and ready[0].strip(), Path(log.name).read_text(errors="replace")[-4000:]
        assert json.loads(ready[0])["url"] == url
        assert "joining the Ray cluster at " + user_cluster.address in Path(log.name).read_text()
        core = user_cluster.core()
        assert set(core) == {"gcs_server", "raylet"}

        status, answer = request(url, "POST", "/v1/fill", body=fill_body("doc", "def add(a, b):\n    return "))
        assert status == 200 and isinstance(answer["text"], str) and answer["replica"], answer
        for path in ("/v1/fill", "/-/routes"):  # the token: the engine's routes, and the cluster's own proxy
            assert request(url, "POST" if path == "/v1/fill" else "GET", path, token=None,
                           body=fill_body("doc", "x = ") if path == "/v1/fill" else None)[0] == 401

        engine.send_signal(signal.SIGTERM)
        assert engine.wait(120) == 0, Path(log.name).read_text(errors="replace")[-4000:]
        # The engine's application is gone (Serve's proxy may stay, answering no fill); the user's
        # cluster, the same processes, runs on.
        try:
            assert request(url, "POST", "/v1/fill", body=fill_body("doc", "x = "))[0] != 200
        except ConnectionRefusedError:
            pass
        assert user_cluster.core() == core
        socket.create_connection(("127.0.0.1", user_cluster.port), timeout=5).close()
    finally:
        if engine.poll() is None:
            os.killpg(engine.pid, signal.SIGKILL)
            engine.wait(30)
        Path(log.name).unlink(missing_ok=True)
    assert time.monotonic() - started < START_TIMEOUT_S
