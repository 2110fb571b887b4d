"""Where the engine runs: a Ray cluster of its own on 127.0.0.1, or one the user names.

`start_local_cluster` starts a one-node cluster whose every process binds and
talks on 127.0.0.1 (Ray's single-node mode), reports no usage statistics, and
puts the token check in front of Serve's HTTP proxy; its processes keep their
sockets and logs in a folder of their own and stop with the engine. Ray's
agents are given their ports up front, and a start that times out (a busy
machine starts Ray's helper processes slowly) is cleaned up and tried again.
`connect_cluster` joins an existing cluster (`--address`) and leaves it running
when the engine stops. `serve_engine` starts Serve's proxy on the chosen host
and port and deploys the application (`team_engine.app`).
This module is the only one, with `app.py`, that imports Ray.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from team_engine.auth import DIGEST_ENV, DIGEST_KV_KEY, DIGEST_KV_NAMESPACE

log = logging.getLogger(__name__)

PROXY_CALLBACK = "team_engine.auth.proxy_middlewares"
# Every process of a cluster the engine starts inherits this variable, naming the cluster's folder.
CLUSTER_MARK = "PARAFILL_ENGINE_CLUSTER"
START_ATTEMPTS = 3
OBJECT_STORE_BYTES = 128 << 20  # fills pass small JSON, never large objects


class EngineStartError(Exception):
    """The engine could not start; the message says why and what to try."""


# Ray Serve's own settings, read from the environment of its proxy and replicas when they start
# (ray/serve/_private/constants.py). The proxy calls a replica over a gRPC channel of its own
# instead of submitting a Ray actor task: a request through the proxy costs about a third less
# CPU and time (docs/TEAM_ENGINE.md, "How fast"). Serve's other request-path settings
# (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD, RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP,
# RAY_SERVE_LOG_TO_STDERR, RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE) measured no faster here.
SERVE_LATENCY_ENVIRONMENT = {"RAY_SERVE_PROXY_USE_GRPC": "1"}


def local_cluster_environment(token_sha256: str) -> dict[str, str]:
    """What every process of the engine's own cluster runs with (set before Ray is imported)."""
    return {
        "RAY_USAGE_STATS_ENABLED": "0",  # Ray would otherwise report usage to its makers
        # Ray's single-node mode: the node's address is 127.0.0.1, not the machine's network address.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK,
        DIGEST_ENV: token_sha256,
        **SERVE_LATENCY_ENVIRONMENT,
    }


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def processes_under(folder: Path) -> list[int]:
    """Process ids of the cluster kept in `folder`: those that inherited the engine's mark for it
    (Ray renames its worker processes, so their command lines cannot tell)."""
    mark = f"{CLUSTER_MARK}={folder}".encode()
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if mark in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def stop_processes_under(folder: Path, grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL, the processes of the cluster kept in `folder` (only those)."""
    pids = processes_under(folder)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = [pid for pid in pids if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
        if not pids:
            return


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


@dataclass
class Cluster:
    address: str
    local: bool
    temp_dir: Path | None = None
    node: Any = None
    notes: list[str] = field(default_factory=list)

    def stop(self) -> None:
        """A cluster of our own is stopped, processes and folder; from one we joined we disconnect.

        Our own cluster's processes go first and the driver's connection is never closed
        by `ray.shutdown()`: after a SIGTERM that call can end the process half-way, and
        once the cluster is gone there is nothing left to close (the caller exits).
        """
        if not self.local:
            import ray

            try:
                if ray.is_initialized():
                    ray.shutdown()
            except Exception as exc:  # stopping: report, never raise
                log.warning("disconnecting from Ray: %s", exc)
            return
        if self.node is not None:
            try:
                self.node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
            except Exception as exc:
                log.warning("stopping the local Ray cluster: %s", exc)
        if self.temp_dir is not None:
            stop_processes_under(self.temp_dir)
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_local_cluster(num_cpus: float, num_gpus: float, token_sha256: str, *, temp_dir: str | None = None,
                        attempts: int = START_ATTEMPTS) -> Cluster:
    """A one-node Ray cluster on 127.0.0.1 for this engine alone, connected."""
    os.environ.update(local_cluster_environment(token_sha256))
    import ray
    import ray._private.node
    import ray._private.parameter
    import ray._private.ray_constants

    # Ray reads the variable when it is first imported: if that was before us, say it again.
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False

    errors = []
    for attempt in range(1, attempts + 1):
        # Ray's unix sockets live under this folder, and their paths must stay short. Always a new
        # folder of our own (inside `temp_dir` when given): it is removed when the engine stops.
        folder = Path(tempfile.mkdtemp(prefix="pfray-", dir=temp_dir or "/tmp"))
        os.environ[CLUSTER_MARK] = str(folder)  # inherited by every process of the cluster
        agent, export, listen, runtime_env, gcs = free_ports(5)
        params = ray._private.parameter.RayParams(
            node_ip_address="127.0.0.1", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
            metrics_agent_port=agent, metrics_export_port=export, dashboard_agent_listen_port=listen,
            runtime_env_agent_port=runtime_env, gcs_server_port=gcs, temp_dir=str(folder),
            object_store_memory=OBJECT_STORE_BYTES, include_log_monitor=False, no_monitor=True)
        try:
            node = ray._private.node.Node(params, head=True, shutdown_at_exit=True, spawn_reaper=True)
        except Exception as exc:  # a slow machine: Ray's helpers missed their start window
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            errors.append(f"attempt {attempt}: {first}{_raylet_failure(folder)}")
            log.warning("the local Ray cluster did not start (%s); %s", errors[-1],
                        "trying again" if attempt < attempts else "giving up")
            stop_processes_under(folder)
            shutil.rmtree(folder, ignore_errors=True)
            continue
        try:
            ray.init(address=node.address, log_to_driver=False, configure_logging=False,
                     namespace="parafill")
        except Exception as exc:
            Cluster(node.address, True, folder, node).stop()
            raise EngineStartError(f"could not connect to the local Ray cluster: {exc}") from exc
        return Cluster(node.address, True, folder, node)
    raise EngineStartError("the local Ray cluster did not start (" + "; ".join(errors) + "); the machine may be "
                           "too busy to start Ray's helper processes in time: try again when it is quieter")


def _raylet_failure(folder: Path) -> str:
    """The raylet's own last word, when it died while starting (e.g. a helper that missed its window)."""
    for log_file in folder.glob("session_*/logs/raylet.out"):
        try:
            fatal = [line for line in log_file.read_text(errors="replace").splitlines() if " C " in line[:40]]
        except OSError:
            continue
        if fatal:
            return " (raylet: " + fatal[-1].split("Check failed:")[-1].strip()[:200] + ")"
    return ""


def connect_cluster(address: str, token_sha256: str) -> Cluster:
    """Join the Ray cluster at `address` (e.g. "auto", "10.0.0.5:6379"); it keeps running after us."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False, namespace="parafill")
    except Exception as exc:
        raise EngineStartError(f"could not join the Ray cluster at {address}: {str(exc).strip().splitlines()[0]}"
                               " (is it running? `ray status` on one of its nodes says; a cluster started with "
                               "Ray's token authentication needs RAY_AUTH_MODE=token, and its token in "
                               "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, in parafill engine's environment too)") from exc
    # For proxies started with the token check (team_engine.auth.proxy_middlewares) but not our environment.
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(DIGEST_KV_KEY, token_sha256.encode(), overwrite=True, namespace=DIGEST_KV_NAMESPACE)
    return Cluster(address, False)


def serve_engine(application: Any, host: str, port: int, *, app_name: str, timeout_s: float = 600) -> None:
    """Start Serve's HTTP proxy on host:port (on the head node) and deploy `application` there."""
    from ray import serve

    try:
        serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    except Exception as exc:
        raise EngineStartError(f"Ray Serve did not start on {host}:{port}: {exc}") from exc
    try:
        serve.run(application, name=app_name, route_prefix="/", blocking=False)
    except Exception as exc:
        text = str(exc).strip()
        raise EngineStartError(f"the engine's replicas did not start: {text[-2000:]}") from exc
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app_name)
        if status is not None and str(status.status).endswith("RUNNING"):
            return
        if status is not None and str(status.status).endswith(("DEPLOY_FAILED", "UNHEALTHY")):
            raise EngineStartError(f"the engine's replicas did not start: {status.message}")
        time.sleep(0.5)
    raise EngineStartError(f"the engine's replicas were not ready after {timeout_s:.0f} s")
