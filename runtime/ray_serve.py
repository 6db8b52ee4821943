"""`vl-export serve --replicas N`: the same OpenAI API as a Ray Serve application, on one machine or a cluster.

  HTTP ─▶ Ray proxy ─▶ Ingress (server.create_app: the same validation, errors, streaming)
                           │ RemoteQueue: the generation-service protocol over a handle, routing key attached
                           ▼ CacheAffinityRouter (ray_router.py)
                        Engine × N (replica.EngineReplica: one generation service each; health checks; drain)

The ingress is server.create_app itself, given a RemoteQueue instead of a local EngineQueue: nothing of the
request handling is forked. A replica that dies mid-request ends that request with a 503 in OpenAI's shape (or an
error event in its stream); Ray Serve routes new requests to the live replicas and restarts the dead one.
Each response names the replica that served it and the routing key (x-vl-export-* headers); /health adds the
affinity ledger and each replica's counters as last reported. Ray is imported here, so only when asked for.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time

from vl_export.errors import VlExportError

from .openai_schema import OpenAIError
from .ray_config import APP_NAME, AppSettings, server_config
from .replica import FINAL_EVENTS, EngineReplica, EngineRequest, Failure, ReplicaInfo, ReplicaSettings, make_service
from .routing import AffinityLedger, routing_key
from .serving import Event, Job, QueueFull
from .server import ServerConfig, create_app

try:
    import ray
    from ray import serve
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve.config import AutoscalingConfig, RequestRouterConfig
    from ray.serve.exceptions import BackPressureError, RequestCancelledError
except ImportError:
    raise VlExportError("serving on replicas needs Ray Serve: pip install 'vl-export[ray]'") from None

from .ray_router import CacheAffinityRouter

log = logging.getLogger("vl_export.serve")

CANCEL_POLL_S = 0.05  # how often a forwarded request checks whether its client left


# --- the ingress side ---------------------------------------------------------------------------------------

_served: contextvars.ContextVar[dict | None] = contextvars.ContextVar("vl_export_served", default=None)


class RemoteQueue:
    """The generation-service protocol of serving.py, served by the engine replicas through a Ray Serve handle.

    Each submitted job is forwarded by a task: the EngineRequest (with its routing key) goes out, the replica's
    events come back to the job's emit. Lost replicas, backpressure and cancellation become the job's events.
    """

    def __init__(self, engine_handle):
        self.handle = engine_handle.options(stream=True, method_name="generate")
        self.in_flight = 0
        self.counts = {"completed": 0, "cancelled": 0, "timed_out": 0, "failed": 0, "rejected": 0, "replica_lost": 0}
        self.affinity = AffinityLedger()
        self.replicas: dict[str, dict] = {}  # replica id -> {"served": n, "pid": ..., **its last reported stats}
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    def submit(self, job: Job) -> None:
        if self._closed:
            raise QueueFull("the server is shutting down")
        key = routing_key(job.question, job.images, job.history, job.system_message)
        task = asyncio.get_running_loop().create_task(self._forward(job, key))  # in the request's context
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stats(self) -> dict:
        """Requests in flight and how they ended, the affinity ledger, and every replica seen (dead ones too: the
        pid and `reported_at` tell), as this ingress saw them; requests waiting for a replica wait inside Ray."""
        return {"running": self.in_flight, **self.counts, "affinity": dict(self.affinity.counts),
                "replicas": {k: dict(v) for k, v in self.replicas.items()}}

    def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()

    async def _forward(self, job: Job, key: str) -> None:
        self.in_flight += 1
        outcome = "cancelled"
        response = self.handle.remote(EngineRequest.from_job(job, key))
        watcher = asyncio.ensure_future(_cancel_when_asked(job, response))
        try:
            async for event in response:
                if event.kind == "replica":
                    self._served_by(event.value, key)
                    continue
                if event.kind == "error":
                    event = Event("error", _error(event.value))
                job.emit(event)
                if event.kind in FINAL_EVENTS:  # before the server, now done, cancels the job (a no-op for it)
                    outcome = {"done": "completed", "timeout": "timed_out", "error": "failed"}[event.kind]
                    break
        except RequestCancelledError:
            outcome = "cancelled"
        except (RayActorError, ActorUnavailableError) as exc:
            outcome = "replica_lost"
            log.warning("a replica was lost mid-request: %s", exc.__class__.__name__)
            job.emit(Event("error", OpenAIError(503, "the replica serving this request stopped before it finished; "
                                                     "retry the request", None, "replica_unavailable", "server_error")))
        except BackPressureError as exc:
            outcome = "rejected"
            job.emit(Event("error", OpenAIError(429, f"the server is busy: {exc}", None, "queue_full", "rate_limit_error")))
        except Exception as exc:  # a bug: log it, and still answer in the shape clients parse
            outcome = "failed"
            log.exception("forwarding a request to a replica failed")
            job.emit(Event("error", OpenAIError(500, f"internal error: {exc.__class__.__name__}: {exc}", type="server_error")))
        finally:
            watcher.cancel()
            self.in_flight -= 1
            self.counts[outcome] += 1

    def _served_by(self, info: ReplicaInfo, key: str) -> None:
        affinity = self.affinity.record(key, info.replica_id)
        seen = self.replicas.setdefault(info.replica_id, {"served": 0})
        seen.update(info.stats, pid=info.pid, served=seen["served"] + 1, reported_at=time.time())
        served = _served.get()
        if served is not None:  # the request's headers are not sent yet: the replica speaks before "started"
            served.update({"replica": info.replica_id, "routing-key": key, "affinity": affinity})


async def _cancel_when_asked(job: Job, response) -> None:
    """The server cancels a job (client gone, deadline) by setting a threading.Event: pass that on to the replica."""
    while not job.cancelled.is_set():
        await asyncio.sleep(CANCEL_POLL_S)
    response.cancel()


def _error(failure: Failure) -> Exception:
    """A replica's Failure as the error the server turns into its HTTP answer."""
    if failure.kind == "input":
        return VlExportError(failure.message)  # 400, as in the single-process server
    if failure.kind == "busy":
        return OpenAIError(429, failure.message, None, "queue_full", "rate_limit_error")
    return OpenAIError(500, f"generation failed: {failure.message}", type="server_error")


class ServedByHeaders:
    """ASGI middleware: x-vl-export-replica, -routing-key and -affinity on each chat completion's response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        served: dict = {}
        token = _served.set(served)

        async def send_with_headers(message):
            if message["type"] == "http.response.start" and served:
                headers = [(f"x-vl-export-{name}".encode(), value.encode()) for name, value in served.items()]
                message = {**message, "headers": [*message.get("headers", []), *headers]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            _served.reset(token)


@serve.deployment(name="Ingress", max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    def __init__(self, engine, server: dict):
        self.queue = RemoteQueue(engine)
        self.config = server_config(server)

    def __serve_build_asgi_app__(self):
        app = create_app(self.queue, self.config)
        app.add_middleware(ServedByHeaders)
        return app

    def __del__(self):
        self.queue.close()


# --- the engine side ----------------------------------------------------------------------------------------


@serve.deployment(name="Engine")
class Engine:
    def __init__(self, replica: dict):
        settings = ReplicaSettings(**replica)
        replica_id = serve.get_replica_context().replica_id.unique_id
        self.replica = EngineReplica(make_service(settings), replica_id, settings.unhealthy_after_failures)
        from ray.serve.metrics import Counter

        # Ray tags these with the deployment and replica: per-replica metrics in Ray's Prometheus export.
        self.finished = Counter("vl_export_replica_requests", description="Requests finished on this replica, by "
                                "how they ended", tag_keys=("outcome",))

    async def generate(self, request: EngineRequest):
        async for event in self.replica.generate(request):
            if event.kind in FINAL_EVENTS:
                self.finished.inc(tags={"outcome": event.kind})
            yield event

    def check_health(self) -> None:
        self.replica.check_health()

    def __del__(self):  # after Ray's graceful drain (graceful_shutdown_timeout_s) or when the replica is replaced
        self.replica.close()


def build_app(settings: AppSettings):
    """The Ray Serve application (bind graph) for these settings."""
    options = settings.scale.engine_options()
    router = options.pop("request_router_config")
    options["request_router_config"] = RequestRouterConfig(request_router_class=CacheAffinityRouter,
                                                           request_router_kwargs=router["request_router_kwargs"])
    if "autoscaling_config" in options:
        options["autoscaling_config"] = AutoscalingConfig(**options["autoscaling_config"])
    engine = Engine.options(**options).bind(dataclasses.asdict(settings.replica))
    return Ingress.bind(engine, dataclasses.asdict(settings.server))


def app_builder(args: dict):
    """The import path of a Serve config file (`vl_export.runtime.ray_serve:app_builder`); args: AppSettings.to_args()."""
    return build_app(AppSettings.from_args(args))


# --- running it ---------------------------------------------------------------------------------------------


def start(settings: AppSettings, ray_address: str | None = None) -> str:
    """Join the cluster at ray_address (or start a local one), deploy the app, wait until it runs; returns its URL."""
    if not ray.is_initialized():
        ray.init(address=ray_address, configure_logging=False, include_dashboard=False)
    serve.start(http_options={"host": settings.server.host, "port": settings.server.port})
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    return f"http://{settings.server.host}:{settings.server.port}"


def stop(own_cluster: bool) -> None:
    """Drain and remove the application (replicas finish their requests first); a cluster we started goes too."""
    try:
        serve.delete(APP_NAME)
        if own_cluster:
            serve.shutdown()
    finally:
        ray.shutdown()


def run_ray_server(settings: AppSettings, ray_address: str | None = None) -> None:
    """Serve until interrupted (the `vl-export serve --replicas N` command)."""
    try:
        url = start(settings, ray_address)
        print(f"serving {settings.server.model_id} from Ray Serve at {url} (Ctrl-C drains and stops)", flush=True)
        while True:
            time.sleep(3600)
    finally:
        stop(own_cluster=ray_address is None)
