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
- Concurrent ``/generate`` requests are batched into shared onnxruntime calls
  (:mod:`pipeline.serve.batcher`), but every queue is bounded: too many requests in flight
  get 429 at once, one that waits too long for its batch 503, a body over the limit 413,
  so a flood cannot make the service hang or run out of memory.
- Only onnxruntime, numpy and zlib do the work (via :mod:`pipeline.inference.generator`):
  no TensorFlow or Pillow import, so the process is ready in well under a second.
- Requests never name files or models: the model path comes from the operator only.

This module is the app (:func:`create_app`: routes and error handlers) and the CLI; the
parts live next to it: :mod:`pipeline.serve.settings` (operator settings),
:mod:`pipeline.serve.api` (schemas and the work behind ``/generate``),
:mod:`pipeline.serve.middleware` (limits, access log), :mod:`pipeline.serve.logs`.
"""

import argparse
import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline

from pipeline.core.images import NUM_CLASSES
from pipeline.serve.api import (
    BadInputError,
    Health,
    Metadata,
    NotReadyError,
    Problem,
    Readiness,
    Registry,
    generate,
    generate_responses,
    parse_query,
    query_parameters,
    request_models,
)
from pipeline.serve.batcher import QueueTimeoutError
from pipeline.serve.logs import configure_logging
from pipeline.serve.middleware import AccessLog, Limits, reply
from pipeline.serve.models import ModelSlot, reloading
from pipeline.serve.page import mount_page
from pipeline.serve.settings import Settings, SettingsError

__all__ = ["Settings", "SettingsError", "app_from_env", "create_app", "main"]

log = logging.getLogger("pipeline.serve")


def create_app(settings: Settings) -> FastAPI:
    """The service, with the model loaded (or the reason it is not) and an OpenAPI schema
    that states the loaded model's latent width and digit range."""
    slot = ModelSlot.start(settings)
    generator = slot.current.generator if slot.current else None
    classes = generator.num_classes if generator and generator.conditional else NUM_CLASSES
    latent_dim = generator.latent_dim if generator else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with reloading(slot, settings.reload_s):
            yield
        log.info("shutdown complete")

    # FastAPI's /docs loads Swagger UI from a CDN (a blank page offline): this one serves
    # it from the fastapi-offline package (/static-offline-docs/); no /redoc.
    app = FastAPIOffline(
        redoc_url=None,
        title="MNIST GAN generator",
        version="0.1.0",
        description="Draws MNIST digits from an exported GAN generator (onnxruntime).",
        lifespan=lifespan,
        # No OpenTelemetry spans and metrics per request: our JSON access log is the record,
        # and the instrumentation costs throughput on small requests.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.slot = slot  # the current model (tests read its batcher)
    GenerateQuery, GenerateBody = request_models(settings.max_n, classes, latent_dim)  # noqa: N806
    responses = generate_responses()

    @app.exception_handler(NotReadyError)
    async def not_ready(_: Request, error: NotReadyError) -> Response:
        return reply(503, f"model not ready: {error}", {"Retry-After": "5"})

    @app.exception_handler(QueueTimeoutError)
    async def queue_timeout(_: Request, error: QueueTimeoutError) -> Response:
        return reply(503, f"busy: {error} (MNIST_GAN_QUEUE_TIMEOUT_MS)", {"Retry-After": "1"})

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

    # GET parses its query itself (parse_query: faster), so its parameters and its 422 (the
    # schema FastAPI writes for POST's) are stated here rather than derived by FastAPI.
    invalid_query = {
        "description": "Validation Error",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}
        },
    }

    @app.get(
        "/generate",
        response_class=Response,
        responses={**responses, 422: invalid_query},
        openapi_extra={"parameters": query_parameters(GenerateQuery)},
    )
    async def generate_get(request: Request) -> Response:
        """Draw ``n`` digits: a PNG grid, or JSON arrays with ``format=json``."""
        return await generate(slot, "query", parse_query(GenerateQuery, request))

    @app.post("/generate", response_class=Response, responses=responses)
    async def generate_post(body: GenerateBody) -> Response:  # type: ignore[valid-type]
        """As ``GET /generate``, from a JSON body; ``z`` gives the latent vectors explicitly."""
        return await generate(slot, "body", body)

    @app.get("/metadata", responses={503: {"model": Problem}})
    async def metadata() -> Metadata:
        """The loaded model's contract: latent size, noise kind, classes, provenance."""
        loaded = slot.current
        if loaded is None:
            raise NotReadyError(slot.reason)
        generator = loaded.generator
        return Metadata(
            latent_dim=generator.latent_dim,
            noise=generator.noise,
            num_classes=generator.num_classes,
            conditional=generator.conditional,
            max_n=settings.max_n,
            metadata=generator.metadata,
            registry=Registry.model_validate(loaded.registry) if loaded.registry else None,
        )

    @app.get("/healthz")
    async def healthz() -> Health:
        """Liveness: the process answers (whether or not the model loaded)."""
        return Health(status="ok")

    @app.get("/readyz", responses={503: {"model": Readiness}})
    async def readyz() -> Response:
        """Readiness: 200 once the model is loaded, else 503 with the reason."""
        ready = slot.current is not None
        body = Readiness(ready=ready, reason=slot.reason).model_dump()
        return JSONResponse(body, status_code=200 if ready else 503)

    mount_page(app)  # the digits page at / (pipeline/serve/page.py)
    # The last added is the outermost: the access log sees the requests Limits rejects too.
    app.add_middleware(Limits, settings.max_body_bytes, settings.max_concurrency)
    app.add_middleware(AccessLog)
    return app


def app_from_env() -> FastAPI:
    """The app as each uvicorn worker process builds it: settings from the environment."""
    settings = Settings.load()
    configure_logging(settings.log_level)
    app = create_app(settings)
    # What exists by now (the app, its schemas, the model) lives as long as the process: kept
    # out of the garbage collector's scans, its pauses under load are shorter (the serving
    # benchmark's p99 fell by a third).
    gc.freeze()
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="ONNX generator (env MNIST_GAN_MODEL)")
    parser.add_argument(
        "--model-uri", help="registry version instead, e.g. models:/mnist-generator@champion"
    )
    parser.add_argument("--reload-s", help="re-resolve the model every N s (0: only on SIGHUP)")
    parser.add_argument("--host", help="bind address (env MNIST_GAN_HOST; default 127.0.0.1)")
    parser.add_argument("--port", help="TCP port (env MNIST_GAN_PORT; default 8000)")
    parser.add_argument("--workers", help="processes (env MNIST_GAN_WORKERS; default 1)")
    parser.add_argument("--log-level", help="DEBUG | INFO | WARNING | ERROR")
    args = parser.parse_args(argv)
    try:
        settings = Settings.load(**vars(args))
    except SettingsError as error:
        parser.error(str(error))  # exit status 2 with the message; nothing has started

    import uvicorn  # only the CLI needs the server; tests drive the app in-process too

    # Flags become env vars so that worker processes (which import app_from_env) see them.
    os.environ.update(settings.to_env())
    configure_logging(settings.log_level)
    uvicorn.run(
        "pipeline.serve.app:app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_config=None,  # ours: JSON lines
        access_log=False,  # ours: AccessLog, structured
        server_header=False,
        timeout_graceful_shutdown=10,  # SIGTERM: finish in-flight requests, then exit
        http="pipeline.serve.protocol:ReadTimeoutProtocol",  # slow clients: read_timeout_s
    )


if __name__ == "__main__":
    main()
