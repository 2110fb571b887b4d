"""The Ray Serve application: replicas of the denoiser behind Serve's HTTP proxy.

One deployment, `parafill-denoiser`, is the whole application: each replica
loads one model on its device (`ReplicaService`) and is itself the HTTP
ingress, so a fill crosses the proxy and one replica, no second hop.

- Routing: the language server names the document in Serve's session header
  (`x-session-id`: a hash of its URI, never the path), and the router
  (`team_engine.routing`) gives each document a replica and keeps it there, so
  its context keys and values stay useful however many documents arrive at
  once. Documents spread evenly: a new one goes to the first replica in its
  own hash order that holds fewer than its share of the active documents
  (`team_engine.placement`). A replica that is full (`max_ongoing_requests`)
  passes a request to the document's next replica; when a replica dies its
  documents are placed again, and one that is added takes new documents and
  those of replicas far over their share. Each replica's context cache keeps
  its least recently used documents within `documents_per_replica` and
  `context_cache_mb`.
- Batching: each fill goes straight to a thread of the replica, where the
  native denoiser batches the fills in flight itself (`denoiser/batching.py`):
  a fill joins the running batch at its next denoising step and leaves as soon
  as its own span is done. No batching layer of Serve's in front (it would add
  a queue and a task per batch, and hold every fill of a batch until its slowest
  was done).
- One thread hop per request at most: a fill's body is parsed, filled and its
  answer encoded in one call on a replica thread; health and status, which
  never wait for the model, are answered on the event loop.
- Cancellation: when the client closes the connection, Serve cancels the
  request's task; the fill's flag goes up and the denoiser stops at its next step.
- Token: the first thing `__call__` does is the token check (`team_engine.auth`);
  the proxy checks it too, before routing, on a cluster this engine started.
- Network: on a node that lives on 127.0.0.1 (the engine's own cluster), each
  replica's inter-deployment gRPC server is bound there too; Ray Serve would
  otherwise open it on every interface (`keep_replica_server_on_node_address`).
"""
from __future__ import annotations

import asyncio
import ipaddress
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

DEPLOYMENT = "parafill-denoiser"
APP_NAME = "parafill"
# The router for document affinity with bounded loads (team_engine/routing.py), keyed by the request's
# session header (x-session-id, unless the cluster renames it: RAY_SERVE_SESSION_ID_HEADER_KEY), which
# the language server fills with its document's key (lsp_server/engine_client.py).
ROUTER = "team_engine.routing.BoundedLoadRouter"


@dataclass(frozen=True)
class EngineOptions:
    model: str | None = None  # a model directory or pulled name; None = the embedded model
    device: str = "auto"  # per replica: auto | cpu | cuda
    replicas: int = 1
    threads: int = 1  # CPU threads of each replica's model
    cpus_per_replica: float | None = None  # Ray's CPU reservation per replica; default: `threads`
    gpus_per_replica: float | None = None  # default: 1 when device is cuda, else 0
    max_batch_size: int = 16  # fills a replica's denoiser runs in one step (more wait for a row)
    documents_per_replica: int = 64  # documents whose context a replica keeps (least recently used out)
    max_ongoing_requests: int = 64  # requests a replica accepts before Serve queues them
    context_cache_mb: int = 512  # bytes of context keys and values a replica keeps

    def actor_options(self) -> dict[str, Any]:
        cpus = float(self.threads) if self.cpus_per_replica is None else self.cpus_per_replica
        gpus = self.gpus_per_replica
        if gpus is None:
            gpus = 1.0 if self.device == "cuda" else 0.0
        return {"num_cpus": cpus, "num_gpus": gpus}


def keep_replica_server_on_node_address() -> None:
    """Bind this replica's inter-deployment gRPC server to the node's address when that is loopback.

    Ray Serve 2.60 opens it on every interface (`[::]:0`) whatever the node's address, so on
    a cluster that otherwise lives on 127.0.0.1 it would be the one port other machines could
    reach. Called in the replica before Serve starts that server; on a node with a network
    address nothing changes (the cluster's other nodes reach the replica there).
    """
    import ray
    from ray.serve._private import replica as serve_replica

    address = ray.util.get_node_ip_address()
    bind = getattr(serve_replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "parafill_loopback", False) or not ipaddress.ip_address(address).is_loopback:
        return

    def bind_on_node_address(server, where: str):
        return bind(server, f"{address}:0" if where in ("[::]:0", "0.0.0.0:0") else where)

    bind_on_node_address.parafill_loopback = True
    serve_replica.add_port_to_grpc_server = bind_on_node_address


def build_application(options: EngineOptions, token_sha256: str):
    """The Serve application for `options`; every request must carry the token whose SHA-256 is given."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig
    from ray.serve.schema import LoggingConfig
    from starlette.requests import Request
    from starlette.responses import Response

    def _response(status: int, body: bytes, bearer: bool = False) -> Response:
        headers = {"www-authenticate": 'Bearer realm="parafill"'} if bearer else None
        return Response(body, status_code=status, media_type="application/json", headers=headers)

    @serve.deployment(
        name=DEPLOYMENT,
        num_replicas=options.replicas,
        ray_actor_options=options.actor_options(),
        max_ongoing_requests=options.max_ongoing_requests,
        health_check_period_s=2.0,
        health_check_timeout_s=60.0,  # a replica busy with a long fill on a loaded CPU is not dead
        graceful_shutdown_timeout_s=5.0,
        # One fallback: a document whose replica is full goes to its next replica.
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER, request_router_kwargs={"num_virtual_nodes": 100, "num_fallback_replicas": 1}),
        # No access-log line per request (the replica counts its requests: GET /v1/status).
        logging_config=LoggingConfig(enable_access_log=False),
    )
    class DenoiserReplica:
        def __init__(self, settings: dict, digest: str):
            from team_engine.service import ReplicaService

            keep_replica_server_on_node_address()
            opts = EngineOptions(**settings)
            replica = serve.get_replica_context().replica_id.unique_id
            self.service = ReplicaService.load(opts.model, opts.device, threads=opts.threads, token_sha256=digest,
                                               replica=replica, documents=opts.documents_per_replica,
                                               context_cache_mb=opts.context_cache_mb, max_batch=opts.max_batch_size,
                                               cpus=opts.actor_options()["num_cpus"])
            # A thread for every request the replica accepts: fills wait for their rows in the denoiser's batch.
            self.pool = ThreadPoolExecutor(max_workers=opts.max_ongoing_requests, thread_name_prefix="parafill-fill")

        async def __call__(self, request: Request) -> Response:
            from team_engine.service import FILL, HEALTH, STATUS, json_answer

            headers = [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in request.headers.raw]
            if not self.service.authorized(headers):  # before anything else: no model work without the token
                return _response(*json_answer(*self.service.unauthorized()), bearer=True)
            route, error = self.service.route(request.method, request.url.path)
            if error is not None:
                return _response(*json_answer(*error))
            if route in (HEALTH, STATUS):  # never waits for the model: answered here, no thread hop
                return _response(*json_answer(*(self.service.health() if route == HEALTH else self.service.status())))
            body = await request.body()
            loop = asyncio.get_running_loop()
            if route != FILL:  # forget: waits for the document's fill in flight, so off the loop
                return _response(*await loop.run_in_executor(self.pool, self.service.forget_request, body))
            cancelled = threading.Event()
            try:
                return _response(*await loop.run_in_executor(self.pool, self.service.fill_request, body,
                                                             cancelled.is_set))
            except asyncio.CancelledError:  # the client closed the connection: stop at the next step
                cancelled.set()
                raise

    return DenoiserReplica.bind(asdict(options), token_sha256)
