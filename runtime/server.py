"""`vl-export serve`: the OpenAI chat-completions API over HTTP (FastAPI + uvicorn), in front of a GenerationQueue.

FastAPI and uvicorn (the `serve` extra) are imported only when a server is made, so the runtime imports without them.
Each request: read the body (bounded), parse it (openai_schema), queue a Job (429 when the queue is full), then
wait for the worker's events until the request's deadline (504 past it). A client that disconnects cancels its
job; the worker notices between tokens and stops decoding.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from vl_export.errors import VlExportError

from .openai_schema import ChatCall, Limits, OpenAIError, chunk, completion, new_completion_id, parse_chat_request, usage_chunk
from .serving import Event, GenerationQueue, Job, QueueFull

log = logging.getLogger("vl_export.serve")


@dataclass(frozen=True)
class ServerConfig:
    model_id: str
    host: str = "127.0.0.1"
    port: int = 8000
    allow_local_files: bool = False
    max_queue: int = 16
    timeout_s: float = 300.0  # per request, from arrival to the last token
    limits: Limits = field(default_factory=Limits)


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


def create_app(queue: GenerationQueue, config: ServerConfig):
    """The ASGI app; the queue (and its Pipelines) belongs to the caller."""
    fastapi, responses, exceptions = _fastapi()
    app = fastapi.FastAPI(title="vl-export", description="OpenAI-compatible chat completions for an InternVL2.5 bundle")
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
            body = await _read_body(request, config.limits.max_body_bytes)
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
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OpenAIError(400, f"the request body is not valid JSON: {exc}") from None
    return parse_chat_request(payload, config.model_id, config.limits, config.allow_local_files)


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

    def __init__(self, queue: GenerationQueue, call: ChatCall, request, deadline: float, config: ServerConfig):
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
        return completion(self.id, self.config.model_id, result.text, result.finish_reason,
                          result.timings.prompt_tokens, len(result.token_ids))

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
                        yield _sse(usage_chunk(self.id, model, result.timings.prompt_tokens, len(result.token_ids), self.created))
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


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# --- running it ---------------------------------------------------------------------------------------------


def _uvicorn():
    _fastapi()
    import uvicorn

    return uvicorn


def run_server(pipelines: Sequence, config: ServerConfig, log_level: str = "info") -> None:
    """Serve until interrupted (the `vl-export serve` command)."""
    uvicorn = _uvicorn()
    queue = GenerationQueue(pipelines, config.max_queue)
    try:
        uvicorn.run(create_app(queue, config), host=config.host, port=config.port, log_level=log_level,
                    timeout_graceful_shutdown=5)
    finally:
        queue.close()


class BackgroundServer:
    """uvicorn in a thread on a free local port (tests and the load script): `with BackgroundServer(...) as url:`."""

    def __init__(self, pipelines: Sequence, config: ServerConfig, log_level: str = "warning"):
        import socket

        uvicorn = _uvicorn()
        self.queue = GenerationQueue(pipelines, config.max_queue)
        self.socket = socket.socket()
        self.socket.bind((config.host, config.port))  # port 0: the OS picks a free one, with no race
        self.url = f"http://{config.host}:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.queue, config), log_level=log_level))
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
