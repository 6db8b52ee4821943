"""Ray Serve's request-router extension point, used for cache affinity: a request carrying a routing key goes to
the replica its key ranks first (routing.rank_replicas), unless that replica is overloaded; then, and for requests
without a key, to the least-loaded replica (Ray's own queue-length probing picks within a rank).

A replica that is gone is simply not a candidate, so its keys move to their next-ranked replica and stay there.
Routers run in every process holding a handle (the ingress replicas); rendezvous ranking needs no shared state.
"""

from __future__ import annotations

import random

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica
from ray.util.metrics import Counter

from .ray_config import DEFAULT_OVERLOADED_AT
from .routing import rank_replicas


def request_key(pending_request: PendingRequest | None) -> str | None:
    """The routing key an EngineRequest carries (None for requests of other shapes)."""
    if pending_request is None or not pending_request.args:
        return None
    return getattr(pending_request.args[0], "routing_key", None)


class CacheAffinityRouter(RequestRouter):
    def initialize_state(self, overloaded_at: int = DEFAULT_OVERLOADED_AT, **kwargs):
        if not isinstance(overloaded_at, int) or overloaded_at < 1:
            raise ValueError(f"overloaded_at must be a positive integer, got {overloaded_at!r}")
        self.overloaded_at = overloaded_at
        self.routed = Counter("vl_export_routed_requests", description="Requests routed, by whether they went to "
                              "the replica their routing key prefers", tag_keys=("outcome",))

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # all replicas full: wait, do not spin
        if not candidate_replicas:
            return []
        key = request_key(pending_request)
        if key is None:  # power of two choices
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        ranked = [by_id[replica_id] for replica_id in rank_replicas(key, by_id)]
        preferred, others = ranked[0], ranked[1:]
        ongoing = self.replica_queue_len_cache.get(preferred.replica_id)  # None: unknown, Ray probes it
        if ongoing is not None and ongoing >= self.overloaded_at:
            return [others, [preferred]]
        return [[preferred], others]  # within `others` Ray picks the least loaded

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        key = request_key(pending_request)
        if key is None:
            outcome = "unkeyed"
        else:
            ranked = rank_replicas(key, (r.unique_id for r in self.curr_replicas))
            outcome = "preferred" if ranked and ranked[0] == replica_id.unique_id else "fallback"
        self.routed.inc(tags={"outcome": outcome})
