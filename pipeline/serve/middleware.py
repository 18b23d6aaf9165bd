"""The service's two ASGI middlewares: :class:`Limits` (body size and requests in flight,
beyond the bounds rejected at once) and :class:`AccessLog` (one structured line per
request).

Both are plain ASGI callables rather than Starlette ``BaseHTTPMiddleware``: they need to see
the body as it streams in (413 on a chunked upload) and the status and size as the response
goes out, and they add no per-request task.
"""

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi.responses import JSONResponse, Response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("pipeline.serve.access")


def reply(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    """The service's error shape for everything that is not a 422: ``{"detail": "..."}``."""
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class Limits:
    """Bounds what a worker holds: a body over ``max_body_bytes`` gets 413 (checked on the
    declared length, then while reading, for chunked uploads), and ``/generate`` requests
    beyond ``max_concurrency`` in flight (queued for a batch, running or being rendered: so
    this is also the bound of the batching queue, :mod:`pipeline.serve.batcher`) get 429 at
    once, so a flood gets a quick "retry later" instead of a growing queue, time-outs and
    memory growth.

    Our own code: Starlette and uvicorn have no body-size limit, and uvicorn's
    ``limit_concurrency`` counts every connection (health checks too) and answers 503."""

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
            replay = await self._read_body(scope, receive, send)
            if replay is None:
                return
            receive = replay
        if not scope["path"].startswith("/generate"):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_concurrency:
            busy = f"{self.in_flight} requests in flight (MNIST_GAN_MAX_CONCURRENCY)"
            await reply(429, busy, {"Retry-After": "1"})(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """A ``receive`` that replays the whole body (the handlers parse all of it anyway),
        or None when a 413 or the client going away has ended the request."""
        too_large = reply(
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
