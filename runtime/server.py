"""`vl-export serve`: the OpenAI chat-completions API over HTTP (FastAPI + uvicorn), in front of an EngineQueue.

FastAPI and uvicorn (the `serve` extra) are imported only when a server is made, so the runtime imports without them.
Each request: read the body (bounded), parse it (openai_schema), queue a Job (429 when the queue is full), then
wait for the worker's events until the request's deadline (504 past it). A client that disconnects cancels its
job; the worker notices between tokens and stops decoding.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vl_export.errors import VlExportError

from .openai_schema import ChatCall, Limits, OpenAIError, chunk, completion, new_completion_id, parse_chat_request, usage_chunk
from .serving import EngineQueue, Event, Job, QueueFull

log = logging.getLogger("vl_export.serve")


@dataclass(frozen=True)
class ServerConfig:
    model_id: str
    host: str = "127.0.0.1"
    port: int = 8000
    allow_local_files: str | None = None  # the directory image paths may be read from; None: no local files
    max_queue: int = 16  # requests waiting beyond the running ones; 0: no waiting
    timeout_s: float = 300.0  # per request, from arrival to the last token
    limits: Limits = field(default_factory=Limits)
    read_timeout_s: float = 30.0  # to receive a request's headers, and again its body
    max_connections: int = 64  # open connections; more get 503
    docs: bool = False  # /docs and /openapi.json

    max_batch: int = 8  # requests decoding together (slots of the engine; README: 8 measured against 4)
    kv_cache_mb: float = 256.0  # conversation KV prefix cache; 0 turns it off
    image_cache_mb: float = 64.0  # image-embedding cache; 0 turns it off
    prefill_chunk: int = 512  # prompt positions per prefill step while other requests are decoding

    def __post_init__(self):
        from vl_export.errors import InputError

        if not 0 <= self.port <= 65535:
            raise InputError(f"--port must be in [0, 65535], got {self.port}")
        if self.max_queue < 0:
            raise InputError(f"--max-queue must be 0 or more, got {self.max_queue}")
        for name, value in (("--timeout", self.timeout_s), ("read timeout", self.read_timeout_s)):
            if not (math.isfinite(value) and value > 0):
                raise InputError(f"{name} must be a positive number of seconds, got {value}")
        if self.max_connections < 1:
            raise InputError(f"the connection limit must be at least 1, got {self.max_connections}")
        if self.allow_local_files is not None and not Path(self.allow_local_files).is_dir():
            raise InputError(f"--allow-local-files {self.allow_local_files} is not a directory")


class ClientGone(Exception):
    pass


def _fastapi():
    try:
        import fastapi
        import starlette.exceptions
        import starlette.responses
    except ImportError:
        raise VlExportError("the server needs FastAPI and uvicorn: pip install 'vl-export[serve]'") from None
    return fastapi, starlette.responses, starlette.exceptions


def create_app(queue, config: ServerConfig):
    """The ASGI app; the queue (an EngineQueue, or anything with its submit/stats/close) belongs to the caller.
    GET /metrics is served when the queue has `metrics` (a runtime.metrics.Metrics)."""
    fastapi, responses, exceptions = _fastapi()
    docs = {} if config.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}  # off unless asked
    app = fastapi.FastAPI(title="vl-export", description="OpenAI-compatible chat completions for an InternVL2.5 bundle",
                          **docs)
    started = int(time.time())

    def error_response(error: OpenAIError, headers: dict | None = None):
        return responses.JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(exceptions.HTTPException)
    async def http_error(request, exc):  # unknown routes and methods, in OpenAI's error shape too
        return error_response(OpenAIError(exc.status_code, str(exc.detail)))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_id, **queue.stats()}

    def model_card() -> dict:
        return {"id": config.model_id, "object": "model", "created": started, "owned_by": "vl-export"}

    metrics = getattr(queue, "metrics", None)
    if metrics is not None:

        @app.get("/metrics")
        async def prometheus_metrics():
            body, content_type = metrics.render()
            return responses.Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != config.model_id:
            return error_response(OpenAIError(404, f"The model `{model_id}` does not exist", "model", "model_not_found"))
        return model_card()

    async def chat_completions(request):
        arrival = time.monotonic()
        try:
            try:
                body = await asyncio.wait_for(_read_body(request, config.limits.max_body_bytes), config.read_timeout_s)
            except asyncio.TimeoutError:
                raise OpenAIError(408, f"the request body did not arrive within {config.read_timeout_s:g} s", None,
                                  "request_timeout") from None
            # Parsing megabytes of JSON and base64 and reading image headers is CPU work: keep it off the event loop.
            call = await asyncio.to_thread(_parse, body, config)
            exchange = Exchange(queue, call, request, arrival + config.timeout_s, config)
            first = await exchange.start()
            if call.stream:
                return responses.StreamingResponse(exchange.sse(first), media_type="text/event-stream",
                                                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return responses.JSONResponse(await exchange.complete(first))
        except OpenAIError as error:
            return error_response(error, {"Retry-After": "1"} if error.status in (429, 503) else None)
        except ClientGone:
            return responses.Response(status_code=499)  # nobody reads it; nginx's code for "client closed"
        except Exception as exc:  # a bug: log its traceback, and still answer in the shape clients parse
            log.exception("chat completion failed")
            return error_response(OpenAIError(500, f"internal error: {exc.__class__.__name__}: {exc}", type="server_error"))

    # A plain Starlette route: the handler reads the raw request itself (bounded body, OpenAI-shaped errors).
    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return app


def _parse(body: bytes, config: ServerConfig) -> ChatCall:
    try:
        payload = json.loads(body, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError; so are NaN and Infinity
        raise OpenAIError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise OpenAIError(400, "the request body is not valid JSON: nested too deeply") from None
    return parse_chat_request(payload, config.model_id, config.limits, config.allow_local_files)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


async def _read_body(request, limit: int) -> bytes:
    """The body, refused with 413 once it passes `limit` bytes (before reading it all when Content-Length says so)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise OpenAIError(413, f"the request body is {declared} bytes, over this server's limit of {limit}", None, "request_too_large")
    from starlette.requests import ClientDisconnect

    chunks, size = [], 0
    try:
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise OpenAIError(413, f"the request body is over this server's limit of {limit} bytes", None, "request_too_large")
            chunks.append(part)
    except ClientDisconnect:
        raise ClientGone() from None
    return b"".join(chunks)


class Exchange:
    """One request's life between the HTTP handler and the worker: its job, its events, its deadline."""

    def __init__(self, queue, call: ChatCall, request, deadline: float, config: ServerConfig):
        self.queue, self.call, self.request, self.deadline, self.config = queue, call, request, deadline, config
        self.id = new_completion_id()
        self.created = int(time.time())
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(event: Event) -> None:  # from the worker thread
            loop.call_soon_threadsafe(self.events.put_nowait, event)

        self.job = Job(call.question, call.images, call.history, call.system_message, call.generation, deadline, emit,
                       pieces=call.stream, max_tiles=config.limits.max_tiles)

    async def start(self) -> Event:
        """Queue the job and wait for the worker to take it and prepare the prompt (errors there are a 4xx)."""
        try:
            self.queue.submit(self.job)
        except QueueFull as exc:
            raise OpenAIError(429, str(exc), None, "queue_full", "rate_limit_error") from None
        return self._check(await self._next(watch_disconnect=True))

    async def complete(self, first: Event) -> dict:
        event = first
        while event.kind != "done":
            event = self._check(await self._next(watch_disconnect=True))
        result = event.value
        return _with_cached(completion(self.id, self.config.model_id, result.text, result.finish_reason,
                                       result.timings.prompt_tokens, len(result.token_ids)), result)

    async def sse(self, first: Event):
        """OpenAI's stream: a role chunk, content chunks, a finish_reason chunk, [usage chunk], `data: [DONE]`."""
        model = self.config.model_id
        try:
            yield _sse(chunk(self.id, model, {"role": "assistant", "content": ""}, created=self.created))
            while True:
                # Starlette watches for the disconnect here: it cancels this generator, and `finally` cancels the job.
                try:
                    event = self._check(await self._next(watch_disconnect=False))
                except OpenAIError as error:  # the status is sent already: the error goes in the stream
                    yield _sse(error.body())
                    break
                if event.kind == "piece":
                    yield _sse(chunk(self.id, model, {"content": event.value}, created=self.created))
                elif event.kind == "done":
                    result = event.value
                    yield _sse(chunk(self.id, model, {}, result.finish_reason, created=self.created))
                    if self.call.include_usage:
                        yield _sse(_with_cached(usage_chunk(self.id, model, result.timings.prompt_tokens,
                                                            len(result.token_ids), self.created), result))
                    break
            yield "data: [DONE]\n\n"
        finally:
            self.job.cancel()  # a no-op once the job is done

    async def _next(self, watch_disconnect: bool) -> Event:
        """The worker's next event; OpenAIError 504 past the deadline, ClientGone if the client disconnected."""
        get = asyncio.ensure_future(self.events.get())
        waiting = {get}
        if watch_disconnect:
            gone = asyncio.ensure_future(_disconnected(self.request))
            waiting.add(gone)
        try:
            done, _ = await asyncio.wait(waiting, timeout=max(0.0, self.deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waiting:
                task.cancel()
        if get in done:
            return get.result()
        self.job.cancel()
        if done:
            raise ClientGone()
        raise self._timeout()

    def _check(self, event: Event) -> Event:
        if event.kind == "timeout":
            raise self._timeout()
        if event.kind == "error":
            error = event.value
            if isinstance(error, OpenAIError):  # already in its HTTP shape, e.g. a 503 for a lost Ray replica
                raise error
            if isinstance(error, VlExportError):  # the user's mistake, e.g. a prompt over the context
                raise OpenAIError(400, str(error))
            raise OpenAIError(500, f"generation failed: {error.__class__.__name__}: {error}", type="server_error")
        return event

    def _timeout(self) -> OpenAIError:
        return OpenAIError(504, f"the request did not finish within this server's timeout of {self.config.timeout_s:g} s",
                           None, "timeout", "timeout_error")


async def _disconnected(request) -> None:
    """Returns when the client disconnects; the body is read already, so the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _with_cached(body: dict, result) -> dict:
    """OpenAI's own field for prompt tokens served from a cache: usage.prompt_tokens_details.cached_tokens."""
    body["usage"]["prompt_tokens_details"] = {"cached_tokens": result.timings.cached_tokens}
    return body


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# --- running it ---------------------------------------------------------------------------------------------


def _uvicorn():
    _fastapi()
    import uvicorn

    return uvicorn


def engine_queue(pipe, config: ServerConfig) -> EngineQueue:
    """The server's engine over one Pipeline's sessions, with its metrics."""
    from .metrics import Metrics

    return EngineQueue(pipe, config.max_queue, config.max_batch, config.kv_cache_mb, config.image_cache_mb,
                       config.prefill_chunk, Metrics())


def _one(pipelines: Sequence):
    if len(pipelines) != 1:
        raise ValueError(f"a server runs one engine over one Pipeline, got {len(pipelines)}")
    return pipelines[0]


def run_server(pipelines: Sequence, config: ServerConfig, log_level: str = "info") -> None:
    """Serve until interrupted (the `vl-export serve` command)."""
    uvicorn = _uvicorn()
    queue = engine_queue(_one(pipelines), config)
    try:
        uvicorn.run(create_app(queue, config), host=config.host, port=config.port, log_level=log_level,
                    timeout_graceful_shutdown=5, **_connection_limits(config))
    finally:
        queue.close()


def _connection_limits(config: ServerConfig) -> dict:
    """uvicorn settings: a deadline on request headers, and a cap on connections (503 beyond it)."""
    from .http_deadline import protocol_class

    return {"http": protocol_class(config.read_timeout_s), "limit_concurrency": config.max_connections}


class BackgroundServer:
    """uvicorn in a thread on a free local port (tests and the load script): `with BackgroundServer(...) as url:`."""

    def __init__(self, pipelines: Sequence, config: ServerConfig, log_level: str = "warning", queue=None):
        import socket

        uvicorn = _uvicorn()
        self.queue = queue if queue is not None else engine_queue(_one(pipelines), config)
        self.socket = socket.socket()
        self.socket.bind((config.host, config.port))  # port 0: the OS picks a free one, with no race
        self.url = f"http://{config.host}:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.queue, config), log_level=log_level,
                                                    **_connection_limits(config)))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.queue.close()
        self.socket.close()
