"""Settings of the Ray Serve application, as plain data: what `serve --replicas` deploys and what a Serve config
file (KubeRay) carries. No Ray import, so manifests can be written where Ray is not installed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .openai_schema import Limits
from .replica import ReplicaSettings
from .server import ServerConfig

APP_NAME = "vl-export"
APP_BUILDER = "vl_export.runtime.ray_serve:app_builder"  # import path of the application builder
ROUTER_PATH = "vl_export.runtime.ray_router.CacheAffinityRouter"
DEFAULT_OVERLOADED_AT = 4  # ongoing requests on a key's replica at which the least-loaded one serves instead


@dataclass(frozen=True)
class ScaleSettings:
    """How many engine replicas, what each reserves, and how Ray Serve watches and stops them."""

    replicas: int = 1
    max_replicas: int | None = None  # set: autoscale between min_replicas and max_replicas
    min_replicas: int = 1
    target_ongoing_requests: float = 2.0  # per replica, what the autoscaler aims at
    max_ongoing_requests: int = 8  # per replica; beyond it Ray queues at the ingress (up to max_queued_requests)
    max_queued_requests: int = 64  # waiting at the ingress for a free replica; beyond it 429
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    overloaded_at: int = DEFAULT_OVERLOADED_AT  # ongoing requests at which a key's replica is passed over
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_timeout_s: float = 60.0  # a stopping replica finishes its requests for up to this long

    def engine_options(self) -> dict:
        """Ray Serve deployment options for the engine, plain data (also the KubeRay Serve config's)."""
        options = dict(max_ongoing_requests=self.max_ongoing_requests, max_queued_requests=self.max_queued_requests,
                       ray_actor_options={"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica},
                       health_check_period_s=self.health_check_period_s,
                       health_check_timeout_s=self.health_check_timeout_s,
                       graceful_shutdown_wait_loop_s=1.0, graceful_shutdown_timeout_s=self.graceful_shutdown_timeout_s,
                       request_router_config={"request_router_class": ROUTER_PATH,
                                              "request_router_kwargs": {"overloaded_at": self.overloaded_at}})
        if self.max_replicas is None:
            options["num_replicas"] = self.replicas
        else:
            options["autoscaling_config"] = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                             "initial_replicas": max(self.min_replicas, min(self.replicas, self.max_replicas)),
                                             "target_ongoing_requests": self.target_ongoing_requests}
        return options


@dataclass(frozen=True)
class AppSettings:
    replica: ReplicaSettings
    scale: ScaleSettings
    server: ServerConfig

    def to_args(self) -> dict:
        """JSON-able: the `args` of the application builder in a Serve config file."""
        return dataclasses.asdict(self)

    @classmethod
    def from_args(cls, args: dict) -> AppSettings:
        return cls(ReplicaSettings(**args["replica"]), ScaleSettings(**args.get("scale", {})), server_config(args["server"]))


def server_config(fields: dict) -> ServerConfig:
    return ServerConfig(**{**fields, "limits": Limits(**fields.get("limits", {}))})
