"""HTTP service that draws MNIST digits from ``models/generator.onnx`` (FastAPI + uvicorn).

    python -m pipeline.serve --model models/generator.onnx [--host 127.0.0.1 --port 8000]

Endpoints: ``GET /generate`` (query) and ``POST /generate`` (JSON body, may carry an explicit
``z``) answer a PNG grid or JSON arrays; ``GET /metadata`` is the model's contract;
``GET /healthz`` says the process is alive, ``GET /readyz`` that the model is loaded; the
OpenAPI schema is at ``/openapi.json`` (browse it at ``/docs``).

Design choices a reader should know about:

- The process always starts, even with a missing or broken model: a container that
  crash-loops hides the reason, while ``/readyz`` (503 + reason), ``/generate`` (503) and
  the log all say what is wrong.
- Every limit rejects at once instead of queueing: too many requests in flight get 429,
  a body over the limit 413, so a flood cannot make the service hang or run out of memory.
- Only onnxruntime, numpy and Pillow do the work (via :mod:`pipeline.inference`):
  no TensorFlow import, so the process is ready in well under a second.
- Requests never name files or models: the model path comes from the operator only.
"""

import argparse
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio.to_thread
import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from pipeline.images import NUM_CLASSES, to_uint8
from pipeline.inference import Generator, InputError, ModelError, encode_png
from pipeline.page import mount_page

log = logging.getLogger("pipeline.serve")
access_log = logging.getLogger("pipeline.serve.access")

MAX_SEED = 2**53 - 1  # the largest integer every JSON client (JavaScript too) keeps exact
MAX_ABS_Z = 100.0  # trained noise is N(0, 1) or U(-1, 1); far larger values only make NaNs
# Up to this many images the onnxruntime call plus encoding takes well under a millisecond,
# less than handing it to a worker thread costs, so it runs inline on the event loop.
INLINE_MAX_N = 8

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# --------------------------------------------------------------------------- settings


class SettingsError(ValueError):
    """A setting (env var or CLI flag) is invalid; the message names it, its value and what
    is allowed."""


@dataclass(frozen=True)
class Settings:
    """Operator settings: CLI flags override ``MNIST_GAN_*`` env vars override defaults."""

    model: Path = Path("models/generator.onnx")
    host: str = "127.0.0.1"  # the container sets 0.0.0.0 explicitly
    port: int = field(default=8000, metadata={"range": (1, 65535)})
    max_n: int = field(default=256, metadata={"range": (1, 1024)})
    max_concurrency: int = field(default=8, metadata={"range": (1, 1024)})
    max_body_bytes: int = field(default=1 << 20, metadata={"range": (64, 64 << 20)})
    # Processes, each with its own copy of the model and its own concurrency limit; one
    # event loop saturates one core, so more workers scale the n=1 rate with the cores.
    workers: int = field(default=1, metadata={"range": (1, 64)})
    log_level: str = "INFO"

    @classmethod
    def load(cls, env: Mapping[str, str], **overrides: Any) -> "Settings":
        """Settings from ``env`` (``MNIST_GAN_<NAME>``) and non-None ``overrides``."""
        values: dict[str, Any] = {}
        for spec in fields(cls):
            name = f"MNIST_GAN_{spec.name.upper()}"
            raw = overrides.get(spec.name)
            if raw is None:
                raw = env.get(name)
            if raw is None:
                continue
            values[spec.name] = _parse_setting(name, spec.name, raw, spec.metadata.get("range"))
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The ``MNIST_GAN_*`` variables that :meth:`load` turns back into these settings."""
        return {
            f"MNIST_GAN_{spec.name.upper()}": str(getattr(self, spec.name)) for spec in fields(self)
        }


def _parse_setting(name: str, key: str, raw: Any, bounds: tuple[int, int] | None) -> Any:
    if key == "model":
        return Path(raw)
    if key == "log_level":
        level = str(raw).upper()
        allowed = ("DEBUG", "INFO", "WARNING", "ERROR")
        if level not in allowed:
            raise SettingsError(f"{name}={raw!r} is invalid; allowed: {' | '.join(allowed)}")
        return level
    if bounds is None:
        return str(raw)
    low, high = bounds
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = None
    if value is None or not low <= value <= high:
        raise SettingsError(f"{name}={raw!r} is invalid; allowed: an integer from {low} to {high}")
    return value


# --------------------------------------------------------------------------- API schema


Format = Literal["png", "json"]
DType = Literal["uint8", "float32"]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, description="same seed, same images")]
LatentValue = Annotated[float, Field(ge=-MAX_ABS_Z, le=MAX_ABS_Z, allow_inf_nan=False)]


class Images(BaseModel):
    n: int
    shape: list[int] = Field(description="[n, 28, 28]")
    dtype: DType
    seed: int | None = Field(description="the seed used (drawn at random when not given)")
    digit: int | None
    images: list[list[list[float]]] = Field(description="pixel rows; uint8 0..255 or [0, 1]")


class Problem(BaseModel):
    detail: str


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    reason: str | None = Field(description="why the model is not loaded")


class Metadata(BaseModel):
    latent_dim: int
    noise: str
    num_classes: int = Field(description="0 for an unconditional model")
    conditional: bool
    max_n: int = Field(description="largest n one request may ask for")
    metadata: dict[str, str] = Field(description="the ONNX file's metadata_props")


def _request_models(
    max_n: int, digit_type: Any, latent_dim: int | None
) -> tuple[type[BaseModel], type[BaseModel]]:
    """The fields of GET's query and POST's JSON body: the same, plus ``z`` in the body.
    The limits come from the settings and the loaded model, so the schema states them."""

    class GenerateQuery(BaseModel):
        model_config = ConfigDict(extra="forbid")  # a typo (?digt=3) is an error, not ignored

        n: int = Field(16, ge=1, le=max_n, description="number of images")
        seed: Seed | None = None
        digit: digit_type | None = None
        format: Format = "png"
        dtype: DType = Field("uint8", description="pixel type of format=json")

    row = Field(min_length=latent_dim, max_length=latent_dim) if latent_dim else Field()

    class GenerateBody(GenerateQuery):
        # strict: JSON types as declared (no true for 1, no "5" for 5).
        model_config = ConfigDict(extra="forbid", strict=True)

        n: int | None = Field(
            None, ge=1, le=max_n, description="number of images; default 16, or len(z)"
        )
        z: list[Annotated[list[LatentValue], row]] | None = Field(
            None,
            min_length=1,
            max_length=max_n,
            description="explicit latent vectors [n, latent_dim] instead of seeded noise",
        )

    return GenerateQuery, GenerateBody


def _generate_responses() -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "model": Images,
            "description": "a PNG grid (format=png) or the images as JSON arrays",
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        },
        400: {"model": Problem, "description": "a body that is not even text (not UTF-8)"},
        413: {"model": Problem, "description": "request body over MNIST_GAN_MAX_BODY_BYTES"},
        429: {"model": Problem, "description": "MNIST_GAN_MAX_CONCURRENCY requests in flight"},
        503: {"model": Problem, "description": "the model is not loaded (see /readyz)"},
    }


# --------------------------------------------------------------------------- the work


@dataclass
class ModelState:
    generator: Generator | None
    reason: str | None  # why generator is None

    @classmethod
    def load(cls, settings: Settings) -> "ModelState":
        try:
            generator = Generator(settings.model, max_n=settings.max_n)
        except ModelError as error:
            log.error("model not loaded, serving 503 until restarted: %s", error)
            return cls(None, str(error))
        log.info(
            "model loaded", extra={"fields": {"model": str(settings.model), **generator.metadata}}
        )
        return cls(generator, None)


class NotReadyError(Exception):
    pass


class BadInputError(Exception):
    def __init__(self, where: str, error: InputError) -> None:
        self.where = where
        self.error = error


def _render(
    generator: Generator,
    n: int,
    seed: int,
    digit: int | None,
    z: np.ndarray | None,
    fmt: Format,
    dtype: DType,
) -> Response:
    images = generator.generate(n, seed=seed, digit=digit, z=z)
    headers = {"X-Seed": str(seed)}
    if fmt == "png":
        png = encode_png(images, generator.columns(n, digit))
        return Response(png, media_type="image/png", headers=headers)
    pixels = to_uint8(images) if dtype == "uint8" else images
    body = {
        "n": n,
        "shape": list(images.shape),
        "dtype": dtype,
        "seed": seed,
        "digit": digit,
        "images": pixels.tolist(),
    }
    return Response(
        json.dumps(body, separators=(",", ":")), media_type="application/json", headers=headers
    )


async def _generate(state: ModelState, where: str, request: Any) -> Response:
    """Serves GET (``request`` is the query model) and POST (the body model, maybe with z)."""
    generator = state.generator
    if generator is None:
        raise NotReadyError(state.reason)
    # An unseeded request is random, but reports the seed it drew so it can be replayed.
    seed = secrets.randbelow(2**32) if request.seed is None else request.seed
    n, z, latent = request.n, getattr(request, "z", None), None
    try:
        if z is not None:
            if n is not None and n != len(z):
                raise InputError("n", n, f"omitted, or len(z) = {len(z)}")
            n, latent = len(z), np.asarray(z, dtype=np.float32)
        n = 16 if n is None else n
        work = (generator, n, seed, request.digit, latent, request.format, request.dtype)
        if n <= INLINE_MAX_N:
            return _render(*work)
        return await anyio.to_thread.run_sync(_render, *work)
    except InputError as error:
        raise BadInputError(where, error) from None


# --------------------------------------------------------------------------- middleware


def _reply(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class Limits:
    """Rejects instead of queueing: a body over ``max_body_bytes`` gets 413 (checked on the
    declared length, then while reading, for chunked uploads), and ``/generate`` requests
    beyond ``max_concurrency`` in flight get 429 at once, so a flood gets a quick "retry
    later" instead of a growing queue, time-outs and memory growth."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_concurrency: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_concurrency = max_concurrency
        self.in_flight = 0  # one event loop: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            receive = await self._read_body(scope, receive, send)
            if receive is None:
                return
        if not scope["path"].startswith("/generate"):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_concurrency:
            busy = f"{self.in_flight} requests in flight (MNIST_GAN_MAX_CONCURRENCY)"
            await _reply(429, busy, {"Retry-After": "1"})(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """A ``receive`` that replays the whole body (the handlers parse all of it anyway),
        or None when a 413 or the client going away has ended the request."""
        too_large = _reply(
            413, f"request body over {self.max_body_bytes} bytes (MNIST_GAN_MAX_BODY_BYTES)"
        )
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await too_large(scope, receive, send)
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await too_large(scope, receive, send)
                return None
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:  # what an app awaits after the body: the client going away
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return replay


class AccessLog:
    """One JSON line per request: who, what, status, size, milliseconds."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status, size = 0, 0

        async def observe(message: Message) -> None:
            nonlocal status, size
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                size += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client") or ("-", 0)
                access_log.info(
                    "request",
                    extra={
                        "fields": {
                            "client": f"{client[0]}:{client[1]}",
                            "method": scope["method"],
                            "path": scope["path"],
                            "query": scope["query_string"].decode("latin-1"),
                            "status": status,
                            "bytes": size,
                            "ms": round((time.perf_counter() - start) * 1000, 3),
                        }
                    },
                )


class JsonFormatter(logging.Formatter):
    """Log records as one JSON object a line, so log shippers need no parsing rules."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # uvicorn's own lines (start-up, shutdown) through the same JSON handler
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True


# --------------------------------------------------------------------------- the app


def create_app(settings: Settings) -> FastAPI:
    """The service, with the model loaded (or the reason it is not) and an OpenAPI schema
    that states the loaded model's latent width and digit range."""
    state = ModelState.load(settings)
    generator = state.generator
    classes = generator.num_classes if generator and generator.conditional else NUM_CLASSES
    digit_type = Annotated[
        int,
        Field(ge=0, le=classes - 1, description="class to draw (conditional models only)"),
    ]
    latent_dim = generator.latent_dim if generator else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        log.info("shutdown complete")

    app = FastAPI(
        title="MNIST GAN generator",
        version="0.1.0",
        description="Draws MNIST digits from an exported GAN generator (onnxruntime).",
        lifespan=lifespan,
        # No OpenTelemetry spans and metrics per request: our JSON access log is the record,
        # and the instrumentation costs throughput on small requests.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    GenerateQuery, GenerateBody = _request_models(settings.max_n, digit_type, latent_dim)  # noqa: N806
    responses = _generate_responses()

    @app.exception_handler(NotReadyError)
    async def not_ready(_: Request, error: NotReadyError) -> Response:
        return _reply(503, f"model not ready: {error}", {"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> Response:
        # FastAPI's default echoes each bad input back, which fails on NaN (not JSON) and
        # would mirror a megabyte body; the field path, the rule and the message suffice.
        errors = [
            {"type": item["type"], "loc": list(item["loc"]), "msg": item["msg"]}
            for item in error.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(BadInputError)
    async def bad_input(_: Request, bad: BadInputError) -> Response:
        # The same shape as FastAPI's own validation errors: one schema for every 422.
        error = {"type": "value_error", "loc": [bad.where, bad.error.field], "msg": str(bad.error)}
        return JSONResponse({"detail": [error]}, status_code=422)

    @app.get("/generate", response_class=Response, responses=responses)
    async def generate_get(query: Annotated[GenerateQuery, Query()]) -> Response:  # type: ignore[valid-type]
        """Draw ``n`` digits: a PNG grid, or JSON arrays with ``format=json``."""
        return await _generate(state, "query", query)

    @app.post("/generate", response_class=Response, responses=responses)
    async def generate_post(body: GenerateBody) -> Response:  # type: ignore[valid-type]
        """As ``GET /generate``, from a JSON body; ``z`` gives the latent vectors explicitly."""
        return await _generate(state, "body", body)

    @app.get("/metadata", responses={503: {"model": Problem}})
    async def metadata() -> Metadata:
        """The loaded model's contract: latent size, noise kind, classes, provenance."""
        generator = state.generator
        if generator is None:
            raise NotReadyError(state.reason)
        return Metadata(
            latent_dim=generator.latent_dim,
            noise=generator.noise,
            num_classes=generator.num_classes,
            conditional=generator.conditional,
            max_n=settings.max_n,
            metadata=generator.metadata,
        )

    @app.get("/healthz")
    async def healthz() -> Health:
        """Liveness: the process answers (whether or not the model loaded)."""
        return Health(status="ok")

    @app.get("/readyz", responses={503: {"model": Readiness}})
    async def readyz() -> Response:
        """Readiness: 200 once the model is loaded, else 503 with the reason."""
        ready = state.generator is not None
        body = Readiness(ready=ready, reason=state.reason).model_dump()
        return JSONResponse(body, status_code=200 if ready else 503)

    mount_page(app)  # the digits page at / (pipeline/page.py)
    app.add_middleware(Limits, settings.max_body_bytes, settings.max_concurrency)
    app.add_middleware(AccessLog)
    return app


def app_from_env() -> FastAPI:
    """The app as each uvicorn worker process builds it: settings from the environment."""
    settings = Settings.load(os.environ)
    configure_logging(settings.log_level)
    return create_app(settings)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="ONNX generator (env MNIST_GAN_MODEL)")
    parser.add_argument("--host", help="bind address (env MNIST_GAN_HOST; default 127.0.0.1)")
    parser.add_argument("--port", help="TCP port (env MNIST_GAN_PORT; default 8000)")
    parser.add_argument("--workers", help="processes (env MNIST_GAN_WORKERS; default 1)")
    parser.add_argument("--log-level", help="DEBUG | INFO | WARNING | ERROR")
    args = parser.parse_args(argv)
    try:
        settings = Settings.load(os.environ, **vars(args))
    except SettingsError as error:
        parser.error(str(error))  # exit status 2 with the message; nothing has started

    import uvicorn  # only the CLI needs the server; tests drive the app in-process too

    # Flags become env vars so that worker processes (which import app_from_env) see them.
    os.environ.update(settings.to_env())
    configure_logging(settings.log_level)
    uvicorn.run(
        "pipeline.serve:app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_config=None,  # ours: JSON lines
        access_log=False,  # ours: AccessLog, structured
        server_header=False,
        timeout_graceful_shutdown=10,  # SIGTERM: finish in-flight requests, then exit
    )


if __name__ == "__main__":
    main()
