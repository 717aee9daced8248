"""The HTTP server of `vlm serve` (FastAPI + uvicorn): OpenAI's chat completions with images, a web page, metrics.

- `POST /v1/chat/completions`: OpenAI's request and response (or server-sent chunks with `"stream": true`); the
  requests go through the `Batcher` (vlm/batching.py), which decodes those that arrive together as one batch.
- `POST /v1/explain`: where the model looked for an answer about one image (`vlm.explain`'s maps over the image's
  patch grid, as JSON); it waits in the same queue and runs alone between batches.
- `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus' text format), `GET /` (the page in vlm/web/).

Every error is OpenAI's JSON, `{"error": {"message", "type", "param", "code"}}`, never a stack trace: 400 for a bad
request (an image, the context, ...), 401 without the API key when one is set, 404 for another model, 413 for a body
over the limit, 422 for a field of the wrong type, 503 with Retry-After when the queue is full or a request timed
out. Each request is logged as one line: id, status, latency, tokens, batch size.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, format_sse_event
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from vlm.batching import Batcher, ExplainJob, Job, QueueFull, TextTracker
from vlm.errors import VLMError
from vlm.generation import DEFAULT_MAX_NEW_TOKENS
from vlm.openai_api import ChatRequest, ExplainRequest, RequestError, Turns, read_image

log = logging.getLogger("vlm.server")
CHAT_PATH = "/v1/chat/completions"
EXPLAIN_PATH = "/v1/explain"
LOGGED = {CHAT_PATH: "chatcmpl", EXPLAIN_PATH: "explain"}  # the requests logged and counted, and their ids' prefix
CLIENT_GONE = 499  # the status logged for a client that disconnected before its answer (nginx's convention)


@dataclass
class ServerSettings:
    """What `create_app` serves and its limits (the `vlm serve` options)."""

    model_name: str
    max_batch_size: int = 8
    max_queue: int = 64
    timeout_s: float = 120.0
    api_key: str | None = None
    allowed_image_dir: Path | None = None
    max_body_bytes: int = 20 * 2**20
    max_images: int = 8
    batch_wait_s: float = 0.01
    retry_after_s: int = 1


class Metrics:
    """The Prometheus metrics of one app, in a registry of its own."""

    def __init__(self, batcher: Batcher):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "vlm_requests", "Chat completion and explanation requests answered, by HTTP status", ["status"], registry=r
        )
        self.errors = Counter(
            "vlm_request_errors",
            "Chat completion and explanation requests that failed, by HTTP status",
            ["status"],
            registry=r,
        )
        self.latency = Histogram("vlm_request_latency_seconds", "Time from request to last byte", registry=r)
        self.prompt_tokens = Counter("vlm_prompt_tokens", "Prompt tokens read (image tokens included)", registry=r)
        self.completion_tokens = Counter("vlm_completion_tokens", "Tokens generated", registry=r)
        self.batch_size = Histogram(
            "vlm_batch_size", "Requests decoded together", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.tokens_per_second = Gauge(
            "vlm_tokens_per_second", "New tokens per second of the last batch's decode", registry=r
        )
        Gauge("vlm_queue_depth", "Requests waiting for a batch", registry=r).set_function(lambda: batcher.queued)
        Gauge("vlm_running_requests", "Requests decoding now", registry=r).set_function(lambda: len(batcher.running))

    def batch(self, size: int, tokens: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.tokens_per_second.set(tokens / seconds if seconds > 0 else 0.0)


def _error(status: int, message: str, code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(RequestError(status, message, code=code).body(), status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    """A pydantic error as (status, one line): 400 for a body that is not JSON, 422 for a field of the wrong type."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return 400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return 422, f"{where or 'body'}: {first['msg']}"


class BodyLimit:
    """Pure ASGI middleware: a request body over `max_bytes` (declared, or counted as it arrives) fails its read with
    a 413, which the app's handler answers in OpenAI's JSON. (Starlette's own limit answers in plain text.)"""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes or (declared.isdigit() and int(declared) > self.max_bytes):
                raise HTTPException(413, f"the request body is over the limit of {self.max_bytes:,} bytes")
            return message

        await self.app(scope, limited, send)


class RequestLog:
    """Pure ASGI middleware: gives each chat or explanation request an id, and once its response is over (a stream
    included), logs one line and counts it in the metrics. The endpoint leaves the counts in `request.state`."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in LOGGED:
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), 500
        state = scope.setdefault("state", {})
        state["request_id"] = f"{LOGGED[scope['path']]}-{uuid.uuid4().hex[:24]}"

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", state["request_id"].encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.monotonic() - start
            status = state.get("stream_status", status)  # an error after a stream began is not in the HTTP status
            prompt, completion = state.get("prompt_tokens", 0), state.get("completion_tokens", 0)
            m = self.metrics
            m.requests.labels(str(status)).inc()
            if status != 200:
                m.errors.labels(str(status)).inc()
            m.latency.observe(seconds)
            m.prompt_tokens.inc(prompt)
            m.completion_tokens.inc(completion)
            log.info(
                "request %s status=%s latency=%.3fs prompt_tokens=%d completion_tokens=%d batch=%d stream=%s",
                state["request_id"],
                status,
                seconds,
                prompt,
                completion,
                state.get("batch_size", 0),
                str(state.get("stream", False)).lower(),
            )


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on `host`:`port` (0: any free port), for uvicorn; a one-line `VLMError` if it cannot."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)  # uvicorn's own default
    except OSError as e:
        raise VLMError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def create_app(model, processor, settings: ServerSettings) -> FastAPI:
    """The server for a loaded model. Its batcher's thread runs while the app does (its lifespan)."""
    batcher = Batcher(model, processor, settings.max_batch_size, settings.max_queue, settings.batch_wait_s)
    metrics = Metrics(batcher)
    batcher.on_batch = metrics.batch
    page = resources.files("vlm").joinpath("web/index.html").read_text(encoding="utf-8")
    end_ids = set(processor.stop_token_ids)

    def decode(ids: list[int]) -> str:
        return processor.tokenizer.decode(ids, skip_special_tokens=True)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="vlm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestLog, metrics=metrics)
    bearer = HTTPBearer(auto_error=False)

    def check_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if settings.api_key is None:
            return
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise RequestError(
                401, "missing or wrong API key (send it as 'Authorization: Bearer KEY')", code="invalid_api_key"
            )

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        headers = {"Retry-After": str(settings.retry_after_s)} if exc.status == 503 else None
        return JSONResponse(exc.body(), exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        status, message = _validation_message(exc)
        return _error(status, message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.error("unexpected error on %s", request.url.path, exc_info=exc)
        return _error(500, "the server failed; its log has the details", code="server_error")

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": settings.model_name, "api_key": settings.api_key is not None}

    @app.get("/metrics", dependencies=[Depends(check_key)])
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict:
        card = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "vlm"}
        return {"object": "list", "data": [card]}

    def prompt_length(question: str, num_images: int, history, new_tokens: int, new_what: str) -> int:
        """The prompt's length in tokens (images included), checked to fit the context with `new_tokens` more."""
        try:
            prompt_tokens = len(processor.prompt(question, num_images, history))
        except VLMError as e:
            raise RequestError(400, str(e), "messages") from None
        if not batcher.fits(prompt_tokens, new_tokens):
            raise RequestError(
                400,
                f"the prompt is {prompt_tokens} tokens (images included); with {new_what} that exceeds the model's "
                f"context of {batcher.context} tokens",
                "messages",
                "context_length_exceeded",
            )
        return prompt_tokens

    def prepare(body: ChatRequest) -> tuple[Turns, int, list]:
        """The request's turns, prompt length and images (in a worker thread: images take time to decode)."""
        turns = body.turns(processor.caption_prompt)
        if len(turns.image_urls) > settings.max_images:
            raise RequestError(
                400,
                f"{len(turns.image_urls)} images; this server takes at most {settings.max_images} per request",
                "messages",
                "too_many_images",
            )
        max_tokens = body.new_tokens(DEFAULT_MAX_NEW_TOKENS)
        prompt_tokens = prompt_length(
            turns.question, len(turns.image_urls), turns.history, max_tokens, f"max_tokens {max_tokens}"
        )
        images = [read_image(url, i + 1, settings.allowed_image_dir) for i, url in enumerate(turns.image_urls)]
        return turns, prompt_tokens, images

    def check_model(name: str) -> None:
        if name != settings.model_name:
            raise RequestError(
                404,
                f"the model {name!r} does not exist; this server has {settings.model_name!r}",
                "model",
                "model_not_found",
            )

    def submit(job: Job | ExplainJob) -> None:
        try:
            batcher.submit(job)
        except QueueFull:
            raise RequestError(
                503, f"the server is busy ({settings.max_queue} requests queued); retry later", code="queue_full"
            ) from None

    @app.post(CHAT_PATH, dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        stops = body.stops()
        turns, prompt_tokens, images = await run_in_threadpool(prepare, body)
        state = request.state
        state.prompt_tokens, state.stream = prompt_tokens, body.stream
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        max_tokens = body.new_tokens(DEFAULT_MAX_NEW_TOKENS)
        job = Job(
            id=state.request_id,
            question=turns.question,
            history=turns.history,
            images=images,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            tracker=TextTracker(decode, end_ids, stops, max_tokens),
            emit=lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload)),
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
        )
        submit(job)
        answer = _Answer(job, events, batcher, time.monotonic() + settings.timeout_s, state)
        head = {"id": job.id, "created": int(time.time()), "model": settings.model_name}
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return EventSourceResponse(answer.chunks(head, usage))
        finish = await answer.whole(request)
        text = job.tracker.sent
        return {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                    "logprobs": None,
                }
            ],
            "usage": answer.usage(),
        }

    def prepare_explain(body: ExplainRequest) -> tuple[str, Image.Image, int, int]:
        """The question, the image, the prompt's length and the answer's (most) tokens, checked (in a worker
        thread)."""
        question, url = body.turn(processor.caption_prompt)
        answer_tokens = (
            len(processor.text_ids(body.answer.strip())) if body.answer else body.max_tokens or DEFAULT_MAX_NEW_TOKENS
        )
        prompt_tokens = prompt_length(question, 1, None, answer_tokens, f"an answer of {answer_tokens} tokens")
        return question, read_image(url, 1, settings.allowed_image_dir), prompt_tokens, answer_tokens

    @app.post(EXPLAIN_PATH, dependencies=[Depends(check_key)])
    async def explain(body: ExplainRequest, request: Request):
        check_model(body.model)
        question, image, prompt_tokens, answer_tokens = await run_in_threadpool(prepare_explain, body)
        state = request.state
        state.prompt_tokens = prompt_tokens
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = ExplainJob(
            id=state.request_id,
            question=question,
            image=image,
            answer=body.answer,
            method=body.method,
            prompt_tokens=prompt_tokens,
            max_tokens=answer_tokens,
            emit=lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload)),
        )
        submit(job)
        maps = await _Answer(job, events, batcher, time.monotonic() + settings.timeout_s, state).whole(request)
        state.completion_tokens, state.batch_size = len(maps["tokens"]), job.batch_size
        return {
            "id": job.id,
            "object": "explanation",
            "created": int(time.time()),
            "model": settings.model_name,
            **maps,
        }

    return app


class _Answer:
    """The answer to one job, read from its events: whole, or (a chat job's) as OpenAI's stream chunks. Cancels the
    job when the client leaves or the time is up."""

    def __init__(self, job: Job | ExplainJob, events: asyncio.Queue, batcher: Batcher, deadline: float, state):
        self.job, self.events, self.batcher, self.deadline, self.state = job, events, batcher, deadline, state

    def usage(self) -> dict[str, int]:
        prompt, completion = self.job.prompt_tokens, len(self.job.tracker.tokens)
        self.state.completion_tokens, self.state.batch_size = completion, self.job.batch_size
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def events_until_done(self) -> AsyncIterator[tuple[str, Any]]:
        """("text", str) events, then ("done", reason); raises `RequestError` for an error or a timeout."""
        while True:
            try:
                kind, payload = await asyncio.wait_for(self.events.get(), self.deadline - time.monotonic())
            except TimeoutError:
                self.batcher.cancel(self.job)
                raise RequestError(503, "the request timed out; retry later", code="timeout") from None
            if kind == "error":
                raise RequestError(payload[0], payload[1], code="server_error" if payload[0] >= 500 else None)
            yield kind, payload
            if kind == "done":
                return

    async def whole(self, request: Request) -> Any:
        """What the job's "done" event carries (a chat job's finish reason, an explanation's JSON) once it is done;
        cancels the job if the client disconnects first."""

        async def collect() -> Any:
            async for kind, payload in self.events_until_done():
                if kind == "done":
                    return payload
            raise AssertionError("unreachable")

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work, watch = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():  # the client left (or the server is stopping): free the job's place
                work.cancel()
                self.batcher.cancel(self.job)
        if work.cancelled():
            raise RequestError(CLIENT_GONE, "the client disconnected")
        return work.result()

    async def chunks(self, head: dict, include_usage: bool) -> AsyncIterator[bytes]:
        """OpenAI's `chat.completion.chunk` events, then `[DONE]`. A client that leaves cancels the job (the response
        task is cancelled, and with it this generator)."""

        def event(choices: list, **more) -> bytes:
            return format_sse_event(
                data_str=json.dumps({**head, "object": "chat.completion.chunk", "choices": choices, **more})
            )

        def choice(delta: dict, finish: str | None = None) -> list:
            return [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]

        self.state.stream_status = CLIENT_GONE  # until the stream is over
        try:
            yield event(choice({"role": "assistant", "content": ""}))
            async for kind, payload in self.events_until_done():
                yield event(choice({"content": payload}) if kind == "text" else choice({}, payload))
            usage = self.usage()
            if include_usage:
                yield event([], usage=usage)
            self.state.stream_status = 200
        except RequestError as e:
            self.state.stream_status = e.status
            yield format_sse_event(data_str=json.dumps(e.body()))
        finally:
            self.batcher.cancel(self.job)  # nothing if it finished; frees its place if the client left
        yield format_sse_event(data_str="[DONE]")
