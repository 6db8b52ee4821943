"""One serving replica without Ray: its generation service made from a bundle, its requests as event streams, its health.

A replica runs whatever implements the generation-service protocol of serving.py (`submit(job)` raising
QueueFull, `stats()`, `close()`); `make_service` is the one place that says which (the continuous-batching engine's
EngineQueue). The Ray deployment (ray_serve.py) wraps an EngineReplica; tests drive it directly.

What crosses the process boundary is plain data: an EngineRequest in, Events out, whose error values are
`Failure`s (exceptions with their own constructors do not survive pickling reliably).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from vl_export.errors import VlExportError

from .sampling import GenerationConfig
from .serving import EngineQueue, Event, Job, QueueFull

log = logging.getLogger("vl_export.serve")

FINAL_EVENTS = ("done", "error", "timeout")


@dataclass(frozen=True)
class ReplicaSettings:
    """What each replica loads: the bundle, its backend and options (threads), and its service's bounds."""

    bundle: str
    backend: str = "onnxruntime"
    backend_options: dict = field(default_factory=dict)
    max_queue: int = 16  # jobs waiting in the replica beyond the running ones
    max_batch: int = 8  # the engine's slots: requests decoding together (README: measured)
    kv_cache_mb: float = 256.0  # the engine's conversation KV cache (what cache-affine routing keeps warm)
    image_cache_mb: float = 64.0  # the engine's image-embedding cache
    prefill_chunk: int = 512
    unhealthy_after_failures: int = 3  # consecutive engine failures (not a user's bad request) before check_health fails


@dataclass(frozen=True)
class EngineRequest:
    """A Job without its callbacks: what the ingress sends a replica."""

    question: str
    images: list[bytes]
    history: list[tuple[str, str]]
    system_message: str | None
    generation: GenerationConfig
    timeout_s: float  # what is left of the request's deadline (clocks differ between machines; durations do not)
    pieces: bool = True
    max_tiles: int | None = None
    routing_key: str | None = None

    @classmethod
    def from_job(cls, job: Job, routing_key: str | None) -> EngineRequest:
        return cls(job.question, list(job.images or []), list(job.history), job.system_message, job.generation,
                   max(0.0, job.deadline - time.monotonic()), job.pieces, job.max_tiles, routing_key)

    def job(self, emit: Callable[[Event], None]) -> Job:
        return Job(self.question, self.images, self.history, self.system_message, self.generation,
                   time.monotonic() + self.timeout_s, emit, pieces=self.pieces, max_tiles=self.max_tiles)


@dataclass(frozen=True)
class Failure:
    """An error event's value across processes. kind: 'input' (the request's fault, 400), 'busy' (429), 'engine' (500)."""

    kind: str
    message: str


@dataclass(frozen=True)
class ReplicaInfo:
    """The first event of every response: who serves it, and that replica's counters at that moment."""

    replica_id: str
    pid: int
    stats: dict


def make_service(settings: ReplicaSettings):
    """The replica's generation service: the continuous-batching engine over one Pipeline, with its caches."""
    from .metrics import Metrics
    from .backends import serving_options
    from .pipeline import Pipeline

    pipe = Pipeline.from_bundle(settings.bundle, backend=settings.backend,
                                **serving_options(settings.backend, settings.backend_options))
    return EngineQueue(pipe, settings.max_queue, settings.max_batch, settings.kv_cache_mb, settings.image_cache_mb,
                       settings.prefill_chunk, Metrics())


class EngineReplica:
    def __init__(self, service, replica_id: str, unhealthy_after_failures: int = 3):
        self.service, self.replica_id = service, replica_id
        self.unhealthy_after_failures = unhealthy_after_failures
        self.consecutive_failures = 0
        self.closed = False

    def info(self) -> ReplicaInfo:
        return ReplicaInfo(self.replica_id, os.getpid(), self.stats())

    def stats(self) -> dict:
        return {**self.service.stats(), "consecutive_failures": self.consecutive_failures}

    async def generate(self, request: EngineRequest) -> AsyncIterator[Event]:
        """ReplicaInfo first, then the job's events up to its final one. Leaving early (the caller cancelled,
        or went away) cancels the job, which its worker notices between tokens."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = request.job(lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        yield Event("replica", self.info())
        try:
            self.service.submit(job)
        except QueueFull as exc:
            yield Event("error", Failure("busy", str(exc)))
            return
        try:
            while True:
                event = self._portable(await events.get())
                yield event
                if event.kind in FINAL_EVENTS:
                    return
        finally:
            job.cancel()  # a no-op once the job is done

    def _portable(self, event: Event) -> Event:
        """Error values become Failures; engine failures in a row count towards failing the health check."""
        if event.kind == "done":
            self.consecutive_failures = 0
        if event.kind != "error":
            return event
        error = event.value
        if isinstance(error, VlExportError):  # the request's own fault says nothing about the engine
            return Event("error", Failure("input", str(error)))
        self.consecutive_failures += 1
        return Event("error", Failure("engine", f"{error.__class__.__name__}: {error}"))

    def check_health(self) -> None:
        """Raises when the engine is broken, so that Ray Serve replaces this replica."""
        if self.closed:
            raise RuntimeError(f"replica {self.replica_id} is shut down")
        self.service.stats()  # a service that cannot even report is broken
        if self.consecutive_failures >= self.unhealthy_after_failures:
            raise RuntimeError(f"replica {self.replica_id}: the engine failed {self.consecutive_failures} requests in "
                               "a row")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.service.close()
