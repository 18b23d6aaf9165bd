"""uvicorn's HTTP protocol (httptools) with a bound on how long a client may take to send a
request, so that slow or idle clients cannot take every socket the process may open.

uvicorn closes a connection idle *between* requests (``timeout_keep_alive``) but bounds
nothing before or during one: a socket that connects and sends nothing, or sends its headers
or body a byte at a time, is held forever. Enough of them take every file descriptor, and
then new clients are refused (measured: a worker limited to 256 files, 300 idle sockets; a
new ``/healthz`` failed at once, and still did 8 s later). Here a connection has
``read_timeout_s`` (``MNIST_GAN_READ_TIMEOUT_S``) from connecting, or from the first byte of
a request, to the request's last byte; past that it is closed unanswered.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pipeline.serve.settings import Settings


@functools.cache
def read_timeout_s() -> float:
    """From the worker's settings (the CLI exports them to the environment)."""
    return Settings.load().read_timeout_s


class ReadTimeoutProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol`, closing a connection whose request is not read whole
    within :func:`read_timeout_s`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._read_deadline = self.loop.call_later(read_timeout_s(), self._too_slow)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _too_slow(self) -> None:
        self._read_deadline = None
        if not self.transport.is_closing():
            self.transport.close()
