"""The FastAPI application: routes, auth, error mapping, and the batcher's lifecycle.

`create_app(engine, settings)` takes any object with the ServeEngine methods (compinv_rt.apps.serve.
engine.SessionEngine in production, small fakes in tests), so the HTTP behaviour is tested without
a model and the model behaviour without HTTP.
"""


import asyncio
import base64
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Protocol

from fastapi import Depends, FastAPI, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from compinv_rt.apps.serve import schemas
from compinv_rt.apps.serve.batcher import Batcher, BatchFailed, QueueFull, ShuttingDown
from compinv_rt.apps.serve.engine import ConceptExists
from compinv_rt.apps.serve.guard import Guard
from compinv_rt.apps.serve.metrics import ServeMetrics
from compinv_rt.apps.serve.playground import add_playground
from compinv_rt.apps.serve.settings import ServeSettings, is_local
from compinv_rt.apps.serve.step_batcher import StepBatcher
from compinv_rt.core.errors import CompinvError

log = logging.getLogger(__name__)
audit = logging.getLogger("compinv_rt.apps.serve.audit")  # concept uploads and deletes

SIDECAR_HEADER = "X-Compinv-Sidecar"
UPLOAD_FILES = ("embeddings", "artifact")  # multipart fields of a concept upload


# No `from __future__ import annotations` here: FastAPI reads the per-server request model from
# the endpoint's annotation at run time.


class ServeEngine(Protocol):
    """What the app needs; an engine that also has the step-loop methods (steppable, room, admit,
    step, result, drop: step_batcher.StepBatcher) gets step-level batching."""

    def describe(self) -> dict: ...  # {"model": {...}, "backend": str}
    def plan(self, request) -> tuple[list, object]: ...  # (items, batch key); CompinvError = 400
    # per item (png bytes, sidecar, batch size) or the CompinvError that failed its request
    def run(self, items: Sequence, should_stop: Callable[[], bool]) -> list: ...
    def list_concepts(self) -> list[dict]: ...
    def add_concept(self, name: str, files: dict[str, bytes]) -> dict: ...  # CompinvError = 400
    def remove_concept(self, name: str) -> None: ...  # KeyError = 404


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    """All schema problems in one line: `n: Input should be less than or equal to 4; ...`."""
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "path", "query")]
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        elif err.get("type") == "json_invalid":
            loc, msg = [], f"the body is not valid JSON ({err.get('ctx', {}).get('error', '?')})"
        msg = msg.removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (the ASGI server sends http.disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "-")


def _client(request: Request) -> str:
    return request.client.host if request.client else "-"


@dataclass(frozen=True)
class _Served:
    """What the routes share: one engine, its batcher and metrics, and the server's settings."""

    engine: ServeEngine
    settings: ServeSettings
    batcher: Batcher | StepBatcher
    metrics: ServeMetrics


def create_app(engine: ServeEngine, settings: ServeSettings) -> FastAPI:
    """The app: one batcher in front of `engine`, the guards, then the routes by group."""
    metrics = ServeMetrics(settings.max_batch)
    metrics.concepts.set(len(engine.list_concepts()))
    batcher: Batcher | StepBatcher
    if settings.step_batching and hasattr(engine, "admit"):  # the engine has a step loop
        batcher = StepBatcher(engine, settings.max_batch, settings.queue_size,
                              settings.max_wait_ms / 1000, on_admit=metrics.queue_wait.observe,
                              on_step=metrics.on_step, on_batch=metrics.on_batch,
                              on_depth=metrics.queue_depth.set)
    else:
        batcher = Batcher(engine.run, settings.max_batch, settings.max_wait_ms / 1000,
                          settings.queue_size, on_batch=metrics.on_batch,
                          on_depth=metrics.queue_depth.set)
    served = _Served(engine, settings, batcher, metrics)
    app = _new_app(batcher)
    app.state.batcher, app.state.metrics, app.state.engine = batcher, metrics, engine
    _add_guards(app, settings)
    _answer_errors_as_400(app)
    auth = [Depends(_token_check(settings.token))]  # checked before the body by Guard; here for the schema
    # Registration order is the order of /openapi.json's paths: ops, generate, concepts.
    _add_ops_routes(app, served, auth)
    _add_generate_route(app, served, auth, schemas.generate_request_model(settings.limits))
    _add_concept_routes(app, served, auth)
    add_playground(app)  # the browser page at `/` (static files; its API calls carry the token)
    return app


def _new_app(batcher: Batcher | StepBatcher) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.close()  # uvicorn has let in-flight requests finish; drain what is queued

    return FastAPI(
        title="compinv-rt", lifespan=lifespan,
        description="Online generation with trained concepts and layouts; compatible requests "
        "share one UNet batch. Errors are JSON `{\"error\": message}`; a request that fails "
        "validation is a 400 (never 422).",
        responses={400: {"model": schemas.ErrorBody}, 401: {"model": schemas.ErrorBody},
                   413: {"model": schemas.ErrorBody, "description": "body over the size limit"}})


def _add_guards(app: FastAPI, settings: ServeSettings) -> None:
    """ASGI middleware, which sees every request before routing (and bodies before they are read)."""
    # Outermost first: request ids + access log + token + body limit, then (loopback without a
    # token) a Host allow-list, so a web page cannot reach this server by DNS rebinding.
    if settings.token is None and is_local(settings.host):
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware,
                           allowed_hosts=["localhost", "127.0.0.1", "[::1]", settings.host])
    app.add_middleware(Guard, token=settings.token, body_limit=settings.body_max_bytes,
                       upload_limit=settings.upload_max_bytes)


def _token_check(token: str | None) -> Callable:
    """The bearer-token dependency: Guard enforces the token; this documents it in the schema."""
    bearer = HTTPBearer(auto_error=False)

    def require_token(cred: HTTPAuthorizationCredentials | None = Depends(bearer)):
        if token is None:
            return
        if cred is None or not secrets.compare_digest(cred.credentials.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    return require_token


def _answer_errors_as_400(app: FastAPI) -> None:
    """Every error is `{"error": message}`, and a request that fails validation is a 400: FastAPI
    would answer (and document) a 422 with a list of details."""

    def openapi() -> dict:
        """FastAPI documents a 422 for every route with a body; this app answers 400."""
        schema = app.openapi_schema
        if schema is None:
            schema = FastAPI.openapi(app)  # built once, then cached in app.openapi_schema
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request, exc):
        return _error(400, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


def _add_ops_routes(app: FastAPI, served: _Served, auth: list) -> None:
    """/health (no token: load balancers probe it) and /metrics."""
    engine, batcher = served.engine, served.batcher

    @app.get("/health", response_model=schemas.Health, tags=["ops"])
    async def health():
        """Liveness and readiness; needs no token."""
        info = engine.describe()
        return {"status": "stopping" if batcher.closing else "ok", "model": info["model"],
                "backend": info["backend"], "queue_depth": batcher.depth,
                "max_batch": served.settings.max_batch}

    @app.get("/metrics", dependencies=auth, tags=["ops"], response_class=PlainTextResponse)
    async def prometheus_metrics():
        """Prometheus text format: queue depth, batch size/occupancy, latencies, images."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(served.metrics.registry), media_type=CONTENT_TYPE_LATEST)


_GENERATE_RESPONSES: dict = {
    200: {"content": {"image/png": {}, "text/event-stream": {}}, "description": (
        "JSON (default) or, with response=png and n=1, the PNG bytes with the sidecar "
        f"in the {SIDECAR_HEADER} header; with stream=true, server-sent events: `progress` "
        "{step, total} after each denoising step, then `result` (the JSON response) or `error` "
        "{error}. Errors found before the stream starts (400, 503) are plain JSON answers.")},
    503: {"model": schemas.ErrorBody, "description": "queue full (Retry-After)"},
    504: {"model": schemas.ErrorBody}, 500: {"model": schemas.ErrorBody}}


def _add_generate_route(app: FastAPI, served: _Served, auth: list, GenerateRequest: type) -> None:
    """POST /v1/generate. The body model is built per server (its limits are in the schema), so
    the route is declared here, where that model is a local name FastAPI can read."""
    metrics = served.metrics

    @app.post("/v1/generate", dependencies=auth, tags=["generate"],
              response_model=schemas.GenerateResponse, response_model_exclude_unset=True,
              responses=_GENERATE_RESPONSES)
    async def generate(body: GenerateRequest, request: Request):  # type: ignore[valid-type]
        """Generate n images. Each image equals `compinv-rt generate`'s for the same seed and
        settings, whatever it is batched with."""
        started = time.monotonic()
        metrics.in_flight.inc()
        try:
            submitted = await _submit(served, body)
            if body.stream and not isinstance(submitted, tuple):  # type: ignore[attr-defined]
                return _stream(served, body, request, started, submitted)
            code, response = submitted if isinstance(submitted, tuple) else \
                await _generate(served, body, request, started, submitted)
        finally:
            metrics.in_flight.dec()
        _count(served, code, started)
        return response


def _count(served: _Served, code: int, started: float) -> None:
    served.metrics.requests.labels("generate", str(code)).inc()
    if code == 200:
        served.metrics.latency.observe(time.monotonic() - started)


class _Submitted:
    """A queued request: its images' futures and its progress events."""

    def __init__(self, n: int):
        self.futures: list = []
        self.events: asyncio.Queue = asyncio.Queue()
        self._done = [0] * n
        self._last = -1

    def progress(self, k: int, done: int, total: int) -> None:
        """Item k did `done` of `total` steps; the request's step is its images' mean (floored)."""
        self._done[k] = done
        step = sum(self._done) // len(self._done)
        if step > self._last:
            self._last = step
            self.events.put_nowait({"step": step, "total": total})


async def _submit(served: _Served, body):
    """Plan (a 400 before queueing) and queue (503 when full): a _Submitted, or (status, response)."""
    if body.response == "png" and body.n != 1:
        return 400, _error(400, "response=png returns one image: use n=1 or response=json")
    if body.response == "png" and body.stream:
        return 400, _error(400, "stream=true answers events with JSON: use response=json")
    try:
        items, key = served.engine.plan(body)
    except (CompinvError, ValueError) as exc:
        return 400, _error(400, str(exc))
    sub = _Submitted(len(items))
    try:
        if isinstance(served.batcher, StepBatcher):
            sub.futures = served.batcher.submit(items, key, sub.progress)
        else:
            sub.futures = served.batcher.submit(items, key)
    except QueueFull as exc:
        served.metrics.rejected.inc()
        return 503, _error(503, str(exc), {"Retry-After": str(int(exc.retry_after + 0.999))})
    except ShuttingDown as exc:
        return 503, _error(503, str(exc), {"Retry-After": "5"})
    return sub


def _sse(event: str, data) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _stream(served: _Served, body, request: Request, started: float, sub: _Submitted):
    """The events of one request: progress until its images are done, then result or error."""
    answer = asyncio.ensure_future(_generate(served, body, request, started, sub))

    async def events():
        try:
            while not answer.done():
                getter = asyncio.ensure_future(sub.events.get())
                await asyncio.wait({getter, answer}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield _sse("progress", getter.result())
                else:
                    getter.cancel()
            while not sub.events.empty():  # steps reported just before the answer
                yield _sse("progress", sub.events.get_nowait())
            code, response = answer.result()
            _count(served, code, started)
            if code == 200:
                yield _sse("result", response)
            elif code != 499:  # nobody is listening any more
                yield _sse("error", json.loads(bytes(response.body)))  # type: ignore[attr-defined]
        finally:
            if not answer.done():  # the stream was torn down (the client left): stop its images
                answer.cancel()
                for f in sub.futures:
                    f.cancel()
                served.metrics.cancelled.inc(len(sub.futures))

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _generate(served: _Served, body, request: Request, started: float,
                    sub: _Submitted) -> tuple[int, object]:
    """(status, response) of one queued request: wait (504 on timeout, 499 when the client
    left), answer."""
    futures = sub.futures
    gathered, failure = await _wait_results(served, futures, request)
    if failure is not None:
        return failure
    try:
        results = gathered.result()
    except BatchFailed as exc:  # its text may hold server paths: for the log only
        log.error("request %s: batch failed: %s", _request_id(request), exc)
        return 500, _error(500, f"generation failed ({str(exc).split(':')[0]}); the server "
                           f"log has the details under request id {_request_id(request)}")
    except CompinvError as exc:  # found only when its batch ran (a layout phrase, say)
        return 400, _error(400, str(exc))
    return 200, _generate_response(body, results, started)


async def _wait_results(served: _Served, futures: list, request: Request):
    """Wait for a request's images: (gathered, None) when they are done, else (gathered, (status,
    response)) after the timeout (504) or the client's disconnect (499), with its items cancelled."""
    gathered = asyncio.ensure_future(asyncio.gather(*futures))
    left = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({gathered, left}, timeout=served.settings.timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
    if gathered in done:
        return gathered, None
    gathered.cancel()
    gathered.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved
    for f in futures:  # queued items are dropped; a batch of only these stops early
        f.cancel()
    served.metrics.cancelled.inc(len(futures))
    if left in done:
        return gathered, (499, Response(status_code=499))  # nobody is listening any more
    return gathered, (504, _error(504, f"not done within the {served.settings.timeout_s:g} s "
                                       "request timeout"))


def _generate_response(body, results: list, started: float):
    """The PNG with its sidecar in a header (response=png), else JSON with every image."""
    if body.response == "png":
        png, sidecar = results[0][:2]
        return Response(png, media_type="image/png",
                        headers={SIDECAR_HEADER: json.dumps(sidecar, separators=(",", ":"))})
    images = []
    for png, side, _, *attention in results:
        image = {"png_base64": base64.b64encode(png).decode(), "sidecar": side}
        if attention and attention[0] is not None:
            image["attention"] = attention[0]
        images.append(image)
    return {"images": images, "batch_sizes": [r[2] for r in results],
            "seconds": round(time.monotonic() - started, 4)}


ConceptPath = Annotated[str, Path(description="The concept's name on this server."),
                        AfterValidator(schemas.check_concept_name)]

# Documented by hand: the route reads the multipart body itself (after Guard's size check).
_UPLOAD_BODY: dict = {"requestBody": {"required": True, "content": {"multipart/form-data": {
    "schema": {"type": "object", "required": list(UPLOAD_FILES), "properties": {
        "embeddings": {"type": "string", "format": "binary",
                       "description": "embeddings.safetensors of `compinv-rt train`"},
        "artifact": {"type": "string", "format": "binary",
                     "description": "its artifact.json"}}}}}}}


def _add_concept_routes(app: FastAPI, served: _Served, auth: list) -> None:
    """GET/PUT/DELETE /v1/concepts: the served concepts, changed live (each change audited)."""
    engine, metrics = served.engine, served.metrics

    @app.get("/v1/concepts", dependencies=auth, response_model=schemas.ConceptList,
             tags=["concepts"])
    async def list_concepts():
        return {"concepts": engine.list_concepts()}

    @app.put("/v1/concepts/{name}", dependencies=auth, response_model=schemas.ConceptInfo,
             status_code=201, tags=["concepts"],
             responses={409: {"model": schemas.ErrorBody}, 413: {"model": schemas.ErrorBody}},
             openapi_extra=_UPLOAD_BODY)
    async def add_concept(request: Request, name: ConceptPath):
        """Add a trained concept (validated against the served model's hash); live at once."""
        body = await request.body()  # Guard has capped it at --upload-max-bytes
        files = await _parse_upload(request, body)
        where = f"concept {name!r} (request {_request_id(request)}, client {_client(request)})"
        try:
            info = await run_in_threadpool(engine.add_concept, name, files)
        except ConceptExists as exc:
            audit.info("upload of %s refused: %s", where, exc)
            return _error(409, str(exc))
        except (CompinvError, ValueError) as exc:
            audit.info("upload of %s refused: %s", where, exc)
            return _error(400, f"concept refused: {exc}")
        audit.info("uploaded %s: token %s, %d vector(s)", where, info["token"], info["vectors"])
        metrics.concepts.set(len(engine.list_concepts()))
        return JSONResponse(info, status_code=201)

    @app.delete("/v1/concepts/{name}", dependencies=auth, status_code=204, tags=["concepts"],
                responses={404: {"model": schemas.ErrorBody}})
    async def remove_concept(name: ConceptPath, request: Request):
        try:
            await run_in_threadpool(engine.remove_concept, name)
        except KeyError:
            return _error(404, f"no concept named {name!r}")
        audit.info("deleted concept %r (request %s, client %s)", name, _request_id(request),
                   _client(request))
        metrics.concepts.set(len(engine.list_concepts()))
        return Response(status_code=204)


async def _parse_upload(request: Request, body: bytes) -> dict[str, bytes]:
    """The two files of a concept upload from an already size-checked multipart body."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(400, "upload a multipart/form-data body with the files 'embeddings' "
                            "(embeddings.safetensors) and 'artifact' (artifact.json)")

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form(max_files=len(UPLOAD_FILES), max_fields=4,
                                                       max_part_size=len(body) + 1)
    files = {}
    for key in UPLOAD_FILES:
        part = form.get(key)
        if part is None or isinstance(part, str):
            raise HTTPException(400, f"the upload lacks the file {key!r} (multipart fields: "
                                f"{', '.join(UPLOAD_FILES)})")
        files[key] = await part.read()
    extra = sorted(set(form.keys()) - set(UPLOAD_FILES))
    if extra:
        raise HTTPException(400, f"unknown upload field(s) {extra}; known: {list(UPLOAD_FILES)}")
    return files
