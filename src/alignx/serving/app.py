"""The OpenAI-compatible FastAPI app: ``/v1/chat/completions``, ``/v1/completions`` (both with SSE streaming),
``/v1/models``, ``/health`` and ``/metrics``; its OpenAPI 3.1 schema, with the request and response models of
every endpoint, at ``/openapi.json``.

The app validates, counts and limits; a backend (the batching worker of :mod:`alignx.serving.batcher`, or
:mod:`alignx.serving.vllm_backend`) routes and decodes. Every response of a completion carries the routing
in an ``alignx`` extension field: ``{"method", "weights", "explanation"}`` (in a stream: on the first chunk,
since routing comes before the first token). Errors use OpenAI's shape; a request never takes the server
down: a failure while decoding becomes a 500 for the requests of that batch only.

A client that goes away stops costing anything: Starlette does not cancel a handler when its client leaves, so
each completion watches its connection and cancels its request in the backend the moment the client closes it
(waiting, routing or decoding). A client gone before its answer is counted with status 499 (nginx's "client
closed request"), quietly, and so is one that leaves while its body is still being read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from pydantic.json_schema import models_json_schema

from alignx import __version__
from alignx.errors import AlignXError
from alignx.serving.metrics import Metrics
from alignx.serving.protocol import (
    APIError, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Completion, CompletionChunk, CompletionRequest,
    ErrorBody, Health, ModelList, chunk_body, parse, response_body, usage,
)
from alignx.serving.requests import Delta, Failed, Finished, GenerationRequest, QueueFull, Routed, Sampling, Unavailable

log = logging.getLogger("alignx.serving")
COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")
_ENDPOINTS = (*COMPLETION_PATHS, "/v1/models", "/health", "/metrics")
CLIENT_CLOSED = 499  # nginx's status for a client that closed the connection before the response
_DISCONNECTED = object()  # put on a request's channel when its client has closed the connection


@dataclass(frozen=True)
class ServeSettings:
    model_name: str
    api_key: str | None = None  # None: no authentication
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512  # the most a request may ask for, and what it gets when it does not ask
    max_body_bytes: int = 1 << 20
    shutdown_timeout: float | None = None  # seconds the backend may take to finish its requests on shutdown; None: no limit

    def __post_init__(self):
        if not self.model_name.strip():
            raise AlignXError("--model-name must not be empty")
        for name in ("max_prompt_tokens", "max_new_tokens", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise AlignXError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.shutdown_timeout is not None and not self.shutdown_timeout >= 0:
            raise AlignXError(f"--shutdown-timeout must be >= 0 seconds, got {self.shutdown_timeout}")
        if self.api_key is not None and not self.api_key.strip():
            raise AlignXError("the API key is empty: pass a non-empty --api-key / ALIGNX_API_KEY, or none")


def create_app(engine, settings: ServeSettings, metrics: Metrics) -> FastAPI:
    """``engine``: ``start()``, ``close(timeout)`` (drains, for at most ``timeout`` seconds), ``submit(GenerationRequest)``
    (raises ``QueueFull`` or ``Unavailable``), ``health()`` (None, or why it cannot serve), ``prompts`` (a
    :class:`~alignx.serving.tokens.PromptCounter`) and ``method``."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        try:
            yield
        finally:  # uvicorn has let in-flight requests finish; the engine drains whatever is left
            await asyncio.to_thread(engine.close, settings.shutdown_timeout)

    app = FastAPI(title="AlignX", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.openapi = lambda: openapi_schema(app, settings)
    app.add_middleware(_RecordRequests, metrics=metrics)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_closed)
    app.add_exception_handler(Exception, _internal_error)
    started = int(time.time())

    def authorise(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorise)])

    auth = {401: {"model": ErrorBody, "description": "missing or wrong API key"}} if settings.api_key else {}
    completion_errors = {**auth, **_errors(
        (400, "an invalid request (the message names the field)"), (404, "the model is not the one served"),
        (413, "the request body is over --max-body-bytes"),
        (503, "the queue is full (retry after Retry-After seconds), or the server cannot serve: the message says why"),
        (500, "decoding failed for this request's batch"))}

    @v1.get("/models", responses={200: {"model": ModelList}, **auth, **_errors()})
    async def models() -> dict:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": started,
                                            "owned_by": "alignx"}]}

    @v1.post("/chat/completions", responses=_completion_responses(ChatCompletion, ChatCompletionChunk, completion_errors))
    async def chat_completions(request: Request):
        body = parse(ChatCompletionRequest, await _read_json(request, settings.max_body_bytes))
        return await complete(request, body, body.prompt(), chat=True)

    @v1.post("/completions", responses=_completion_responses(Completion, CompletionChunk, completion_errors))
    async def completions(request: Request):
        body = parse(CompletionRequest, await _read_json(request, settings.max_body_bytes))
        return await complete(request, body, body.prompt_text(), chat=False)

    async def complete(http: Request, body, prompt: str, chat: bool):
        if body.model != settings.model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {settings.model_name!r}",
                           param="model", code="model_not_found")
        if body.n != 1:
            raise APIError(400, "only n=1 is supported: send concurrent requests instead", param="n")
        if not prompt.strip():
            raise APIError(400, "the prompt is empty", param="messages" if chat else "prompt")
        stop = body.stop_strings()
        max_tokens = body.requested_max_tokens() or settings.max_new_tokens
        if max_tokens > settings.max_new_tokens:
            raise APIError(400, f"max_tokens {max_tokens} is over this server's limit of {settings.max_new_tokens}",
                           param="max_tokens")
        param = "messages" if chat else "prompt"
        if not engine.prompts.fits(prompt, settings.max_prompt_tokens):  # before tokenizing a huge prompt
            raise APIError(400, f"the prompt is {len(prompt.encode())} bytes long, more than this server's limit of "
                           f"{settings.max_prompt_tokens} tokens can hold", param=param, code="context_length_exceeded")
        prompt_tokens = await asyncio.to_thread(engine.prompts.count, prompt)  # off the event loop
        if prompt_tokens > settings.max_prompt_tokens:
            raise APIError(400, f"the prompt has {prompt_tokens} tokens, over this server's limit of "
                           f"{settings.max_prompt_tokens}", param=param, code="context_length_exceeded")
        channel = _Channel()
        request = GenerationRequest(prompt, prompt_tokens, max_tokens, Sampling(body.temperature, body.top_p, body.seed),
                                    stop, channel.send)
        try:
            engine.submit(request)
        except QueueFull:
            raise APIError(503, "the server is at capacity: retry shortly", type="server_overloaded") from None
        except Unavailable as exc:
            raise APIError(503, str(exc)) from None
        metrics.prompt_tokens.inc(prompt_tokens)
        reply = _Reply(chat, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()),
                       settings.model_name, prompt_tokens)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(reply.stream(http, request, channel, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return JSONResponse(await reply.collect(http, request, channel))

    @app.get("/health", responses={200: {"model": Health}, **_errors(
        (503, "the server cannot serve: its decoding worker has stopped, or it is shutting down"))})
    async def health() -> dict:
        problem = engine.health()
        if problem is not None:
            raise APIError(503, problem)
        return {"status": "ok", "model": settings.model_name, "method": engine.method,
                "queue_depth": int(metrics.queue_depth.value)}

    @app.get("/metrics", responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                          "description": "Prometheus text format"}, **_errors()})
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    app.include_router(v1)
    return app


def _errors(*statuses: tuple[int, str]) -> dict:
    return {status: {"model": ErrorBody, "description": text} for status, text in (*statuses, (500, "internal error"))}


def _completion_responses(model, chunk, errors: dict) -> dict:
    """The completion as JSON, or with ``stream: true`` server-sent events: each event's data a chunk as JSON, an
    error body if decoding fails midway, and finally ``[DONE]`` (before Open API 3.2, ``schema`` describes one event)."""
    data = {"anyOf": [{"const": "[DONE]"}, *({"type": "string", "contentMediaType": "application/json",
                                             "contentSchema": {"$ref": f"#/components/schemas/{m.__name__}"}}
                                            for m in (chunk, ErrorBody))]}
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {200: {"model": model, "description": "the completion; with stream=true, server-sent events of chunks",
                  "content": {"text/event-stream": {"schema": event}}}, **errors}


def openapi_schema(app: FastAPI, settings: ServeSettings) -> dict:
    """FastAPI's schema of the routes, plus what it cannot see: the completions parse their bodies themselves
    (a size limit first, then strict validation into OpenAI-shaped errors), so their request models are added
    here, and the bearer key where the server has one."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                             description="OpenAI-compatible completions routed by AlignX's MoCaE over three experts.")
        _, defs = models_json_schema([(ChatCompletionRequest, "validation"), (CompletionRequest, "validation"),
                                      (ChatCompletionChunk, "serialization"), (CompletionChunk, "serialization")],
                                     ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {})
        components.setdefault("schemas", {}).update(defs["$defs"])
        for name in ("ChatCompletionRequest", "CompletionRequest"):  # this server's own limits
            fields = components["schemas"][name]["properties"]
            fields["model"]["enum"] = [settings.model_name]
            for field in ("max_tokens", "max_completion_tokens"):
                for branch in fields.get(field, {}).get("anyOf", ()):
                    if branch.get("type") == "integer":
                        branch["maximum"] = settings.max_new_tokens
        for path, model in (("/v1/chat/completions", ChatCompletionRequest), ("/v1/completions", CompletionRequest)):
            schema["paths"][path]["post"]["requestBody"] = {
                "required": True, "description": f"a prompt over {settings.max_prompt_tokens} tokens (chat template "
                "included) is refused with 400 context_length_exceeded", "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        if settings.api_key:
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, operations in schema["paths"].items():
                if path.startswith("/v1/"):
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
        app.openapi_schema = schema
    return app.openapi_schema


class _Channel:
    """Events from the backend's thread to the handler on the event loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def send(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass


@dataclass
class _Reply:
    chat: bool
    id: str
    created: int
    model: str
    prompt_tokens: int

    async def collect(self, http: Request, request: GenerationRequest, channel: _Channel) -> dict:
        pieces, alignx = [], None
        watcher = asyncio.create_task(_watch_connection(http, channel))
        try:
            while True:
                event = await channel.queue.get()
                if event is _DISCONNECTED:
                    raise ClientDisconnect
                if isinstance(event, Routed):
                    alignx = _alignx_field(event)
                elif isinstance(event, Delta):
                    pieces.append(event.text)
                elif isinstance(event, Finished):
                    return response_body(self.chat, self.id, self.created, self.model, "".join(pieces),
                                         event.finish_reason, usage(self.prompt_tokens, event.completion_tokens), alignx)
                elif isinstance(event, Failed):
                    raise APIError(event.status, event.message)
        finally:  # a finished request has nothing left to cancel; any other is dropped by its backend
            watcher.cancel()
            request.cancel()

    async def stream(self, http: Request, request: GenerationRequest, channel: _Channel,
                     include_usage: bool) -> AsyncIterator[str]:
        fields = (self.chat, self.id, self.created, self.model)
        watcher = asyncio.create_task(_watch_connection(http, channel))
        try:
            while True:
                event = await channel.queue.get()
                if event is _DISCONNECTED:
                    return
                if isinstance(event, Routed):
                    yield _sse(chunk_body(*fields, first=True, alignx=_alignx_field(event)))
                elif isinstance(event, Delta):
                    yield _sse(chunk_body(*fields, text=event.text))
                elif isinstance(event, Finished):
                    yield _sse(chunk_body(*fields, finish_reason=event.finish_reason))
                    if include_usage:
                        yield _sse(chunk_body(*fields, usage=usage(self.prompt_tokens, event.completion_tokens)))
                    break
                elif isinstance(event, Failed):
                    yield _sse(APIError(event.status, event.message).body())
                    break
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            request.cancel()


async def _watch_connection(http: Request, channel: _Channel) -> None:
    """Tell the handler reading ``channel`` once the client has closed the connection (the body is read already,
    so the next ASGI message is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    channel.queue.put_nowait(_DISCONNECTED)


def _alignx_field(event: Routed) -> dict:
    return {"method": event.method, "weights": event.weights, "explanation": event.explanation}


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _read_json(request: Request, limit: int) -> object:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body is over {limit} bytes")
    try:
        return json.loads(bytes(body))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise APIError(400, f"the request body is not valid JSON ({reason})") from None


async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
    response = await _api_error(_request, APIError(exc.status_code, str(exc.detail)))
    response.headers.update(exc.headers or {})  # a 405's Allow header (RFC 9110)
    return response


async def _client_closed(_request: Request, _exc: ClientDisconnect) -> Response:
    """The client left (while its body was read, or before its answer): nobody reads this response, and it is no
    server error; counted as a 499, without a log line."""
    return Response(status_code=CLIENT_CLOSED)


async def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=exc)
    return JSONResponse(APIError(500, "internal server error").body(), status_code=500)


class _RecordRequests:
    """ASGI middleware: counts every response by endpoint and status, and times completions to their last byte."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            path = scope["path"]
            self.metrics.requests.inc(endpoint=path if path in _ENDPOINTS else "other", status=str(status))
            if path in COMPLETION_PATHS and status == 200:
                self.metrics.latency.observe(time.perf_counter() - start)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1") -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread on a free port until the block ends (then shut it down
    gracefully); yields its base URL. For tests, benchmarks and notebooks; ``alignx serve`` runs uvicorn itself."""
    port = free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise AlignXError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
