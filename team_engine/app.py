"""The Ray Serve application: replicas of the denoiser behind Serve's HTTP proxy.

One deployment, `parafill-denoiser`, is the whole application: each replica
loads one model on its device (`ReplicaService`) and is itself the HTTP
ingress, so a fill crosses the proxy and one replica, no second hop.

- Routing: the language server names the document in Serve's session header
  (`x-session-id`: a hash of its URI, never the path), and Serve's
  consistent-hash router maps it onto a ring of the live replicas: every
  request for a document reaches the same replica, so its context keys and
  values stay useful, whichever proxy routes it and however many documents
  arrive at once. Documents spread over the replicas; a replica that is full
  (`max_ongoing_requests`) passes a request to the document's next replica on
  the ring; when a replica dies or one is added, only the documents that hash
  to it move. Each replica's context cache keeps its least recently used
  documents within `documents_per_replica` and `context_cache_mb`.
- Batching: fills pass through `@serve.batch` (the batch limits are options),
  and each batch's fills run side by side on the replica's threads, where the
  native denoiser shares their denoising steps (`denoiser/batching.py`).
- Cancellation: when the client closes the connection, Serve cancels the
  request's task; the fill's flag goes up and the denoiser stops at its next step.
- Token: the first thing `__call__` does is the token check (`team_engine.auth`);
  the proxy checks it too, before routing, on a cluster this engine started.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

DEPLOYMENT = "parafill-denoiser"
APP_NAME = "parafill"
# Ray Serve's router for session affinity: a consistent-hash ring over the replicas, keyed by the
# request's session header (x-session-id, unless the cluster renames it: RAY_SERVE_SESSION_ID_HEADER_KEY),
# which the language server fills with its document's key (lsp_server/engine_client.py).
ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"


@dataclass(frozen=True)
class EngineOptions:
    model: str | None = None  # a model directory or pulled name; None = the embedded model
    device: str = "auto"  # per replica: auto | cpu | cuda
    replicas: int = 1
    threads: int = 1  # CPU threads of each replica's model
    cpus_per_replica: float | None = None  # Ray's CPU reservation per replica; default: `threads`
    gpus_per_replica: float | None = None  # default: 1 when device is cuda, else 0
    max_batch_size: int = 16  # fills gathered into one batch on a replica
    # How long a replica waits to fill a batch: 0 = take what is queued. Fills arriving while a
    # batch runs join the denoiser's next step anyway (denoiser/batching.py), so waiting buys little.
    batch_wait_ms: float = 0.0
    concurrent_batches: int = 4  # batches in flight on a replica (a new one joins the denoiser's next step)
    documents_per_replica: int = 64  # documents whose context a replica keeps (least recently used out)
    max_ongoing_requests: int = 64  # requests a replica accepts before Serve queues them
    context_cache_mb: int = 512  # bytes of context keys and values a replica keeps

    def actor_options(self) -> dict[str, Any]:
        cpus = float(self.threads) if self.cpus_per_replica is None else self.cpus_per_replica
        gpus = self.gpus_per_replica
        if gpus is None:
            gpus = 1.0 if self.device == "cuda" else 0.0
        return {"num_cpus": cpus, "num_gpus": gpus}


def build_application(options: EngineOptions, token_sha256: str):
    """The Serve application for `options`; every request must carry the token whose SHA-256 is given."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig
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
        # One fallback: a document whose replica is full goes to its next replica on the ring.
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER, request_router_kwargs={"num_virtual_nodes": 100, "num_fallback_replicas": 1}),
    )
    class DenoiserReplica:
        def __init__(self, settings: dict, digest: str):
            from team_engine.service import ReplicaService

            opts = EngineOptions(**settings)
            replica = serve.get_replica_context().replica_id.unique_id
            self.service = ReplicaService.load(opts.model, opts.device, threads=opts.threads, token_sha256=digest,
                                               replica=replica, documents=opts.documents_per_replica,
                                               context_cache_mb=opts.context_cache_mb)
            self.pool = ThreadPoolExecutor(max_workers=opts.max_batch_size * opts.concurrent_batches,
                                           thread_name_prefix="parafill-fill")

        @serve.batch(max_batch_size=options.max_batch_size, batch_wait_timeout_s=options.batch_wait_ms / 1000,
                     max_concurrent_batches=options.concurrent_batches)
        async def fill_batch(self, items: list[tuple[dict, threading.Event]]) -> list[tuple[int, dict]]:
            loop = asyncio.get_running_loop()
            return list(await asyncio.gather(*(loop.run_in_executor(self.pool, self.service.fill, payload, flag.is_set)
                                               for payload, flag in items)))

        async def __call__(self, request: Request) -> Response:
            from team_engine.service import FILL, json_answer

            headers = [(name.lower(), value) for name, value in request.headers.items()]
            if not self.service.authorized(headers):  # before anything else: no model work without the token
                return _response(*json_answer(*self.service.unauthorized()), bearer=True)
            route, error = self.service.route(request.method, request.url.path)
            if error is not None:
                return _response(*json_answer(*error))
            payload = None
            if request.method == "POST":
                payload, error = self.service.parse(await request.body())
                if error is not None:
                    return _response(*json_answer(*error))
            if route != FILL:
                loop = asyncio.get_running_loop()
                return _response(*json_answer(*await loop.run_in_executor(self.pool, self.service.answer, route,
                                                                          payload)))
            cancelled = threading.Event()
            try:
                status, body = await self.fill_batch((payload, cancelled))
            except asyncio.CancelledError:  # the client closed the connection: stop at the next step
                cancelled.set()
                raise
            return _response(*json_answer(status, body))

    return DenoiserReplica.bind(asdict(options), token_sha256)
