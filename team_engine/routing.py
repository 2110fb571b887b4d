"""Serve's request router for the engine: document affinity with bounded loads.

Serve's consistent-hash router keeps a document on one replica but places documents by
hash alone, so one replica can hold far more of them than the others. This router keeps
its affinity and its retry loop (a full replica passes the request to the document's next
replica) and decides the replica with `team_engine.placement`. Each router (one per HTTP
proxy) keeps its own placement: a language server talks to one proxy, so its documents
stay put.
"""
from __future__ import annotations

from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter

from team_engine.placement import BoundedLoadPlacement


class BoundedLoadRouter(ConsistentHashRouter):
    def initialize_state(self, **kwargs) -> None:
        placement = {name: kwargs.pop(name) for name in ("idle_s", "keep_factor") if name in kwargs}
        super().initialize_state(**kwargs)
        self.placement = BoundedLoadPlacement(**placement)

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        key = pending_request.metadata.session_id if pending_request is not None else None
        if not candidate_replicas or not key:  # no document named (health, status): Serve's own choice
            return await super().choose_replicas(candidate_replicas, pending_request)
        pending_request.routing_context.should_backoff = True  # back off between rounds, as Serve's router does
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        ranked = self.placement.place(key, list(by_id))
        return [[by_id[unique_id]] for unique_id in ranked[:1 + self._num_fallback_replicas]]
