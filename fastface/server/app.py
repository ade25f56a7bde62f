"""The ASGI application behind ``fastface serve`` (FastAPI): OpenAI-compatible routes over one Pipeline.

    app = create_app(fastface.load(), ServerSettings(max_batch=16, max_wait_ms=10))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes:

- ``POST /v1/images/generations`` -- OpenAI's images API: ``prompt``, ``n``, ``size`` (the model's own, e.g.
  ``"64x64"``), ``response_format`` (``"b64_json"``: a server that keeps no files returns no URLs), ``model``;
  and fastface's ``seed`` (image i of the request uses ``seed + i``; drawn at random when absent and returned
  with each image), ``steps``, ``guidance``, and the opt-in faster-than-exact ``guidance_steps``, ``uncond_refresh``,
  ``kv_refresh``. Same prompt, seed and options -> the same PNG bytes, alone or among
  any concurrent requests.
- ``POST /v1/chat/completions`` -- understanding: the last user message holds one image (``image_url`` with a
  ``data:image/...;base64,`` URL, OpenAI's vision format) and the question text. Greedy unless ``top_p`` is given
  (then nucleus sampling at ``temperature``, seeded by ``seed``); ``max_tokens`` / ``max_completion_tokens``
  bound the answer.
- ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text: requests by route and status, batch
  rows, queue seconds, run seconds, tokens and tokens/s per task).

Every error is a JSON body in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with ``param``
naming the offending field: 400 a bad image, 401 a missing or wrong API key (compared in constant time), 404 an
unknown route, 413 a body over the size bound, 422 a field out of its bound, 429 a full queue (with
``Retry-After``), 503 while shutting down. Concurrent requests of one task with the same options decode in one
engine call (``fastface.server.batching``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import logging
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastface.checks import MAX_GUIDANCE, MAX_NEW_TOKENS
from fastface.images import ImageError, open_image
from fastface.server.batching import Batcher, BatchStats, Closed, QueueFull
from fastface.server.settings import ServerSettings

log = logging.getLogger("fastface.server")
MAX_SEED = 2**31 - 1


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
           headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


# ------------------------------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageRequest(_Body):
    prompt: str = Field(min_length=1)
    n: int = Field(1, ge=1)
    size: str | None = None
    response_format: Literal["b64_json"] = "b64_json"
    model: str | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int = Field(16, ge=1)
    guidance: float = Field(2.0, ge=-MAX_GUIDANCE, le=MAX_GUIDANCE, allow_inf_nan=False)
    # faster than exact, opt-in (Pipeline.generate_tokens): None = exact
    guidance_steps: int | None = Field(None, ge=0)
    uncond_refresh: int | None = Field(None, ge=1)
    kv_refresh: int | None = Field(None, ge=1)
    quality: str | None = None  # accepted for compatibility, ignored: one quality
    style: str | None = None  # accepted for compatibility, ignored
    user: str | None = None


class ImageURL(_Body):
    url: str
    detail: str | None = None


class ContentPart(_Body):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]
    name: str | None = None


class ChatRequest(_Body):
    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    n: int = Field(1, ge=1, le=1)
    stream: Literal[False] = False
    user: str | None = None


# ------------------------------------------------------------------------------------------------ metrics
class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fastface_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("fastface_request_seconds", "request latency by route", ["route"], registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
        self.batch_rows = Histogram("fastface_batch_rows", "rows (images or answers) per engine call", ["task"],
                                    registry=r, buckets=(1, 2, 4, 8, 16, 32, 64))
        self.batch_requests = Histogram("fastface_batch_requests", "requests per engine call", ["task"],
                                        registry=r, buckets=(1, 2, 4, 8, 16, 32, 64))
        self.queue = Histogram("fastface_queue_seconds", "time a request waited for its engine call", ["task"],
                               registry=r, buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30))
        self.run = Histogram("fastface_run_seconds", "seconds per engine call", ["task"], registry=r,
                             buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
        self.tokens = Counter("fastface_tokens", "tokens produced (image tokens or answer tokens)", ["task"],
                              registry=r)
        self.tokens_per_second = Gauge("fastface_tokens_per_second", "tokens/s of the latest engine call", ["task"],
                                       registry=r)
        self.queued = Gauge("fastface_queued_rows", "rows waiting for an engine call", ["task"], registry=r)

    def record(self, task: str, stats: BatchStats, tokens: int) -> None:
        self.batch_rows.labels(task).observe(stats.rows)
        self.batch_requests.labels(task).observe(stats.requests)
        for q in stats.queued_s:
            self.queue.labels(task).observe(q)
        self.run.labels(task).observe(stats.run_s)
        self.tokens.labels(task).inc(tokens)
        self.tokens_per_second.labels(task).set(tokens / stats.run_s if stats.run_s > 0 else 0.0)


# ------------------------------------------------------------------------------------------------- the app
_DATA_URL = re.compile(r"data:image/[\w.+-]+;base64,(?P<data>.*)", re.DOTALL)


class Service:
    """The pipeline behind the routes: request checks, the two batchers and what each batch runs."""

    def __init__(self, pipe, settings: ServerSettings):
        self.pipe = pipe
        self.settings = settings
        self.metrics = Metrics()
        self.size = f"{pipe.config.image_size}x{pipe.config.image_size}"
        self.max_text = pipe.config.max_text_len - 3  # <t2i> <bos> text <eos>
        # one worker thread runs every model call (both batchers' batches and the image encoding of chat
        # requests): the pipeline serialises its engine anyway, and two threads of torch work would only share cores
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastface-model")
        common = dict(max_batch=settings.max_batch, max_wait_s=settings.max_wait_ms / 1000,
                      max_queue=settings.max_queue, executor=self.worker)
        self.images = Batcher(self._run_images, on_batch=lambda s: self._record("images", s), **common)
        self.answers = Batcher(self._run_answers, on_batch=lambda s: self._record("answers", s), **common)

    # ------------------------------------------------------------------------------------ batch bodies
    def _run_images(self, key, rows) -> list[str]:
        _, steps, guidance, guidance_steps, uncond_refresh, kv_refresh = key
        prompts, seeds = [r[0] for r in rows], [r[1] for r in rows]
        tokens = self.pipe.generate_tokens(prompts, steps=steps, guidance=guidance, seed=seeds,
                                           guidance_steps=guidance_steps, uncond_refresh=uncond_refresh,
                                           kv_refresh=kv_refresh)
        out = []
        for image in self.pipe.decode_images(tokens):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        return out

    def _run_answers(self, key, rows) -> list[tuple[str, int]]:
        _, max_new, temperature, top_p = key
        ids = torch.stack([r[0] for r in rows])
        answers = self.pipe.answer(ids, [r[1] for r in rows], max_new_tokens=max_new, top_p=top_p,
                                   temperature=temperature, seed=[r[2] for r in rows])
        return [(a, len(self.pipe.encode_text(a)) + 1) for a in answers]  # + <eos>

    def _record(self, task: str, stats: BatchStats) -> None:
        if stats.results is None:
            tokens = 0
        elif task == "images":
            tokens = stats.rows * self.pipe.config.image_tokens
        else:
            tokens = sum(n for _, n in stats.results)
        self.metrics.record(task, stats, tokens)

    # ---------------------------------------------------------------------------------------- checks
    def check_model(self, model: str | None) -> None:
        if model not in (None, "", self.settings.model_name):
            raise APIError(404, f"model {model!r} is not served here (this server serves "
                           f"{self.settings.model_name!r})", param="model", kind="not_found_error")

    def check_prompt(self, field: str, text: str) -> None:
        if len(text) > self.settings.max_prompt_chars:
            raise APIError(422, f"{field} has {len(text)} characters; at most {self.settings.max_prompt_chars}",
                           param=field)
        n = len(self.pipe.encode_text(text))
        if n > self.max_text:
            raise APIError(422, f"{field} has {n} tokens; this model reads at most {self.max_text}", param=field)

    def image_ids(self, url: str) -> torch.Tensor:
        match = _DATA_URL.fullmatch(url.strip())
        if match is None:
            raise APIError(400, "image_url.url must be a data URL (data:image/png;base64,...); this server fetches "
                           "no remote images", param="messages.image_url.url")
        try:
            data = base64.b64decode(match["data"], validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "image_url.url holds invalid base64", param="messages.image_url.url") from None
        try:
            image = open_image(data)
            return self.pipe.encode_images([image])[0]
        except (ImageError, ValueError) as exc:
            raise APIError(400, str(exc), param="messages.image_url.url") from None


def create_app(pipe, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI application serving ``pipe`` (a ``fastface.Pipeline``) under ``settings``."""
    settings = settings or ServerSettings()
    service = Service(pipe, settings)

    @asynccontextmanager
    async def lifespan(app):
        await service.images.start()
        await service.answers.start()
        log.info("fastface serve: %s ready (max batch %d, max wait %g ms)", settings.model_name,
                 settings.max_batch, settings.max_wait_ms)
        yield
        # uvicorn has finished the in-flight requests; finish anything still queued, then stop
        await service.images.close()
        await service.answers.close()
        service.worker.shutdown(wait=True)

    app = FastAPI(title="fastface", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service

    # ------------------------------------------------------------------------------ errors, limits, auth
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error(exc.status, exc.message, exc.param, exc.kind, exc.headers)

    @app.exception_handler(QueueFull)
    async def _queue_full(request, exc: QueueFull):
        return _error(429, str(exc), None, "rate_limit_error", {"Retry-After": "1"})

    @app.exception_handler(Closed)
    async def _closed(request, exc: Closed):
        return _error(503, str(exc), None, "server_error")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return _error(422, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), None, kind)

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):
        log.exception("fastface serve: internal error on %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}", None, "server_error")

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        route = request.url.path
        start = time.monotonic()
        response = await _checked(request, call_next)
        known = route if route in _ROUTES else "other"
        service.metrics.requests.labels(known, str(response.status_code)).inc()
        service.metrics.latency.labels(known).observe(time.monotonic() - start)
        return response

    async def _checked(request: Request, call_next):
        if settings.api_key is not None and request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
                return _error(401, "missing or wrong API key (Authorization: Bearer KEY)", None,
                              "authentication_error", {"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, on_refused=service.metrics.requests)

    # --------------------------------------------------------------------------------------- routes
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "queued": {"images": service.images.queued_rows,
                                                                          "answers": service.answers.queued_rows}}

    @app.get("/metrics")
    async def metrics():
        for task, batcher in (("images", service.images), ("answers", service.answers)):
            service.metrics.queued.labels(task).set(batcher.queued_rows)
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "fastface"}]}

    @app.post("/v1/images/generations")
    async def images(body: ImageRequest):
        service.check_model(body.model)
        if body.n > settings.max_n:
            raise APIError(422, f"n={body.n}; at most {settings.max_n} images per request", param="n")
        if body.steps > settings.max_steps:
            raise APIError(422, f"steps={body.steps}; this server runs at most {settings.max_steps}", param="steps")
        for name in ("guidance_steps", "uncond_refresh", "kv_refresh"):
            value = getattr(body, name)
            if value is not None and value > settings.max_steps:
                raise APIError(422, f"{name}={value}; this server runs at most {settings.max_steps} steps", param=name)
        if body.kv_refresh is not None and not service.pipe.decoder.uses_engine:
            raise APIError(422, "kv_refresh reuses the engine's keys/values; this server runs the reference loop",
                           param="kv_refresh")
        if body.size not in (None, "auto", service.size):
            raise APIError(422, f"size {body.size!r}: this model draws {service.size} images", param="size")
        service.check_prompt("prompt", body.prompt)
        seed = secrets.randbelow(MAX_SEED - settings.max_n) if body.seed is None else body.seed
        if seed + body.n - 1 > MAX_SEED:
            raise APIError(422, f"seed + n - 1 must be <= {MAX_SEED}", param="seed")
        rows = [(body.prompt, seed + i) for i in range(body.n)]
        images = await service.images.submit(("images", body.steps, body.guidance, body.guidance_steps,
                                              body.uncond_refresh, body.kv_refresh), rows)
        return {"created": int(time.time()),
                "data": [{"b64_json": b64, "revised_prompt": body.prompt, "seed": seed + i}
                         for i, b64 in enumerate(images)]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        service.check_model(body.model)
        question, url = _question_and_image(body.messages)
        service.check_prompt("messages.content.text", question)
        ids = await asyncio.get_running_loop().run_in_executor(service.worker, service.image_ids, url)
        max_new = body.max_completion_tokens or body.max_tokens or pipe.config.max_answer_len
        temperature = 1.0 if body.temperature in (None, 0) else body.temperature
        top_p = None if body.temperature == 0 else body.top_p
        seed = 0 if body.seed is None else body.seed
        [(text, completion)] = await service.answers.submit(("answers", max_new, temperature, top_p),
                                                            [(ids, question, seed)])
        prompt_tokens = pipe.config.image_tokens + len(pipe.encode_text(question)) + 5
        finish = "length" if completion > max_new else "stop"
        return {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion", "created": int(time.time()),
                "model": settings.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                             "logprobs": None}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": min(completion, max_new),
                          "total_tokens": prompt_tokens + min(completion, max_new)}}

    return app


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 -- by its Content-Length before anything is read,
    or, when chunked, as soon as the bytes received pass the bound (the route never sees more)."""

    def __init__(self, app, *, max_bytes: int, on_refused=None):
        self.app, self.max_bytes, self.on_refused = app, max_bytes, on_refused

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(scope, send, f"request body of {length.decode(errors='replace')!s:.20} "
                                                   f"bytes; at most {self.max_bytes}")
        received, too_large, refused = 0, False, False

        async def limited_receive():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise _TooLarge  # (the framework may turn this into its own error response: replaced below)
            return message

        async def guarded_send(message):
            nonlocal refused
            if not too_large:
                return await send(message)
            if not refused:
                refused = True
                await self._refuse(scope, send, f"request body over {self.max_bytes} bytes")

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            if not refused:
                await self._refuse(scope, send, f"request body over {self.max_bytes} bytes")

    async def _refuse(self, scope, send, message: str):
        if self.on_refused is not None:
            route = scope.get("path", "")
            self.on_refused.labels(route if route in _ROUTES else "other", "413").inc()
        await _error(413, message)(scope, None, send)


_ROUTES = ("/health", "/metrics", "/v1/models", "/v1/images/generations", "/v1/chat/completions")


def _question_and_image(messages: list[Message]) -> tuple[str, str]:
    """The last user message's text and its one image."""
    users = [m for m in messages if m.role == "user"]
    if not users:
        raise APIError(422, "messages hold no user message", param="messages")
    content: Any = users[-1].content
    if isinstance(content, str):
        raise APIError(422, "the user message holds no image: give content as a list with one image_url part and "
                       "one text part", param="messages.content")
    texts = [p.text for p in content if p.type == "text" and p.text]
    images = [p.image_url.url for p in content if p.type == "image_url" and p.image_url is not None]
    if len(images) != 1:
        raise APIError(422, f"the user message must hold exactly one image, got {len(images)}",
                       param="messages.content.image_url")
    if not texts:
        raise APIError(422, "the user message holds no question text", param="messages.content.text")
    return " ".join(texts), images[0]


def _version() -> str:
    from fastface import __version__

    return __version__
