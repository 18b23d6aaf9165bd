"""Clients a public service meets, against the real one (``python -m pipeline.serve``, a
uvicorn subprocess on loopback): hundreds of sockets that idle or send their headers or body a
byte at a time must not keep others from being served, and a flood of n=16 PNG requests must
not make the process's memory grow (its RSS, read from /proc, is the figure in the docs)."""

from __future__ import annotations

import contextlib
import itertools
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers import REPO, free_port, wait_for

pytestmark = pytest.mark.slow
MIB = 1 << 20


@contextlib.contextmanager
def _serving(model: Path, files: int | None = None, **env: str) -> Iterator[tuple[str, int]]:
    """``python -m pipeline.serve`` on a free loopback port (``files``: its open-file limit),
    ready; its URL and process id. Terminated at the end."""
    port = free_port()
    command = [sys.executable, "-m", "pipeline.serve", "--port", str(port), "--model", str(model)]

    def limit() -> None:  # in the child, before exec
        if files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))

    proc = subprocess.Popen(
        command, cwd=REPO, env={**os.environ, "MNIST_GAN_LOG_LEVEL": "WARNING", **env},
        stderr=subprocess.PIPE, text=True, preexec_fn=limit,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        return False

    try:
        wait_for(ready, 30, "the service to be ready")
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def service(onnx_generators: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """The service's URL and process id: one worker, batching on (the defaults)."""
    with _serving(onnx_generators["unconditional"]) as running:
        yield running


def _rss(pid: int) -> int:
    """The process's resident set size in bytes, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def _timed_get(client: httpx.Client | None, url: str, seed: int) -> tuple[int, float]:
    """One n=16 request's status and seconds, on ``client``'s connection or a new one."""
    began = time.monotonic()
    query = {"n": 16, "seed": seed}
    answer = client.get(url, params=query) if client else httpx.get(url, params=query, timeout=10)
    return answer.status_code, time.monotonic() - began


SLOW_HEADERS = b"GET /generate?n=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
SLOW_BODY = (b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
             b"Content-Type: application/json\r\nContent-Length: 4000\r\n\r\n{")  # fmt: skip


@contextlib.contextmanager
def _slow_clients(port: int, idle: int, headers: int, body: int) -> Iterator[list[socket.socket]]:
    """Sockets that connect and send nothing (``idle``), or a header line (``headers``) or a
    body byte (``body``) every half second, until the block ends (at most 60 s)."""
    kinds = ["idle"] * idle + ["headers"] * headers + ["body"] * body
    stop = threading.Event()
    with contextlib.ExitStack() as stack:
        sockets = []
        for kind in kinds:
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
            if kind != "idle":
                sock.sendall(SLOW_HEADERS if kind == "headers" else SLOW_BODY)
            sockets.append(sock)

        def trickle() -> None:
            deadline = time.monotonic() + 60
            for tick in itertools.count():
                if stop.wait(0.5) or time.monotonic() > deadline:
                    return
                for kind, sock in zip(kinds, sockets, strict=True):
                    with contextlib.suppress(OSError):  # closed by the server: fine
                        if kind == "headers":
                            sock.sendall(f"X-Slow-{tick}: a\r\n".encode())
                        elif kind == "body":
                            sock.sendall(b" ")

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        try:
            time.sleep(1)  # every slow client has sent something by now
            yield sockets
        finally:
            stop.set()
            trickler.join(timeout=5)


def test_idle_and_slow_clients_do_not_stop_others(service: tuple[str, int]) -> None:
    """200 sockets held open (80 idle, 60 sending a header line every half second, 60 a
    POST body a byte every half second) while 40 ordinary requests each get 200 in < 2 s."""
    url, _ = service
    with _slow_clients(int(url.rsplit(":", 1)[1]), idle=80, headers=60, body=60) as sockets:
        with httpx.Client(timeout=10) as client:
            timings = [_timed_get(client, f"{url}/generate", seed) for seed in range(20)]
        # a new connection each: accepted while 200 others are held
        timings += [_timed_get(None, f"{url}/generate", seed) for seed in range(20)]
        open_after = sum(_still_open(sock) for sock in sockets)
    statuses = {status for status, _ in timings}
    slowest = max(seconds for _, seconds in timings)
    assert statuses == {200}, statuses
    assert slowest < 2, f"slowest ordinary request took {slowest:.2f} s"
    print(f"40 requests beside 200 slow sockets: slowest {slowest * 1000:.0f} ms; "
          f"{open_after}/200 slow sockets still open")  # fmt: skip


def _still_open(sock: socket.socket) -> bool:
    """False once the server has closed the connection (a read returns EOF or an error)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True  # nothing to read: still open
    except OSError:
        return False


def test_memory_stays_bounded_under_a_flood_of_png_requests(service: tuple[str, int]) -> None:
    """32 connections send 5000 `GET /generate?n=16` (PNG) back to back (at most 90 s): all
    200, and the RSS after the first 500 responses grows by less than 40 MiB at its peak and
    is not climbing at the end (last quarter's mean within 8 MiB of the second quarter's)."""
    url, pid = service
    total, warm_up = 5000, 500
    done = itertools.count(1)
    statuses: list[int] = []
    samples: list[int] = []
    warm: list[int] = []
    stop = threading.Event()
    deadline = time.monotonic() + 90

    def client() -> None:
        with httpx.Client(timeout=20, limits=httpx.Limits(max_connections=1)) as http:
            while not stop.is_set() and time.monotonic() < deadline:
                number = next(done)
                if number > total:
                    return
                statuses.append(http.get(f"{url}/generate", params={"n": 16}).status_code)
                if number == warm_up:
                    warm.append(_rss(pid))

    def sample() -> None:
        while not stop.wait(0.05):
            samples.append(_rss(pid))

    before = _rss(pid)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    clients = [threading.Thread(target=client, daemon=True) for _ in range(32)]
    began = time.monotonic()
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(timeout=max(1.0, deadline - time.monotonic() + 25))
    took = time.monotonic() - began
    stop.set()
    sampler.join(timeout=5)
    assert len(statuses) == total and set(statuses) == {200}, (len(statuses), set(statuses))
    peak, quarter = max(samples), len(samples) // 4
    second, last = (sum(part) / len(part) for part in (samples[quarter : 2 * quarter],
                                                         samples[3 * quarter :]))  # fmt: skip
    print(f"{total} n=16 PNG requests on 32 connections in {took:.1f} s: RSS {before / MIB:.0f} "
          f"MiB before, {warm[0] / MIB:.0f} MiB after {warm_up}, peak {peak / MIB:.0f} MiB, "
          f"end {samples[-1] / MIB:.0f} MiB")  # fmt: skip
    assert peak - warm[0] < 40 * MIB, (peak - warm[0]) / MIB
    assert last - second < 8 * MIB, (last - second) / MIB


def test_slow_sockets_past_the_file_limit_are_closed_and_others_served(
    onnx_generators: dict[str, Path],
) -> None:
    """A worker that may open 256 files; 300 sockets that idle, or trickle their headers or
    body: they take every descriptor, yet within MNIST_GAN_READ_TIMEOUT_S=2 (and a second
    round for those left in the backlog) they are closed, trickling or not, and a new client
    gets 200. Without the bound they were held forever and the new client refused."""
    model = onnx_generators["unconditional"]
    with _serving(model, files=256, MNIST_GAN_READ_TIMEOUT_S="2") as (url, pid):
        port = int(url.rsplit(":", 1)[1])
        with _slow_clients(port, idle=200, headers=50, body=50) as sockets:
            held = len(list(Path(f"/proc/{pid}/fd").iterdir()))
            began, answer = time.monotonic(), None
            while answer is None and time.monotonic() - began < 20:  # bounded: 20 s
                with contextlib.suppress(httpx.TransportError):
                    answer = httpx.get(f"{url}/generate", params={"n": 16}, timeout=10)
                if answer is None:
                    time.sleep(0.2)
            waited = time.monotonic() - began
            wait_for(lambda: not any(map(_still_open, sockets)), 10, "slow sockets closed")
    assert held >= 250, f"the idle sockets held only {held} descriptors"
    assert answer is not None and answer.status_code == 200, answer
    assert waited < 10, f"a new client waited {waited:.1f} s"
    print(f"300 slow sockets, 256 files: {held} held; a new client got 200 after {waited:.1f} s")
