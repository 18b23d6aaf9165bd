"""Per-epoch MLflow logging that outlives a tracking-server restart.

MLflow's own client blocks for about four minutes on a refused connection, and its async
logging drops the batch after that (both measured against a refused port): neither lets a
training ride out a server restart. :class:`RunLogger` sends from a background thread,
keeps what it could not send in memory while the server is away, and says exactly what never
arrived when the server stays away past a bound.

The web process is not the only part that goes away: with its database down, ``mlflow
server`` still answers ``/health`` 200 but every run call 503 (``TEMPORARILY_UNAVAILABLE``,
psycopg2's ``OperationalError``, within milliseconds; measured on PostgreSQL 15). So the
logger waits on a call that reads the run, not on ``/health``. A resent batch is the same
``Metric`` objects (same timestamp): MLflow's store keys metrics on key, timestamp, step and
value and skips rows it already holds, so a batch the server committed but could not answer
is stored once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import mlflow
import requests
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pipeline.core.errors import UserError
from pipeline.tracking.credentials import tracking_auth, tracking_verify

log = logging.getLogger("tracking")
SERVER_SCHEMES = {"http", "https"}  # tracking servers; other schemes are stores MLflow opens


class ServerGoneError(UserError):
    """The tracking server stayed away past the wait bound: training finished and wrote its
    outputs, but some of what it logs never reached the run."""


def outage(uri: str, run_id: str) -> str | None:
    """Why the tracking server at ``uri`` cannot take run ``run_id``'s logs now ("unreachable",
    or what it answers when its database is down), or None when it can."""
    if urlsplit(uri).scheme not in SERVER_SCHEMES:
        return None
    base = uri.rstrip("/")
    try:
        # /health needs no account; over TLS it is checked against the client's certificate
        verify = tracking_verify()
        if requests.get(f"{base}/health", timeout=2, verify=verify).status_code != 200:
            return "unreachable"
        # reads the run from the database: /health answers 200 without touching it
        answer = requests.get(
            f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}",
            timeout=10,
            auth=tracking_auth(),
            verify=verify,
        )
    except requests.RequestException:
        return "unreachable"
    if answer.status_code < 500:
        return None
    try:
        said = str(answer.json().get("message", ""))
    except ValueError:
        said = answer.text
    said = (said.strip().splitlines() or [""])[0][:200]  # psycopg2's first line says it
    if answer.status_code == 503:
        return f"answers but its database is unavailable (HTTP 503: {said})"
    return f"answers HTTP {answer.status_code} ({said})"


@contextlib.contextmanager
def _http_retries(retries: int, timeout_s: int) -> Iterator[None]:
    """MLflow's HTTP client retries a refused connection for about four minutes (7 retries,
    exponential backoff; it reads these variables at every request). Callers that do their
    own waiting set it to give up fast instead."""
    wanted = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s),
    }
    saved = {key: os.environ.get(key) for key in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def end_run_quickly(status: str) -> None:
    """End the active run without waiting out MLflow's retries (the server may be gone)."""
    with _http_retries(0, 5), contextlib.suppress(Exception):
        mlflow.end_run(status)


def wait_bound_s() -> float:
    """How long a finished training waits for an absent tracking server to come back."""
    return float(os.environ.get("MNIST_GAN_TRACKING_WAIT_S", "120"))


class RunLogger:
    """Per-epoch metrics and artifacts of a running training, sent to its MLflow run by a
    background thread, in order. Training never waits on the network: while the tracking
    server is away (restarted, say) entries queue up in memory and go once ``/health``
    answers again. On exit it waits at most :func:`wait_bound_s` for the queue to drain; what
    is left then is named in a :class:`ServerGoneError` (after the models are written)."""

    def __init__(self, run: mlflow.ActiveRun, uri: str, wait_s: float | None = None) -> None:
        self.run = run
        self.uri = uri
        self.wait_s = wait_bound_s() if wait_s is None else wait_s
        self._client = MlflowClient(self.uri)
        self._pending: deque[tuple[str, Any]] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self.outage_s = 0.0  # total seconds the worker spent waiting for the server
        self.reason = "unreachable"  # what the last outage was, for the error past the bound
        self._thread = threading.Thread(target=self._work, name="mlflow-logger", daemon=True)

    def __enter__(self) -> RunLogger:
        # While it runs, the logger is the process's only MLflow client and does its own
        # waiting: a request cut by a restart fails in seconds, not after MLflow's retries.
        self._retries = _http_retries(1, 30)
        self._retries.__enter__()
        self._thread.start()
        return self

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self._put(("metrics", batch))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._put(("artifact", (str(path), artifact_path)))

    def _put(self, entry: tuple[str, Any]) -> None:
        with self._wake:
            self._pending.append(entry)
            self._wake.notify()

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if not self._pending:
                    return
                taken = self._next_request()
                kind, value = taken[0]
            try:
                if kind == "metrics":  # epochs queued during an outage go in one request
                    metrics = [metric for _, batch in taken for metric in batch]
                    self._client.log_batch(self.run.info.run_id, metrics=metrics)
                else:
                    self._client.log_artifact(self.run.info.run_id, *value)
            except Exception as exc:  # the server (or its database) is away: keep the entries
                self._wait_for_server(type(exc).__name__)
                continue  # resend the same entries: see the module's note on duplicates
            with self._wake:
                for entry in taken:
                    self._pending.remove(entry)
                self._wake.notify_all()

    def _next_request(self) -> list[tuple[str, Any]]:
        """What to send next: every queued metrics entry in one request (epochs that piled up
        during an outage; at most MLflow's 1000 metrics), else the oldest artifact."""
        metrics = [entry for entry in self._pending if entry[0] == "metrics"]
        taken: list[tuple[str, Any]] = []
        count = 0
        for entry in metrics:
            count += len(entry[1])
            if taken and count > 1000:
                break
            taken.append(entry)
        return taken or [self._pending[0]]

    def _wait_for_server(self, error: str) -> None:
        """Until a call that reads the run succeeds, polled once a second (a request that
        fails for another reason is retried once a second too, never in a hot loop)."""
        began = time.monotonic()
        reason = outage(self.uri, self.run.info.run_id)
        self.reason = reason or self.reason
        said = {None: f"refused a request ({error})", "unreachable": f"unreachable ({error})"}
        log.warning("MLflow server %s %s; buffering", self.uri, said.get(reason, reason))
        time.sleep(1)
        while (reason := outage(self.uri, self.run.info.run_id)) is not None:
            self.reason = reason
            time.sleep(1)
        self.outage_s += time.monotonic() - began
        log.info("MLflow server %s back after %.1f s", self.uri, time.monotonic() - began)

    def __exit__(self, exc_type: object, *_: object) -> None:
        deadline = time.monotonic() + (self.wait_s if exc_type is None else 5)
        with self._wake:
            self._closing = True
            self._wake.notify_all()
            while self._pending and time.monotonic() < deadline:
                self._wake.wait(timeout=1)
            left = list(self._pending)
        self._retries.__exit__(None, None, None)
        if left and exc_type is None:
            raise ServerGoneError(
                f"MLflow server {self.uri} {self.reason} for over {self.wait_s:.0f} s "
                f"(MNIST_GAN_TRACKING_WAIT_S): not logged to run {self.run.info.run_id}: "
                f"{_describe(left)}; models, checkpoints and reports are written"
            )


def _describe(entries: list[tuple[str, Any]]) -> str:
    steps = [value[0].step for kind, value in entries if kind == "metrics" and value]
    files = [Path(value[0]).name for kind, value in entries if kind == "artifact"]
    parts = []
    if steps:
        parts.append(f"metrics of epochs {_ranges(steps)}")
    if files:
        parts.append(
            f"{len(files)} artifacts ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''})"
        )
    return " and ".join(parts)


def _ranges(numbers: list[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"``."""
    spans: list[list[int]] = []
    for number in sorted(numbers):
        if spans and number == spans[-1][1] + 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
