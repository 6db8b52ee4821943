"""What the server queues: Jobs in, Events out, through an EngineQueue (one continuous-batching engine) or the older
GenerationQueue (one request at a time per Pipeline).

Both take `submit(job)` (QueueFull when full), `stats()` and `close()`; a job's handler hears `started`, `piece`s,
then `done` (a ChatResult), `error` or `timeout`, from the queue's thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vl_export.errors import VlExportError

from .sampling import GenerationConfig

log = logging.getLogger("vl_export.serve")


@dataclass(frozen=True)
class Event:
    """What a worker tells the request's handler: started, piece (text), done (ChatResult), error, timeout."""

    kind: str
    value: Any = None


@dataclass
class Job:
    question: str
    images: list
    history: list[tuple[str, str]]
    system_message: str | None
    generation: GenerationConfig
    deadline: float  # time.monotonic() after which the worker gives up
    emit: Callable[[Event], None]  # called from the worker thread; must not block
    pieces: bool = True  # stream text pieces (a non-streaming request wants only the end)
    max_tiles: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrival: float = field(default_factory=time.perf_counter)  # time to first token counts from here

    def cancel(self) -> None:
        self.cancelled.set()


class QueueFull(Exception):
    pass


class Stripper:
    """Holds back leading and trailing whitespace, so streamed pieces add up to the stripped answer exactly."""

    def __init__(self):
        self.started = False
        self.pending = ""

    def push(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self.started = True
        body = piece.rstrip()
        if not body:
            self.pending += piece
            return ""
        out, self.pending = self.pending + body, piece[len(body):]
        return out


class _JobQueue:
    """A bounded FIFO of jobs: `submit` refuses when full (QueueFull, a 429) or closing; subclasses run the jobs."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue  # jobs waiting, besides the ones running
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.counts = {"completed": 0, "cancelled": 0, "timed_out": 0, "failed": 0, "rejected": 0}

    def _running_now(self) -> int:
        raise NotImplementedError

    def _free_now(self) -> int:
        """How many jobs would start at once (a worker or a slot free); they are not "waiting" for max_queue."""
        raise NotImplementedError

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            free = self._free_now()  # jobs that would start at once
            if len(self._jobs) >= self.max_queue + free:  # max_queue counts only jobs that must wait
                self._count("rejected")
                raise QueueFull(f"the server is busy: {self._running_now()} requests running and {len(self._jobs)} "
                                f"waiting (queue limit {self.max_queue}); retry later")
            self._jobs.append(job)
            self._cond.notify()

    def _refuse_new(self) -> None:
        """Refuse new jobs and cancel the waiting ones."""
        with self._cond:
            self._closed = True
            for job in self._jobs:
                job.cancel()
            self._cond.notify_all()


class EngineQueue(_JobQueue):
    """A bounded FIFO of jobs in front of one Engine, driven by one thread: jobs take the engine's free slots in
    order, decode together, and leave when done, cancelled (the client left) or past their deadline.

    The engine drives the Pipeline's decoder session from its thread: the Pipeline is not to be used elsewhere
    while the queue runs."""

    def __init__(self, pipe, max_queue: int, max_batch: int = 8, kv_cache_mb: float = 0.0, image_cache_mb: float = 0.0,
                 prefill_chunk: int = 512, metrics=None):
        from .engine import Engine

        super().__init__(max_queue)  # max_queue: jobs waiting for a slot, besides the ones holding one
        self.pipe = pipe
        self.metrics = metrics
        self.engine = Engine(pipe, max_batch, prefill_chunk, kv_cache_mb, image_cache_mb, metrics)
        self.live: dict = {}  # Sequence -> (job, request, stripper), only touched by the engine thread
        if metrics is not None:
            metrics.watch(self.stats)
        self._thread = threading.Thread(target=self._loop, name="vl-export-engine", daemon=True)
        self._thread.start()

    def stats(self) -> dict:
        with self._cond:
            engine = self.engine.stats()
            return {"queued": len(self._jobs), "running": self._running_now(), "workers": 1,
                    "max_batch": self.engine.scheduler.max_batch, "running_batch": engine["running_batch"],
                    "kv_cache": engine["kv_cache"], "image_cache": engine["image_cache"], **self.counts}

    def _running_now(self) -> int:
        return len(self.engine.scheduler.active) + len(self.engine.scheduler.waiting)

    def _free_now(self) -> int:
        return max(0, self.engine.scheduler.slots_free - len(self.engine.scheduler.waiting))

    def close(self, timeout_s: float = 5.0) -> None:
        """Refuse new jobs, cancel waiting and running ones, stop the engine thread."""
        self._refuse_new()
        self._thread.join(timeout_s)
        self.engine.close()

    def _count(self, outcome: str) -> None:
        super()._count(outcome)
        if self.metrics is not None:
            self.metrics.outcome(outcome)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self.engine.has_work and not self._closed:
                    self._cond.wait()
                if self._closed:
                    break
                free = self.engine.scheduler.slots_free - len(self.engine.scheduler.waiting)
                taken = [self._jobs.popleft() for _ in range(min(free, len(self._jobs)))]
            for job in taken:
                self._admit(job)
            for seq, (job, _, _) in list(self.live.items()):
                # Checked between steps: a client that left or a request past its deadline leaves the batch here.
                if job.cancelled.is_set():
                    self.engine.abort(seq, "cancelled")
                elif time.monotonic() > job.deadline:
                    self.engine.abort(seq, "timed_out")
            if self.engine.has_work:
                try:
                    self.engine.step()
                except Exception as exc:  # a bug in the engine itself: every live request is told, the loop goes on
                    log.exception("engine step failed")
                    for seq in list(self.live):
                        seq.error = exc
                        self.engine.abort(seq, "error")
            self._report()
        for seq in list(self.live):
            self.engine.abort(seq, "cancelled")
        self._report()

    def _admit(self, job: Job) -> None:
        """Prepare a job's prompt and give it to the engine; a request that cannot run is answered here."""
        if job.cancelled.is_set():  # its client left while it waited
            self._count("cancelled")
            return
        if time.monotonic() > job.deadline:
            _emit(job, Event("timeout"))
            self._count("timed_out")
            return
        try:
            request = self.pipe.prepare(job.question, job.images or None, job.history,
                                        system_message=job.system_message, max_tiles=job.max_tiles)
            seq = self.engine.add(request, job.generation, refuse_overlong=True)
        except Exception as exc:  # VlExportError: the user's mistake (a 400); anything else is a bug (a 500)
            if not isinstance(exc, VlExportError):
                log.exception("preparing a request failed")
            _emit(job, Event("error", exc))
            self._count("failed")
            return
        seq.added = job.arrival
        self.live[seq] = (job, request, Stripper())
        _emit(job, Event("started"))

    def _report(self) -> None:
        """Hand each live job its new text, and its end."""
        from .pipeline import chat_result

        for seq, (job, request, stripper) in list(self.live.items()):
            text = seq.take_text()
            if text:
                text = stripper.push(text)
                if text and job.pieces:
                    _emit(job, Event("piece", text))
            if not seq.finished:
                continue
            del self.live[seq]
            if seq.finish_reason == "cancelled":
                self._count("cancelled")
            elif seq.finish_reason == "timed_out":
                _emit(job, Event("timeout"))
                self._count("timed_out")
            elif seq.finish_reason == "error":
                _emit(job, Event("error", seq.error))
                self._count("failed")
            else:
                _emit(job, Event("done", chat_result(request, seq)))
                self._count("completed")


class GenerationQueue(_JobQueue):
    """One request at a time per Pipeline, one worker thread each (the server before the engine; kept for callers
    that build it: `serve` runs an EngineQueue)."""

    def __init__(self, pipelines: Sequence, max_queue: int):
        if not pipelines:
            raise ValueError("a generation queue needs at least one pipeline")
        super().__init__(max_queue)
        self.running = 0
        self._threads = [threading.Thread(target=self._work, args=(pipe,), name=f"vl-export-worker-{i}", daemon=True)
                         for i, pipe in enumerate(pipelines)]
        for thread in self._threads:
            thread.start()

    def _running_now(self) -> int:
        return self.running

    def _free_now(self) -> int:
        return max(0, len(self._threads) - self.running)

    def stats(self) -> dict:
        with self._cond:
            return {"queued": len(self._jobs), "running": self.running, "workers": len(self._threads), **self.counts}

    def close(self, timeout_s: float = 5.0) -> None:
        """Refuse new jobs, cancel waiting and running ones, wait a little for the workers to stop."""
        self._refuse_new()
        for thread in self._threads:
            thread.join(timeout_s)

    def _work(self, pipe) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return
                job = self._jobs.popleft()
                self.running += 1
            try:
                outcome = self._run(pipe, job)
            except Exception as exc:  # a bug: keep the worker alive, log the traceback, tell the client
                log.exception("generation failed")
                outcome = "failed"
                _emit(job, Event("error", exc))
            with self._cond:
                self.running -= 1
                self.counts[outcome] += 1

    def _run(self, pipe, job: Job) -> str:
        """Run one job to its end; returns how it ended (a key of self.counts)."""
        if job.cancelled.is_set():  # its client left while it waited
            return "cancelled"
        if time.monotonic() > job.deadline:
            _emit(job, Event("timeout"))
            return "timed_out"
        try:
            stream = pipe.stream(job.question, job.images or None, job.history, job.generation,
                                 system_message=job.system_message, max_tiles=job.max_tiles)  # prepares: may raise
        except VlExportError as exc:
            _emit(job, Event("error", exc))
            return "failed"
        pieces = iter(stream)
        if job.cancelled.is_set():  # left while its images were tiled: skip the vision encoder and the prefill
            pieces.close()
            return "cancelled"
        _emit(job, Event("started"))
        stripper = Stripper()
        for piece in pieces:
            # Checked between tokens: a client that left or a request past its deadline stops the decode here.
            if job.cancelled.is_set() or time.monotonic() > job.deadline:
                pieces.close()
                if job.cancelled.is_set():
                    return "cancelled"
                _emit(job, Event("timeout"))
                return "timed_out"
            text = stripper.push(piece)
            if text and job.pieces:
                _emit(job, Event("piece", text))
        _emit(job, Event("done", stream.result))
        return "completed"


def _emit(job: Job, event: Event) -> None:
    try:
        job.emit(event)
    except RuntimeError:  # the handler's event loop is gone (server shutting down): nobody is listening
        job.cancel()
