"""The server's generation queue: one worker thread per Pipeline, a bounded FIFO of jobs, cancellation between tokens.

A Pipeline's decoder session holds one KV cache, so each Pipeline is driven by exactly one thread; requests
wait in the queue and never share a cache. More Pipelines (each with its own sessions) serve in parallel.
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


class GenerationQueue:
    def __init__(self, pipelines: Sequence, max_queue: int):
        if not pipelines:
            raise ValueError("a generation queue needs at least one pipeline")
        self.max_queue = max_queue  # jobs waiting, besides the ones running
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.running = 0
        self.counts = {"completed": 0, "cancelled": 0, "timed_out": 0, "failed": 0, "rejected": 0}
        self._threads = [threading.Thread(target=self._work, args=(pipe,), name=f"vl-export-worker-{i}", daemon=True)
                         for i, pipe in enumerate(pipelines)]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            free = len(self._threads) - self.running  # workers that will take a queued job at once
            if len(self._jobs) >= self.max_queue + free:  # max_queue counts only jobs that must wait
                self.counts["rejected"] += 1
                raise QueueFull(f"the server is busy: {self.running} requests running and {len(self._jobs)} waiting "
                                f"(queue limit {self.max_queue}); retry later")
            self._jobs.append(job)
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            return {"queued": len(self._jobs), "running": self.running, "workers": len(self._threads), **self.counts}

    def close(self, timeout_s: float = 5.0) -> None:
        """Refuse new jobs, cancel waiting and running ones, wait a little for the workers to stop."""
        with self._cond:
            self._closed = True
            for job in self._jobs:
                job.cancel()
            self._cond.notify_all()
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
