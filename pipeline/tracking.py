"""MLflow plumbing shared by train, evaluate and export.

Everything lands in the repo's own store (``sqlite:///<repo>/mlflow.db``, artifacts under
``<repo>/mlartifacts``) unless ``MLFLOW_TRACKING_URI`` says otherwise. The repo root is
``$DVC_ROOT`` when DVC runs us: a queued ``dvc exp run`` works in a temp copy under
``.dvc/tmp/exps/`` that DVC deletes afterwards, so paths built from the cwd would vanish
with it. Training writes ``models/mlflow_run.json``; later stages :func:`open_run` it to log
into the same run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
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

from pipeline.stage import UserError

log = logging.getLogger("tracking")
# Stores MLflow opens itself (paths, databases) and tracking servers (checked before any work).
LOCAL_SCHEMES = {"", "file", "sqlite", "postgresql", "mysql", "mssql"}
SERVER_SCHEMES = {"http", "https"}


class ServerGoneError(UserError):
    """The tracking server stayed away past the wait bound: training finished and wrote its
    outputs, but some of what it logs never reached the run."""


def repo_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a local SQLite store. MLflow creates and migrates a new
    database on first connect, and experiments queued with ``dvc queue start -j 2`` do that
    at the same moment: unserialised, they leave it half-migrated and every run fails."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock_file = Path(uri.removeprefix("sqlite:///") + ".lock")
    with lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def experiment_id(name: str, uri: str) -> str:
    """The id of experiment ``name``, created on first use with its artifacts under the repo
    (for a local store; a tracking server keeps its own artifact location)."""
    with _store_lock(uri):
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if uri.startswith(("sqlite:", "file:", "/")):
            location = (repo_root() / "mlartifacts" / name).as_uri()
        return client.create_experiment(name, artifact_location=location)


def git_commit() -> str:
    result = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True, text=True, check=False
    )
    return result.stdout.strip() or "unknown"


@contextlib.contextmanager
def start_run(
    experiment: str, run_name: str, tags: dict[str, str], run_id: str | None = None
) -> Iterator[mlflow.ActiveRun]:
    """A new run in ``experiment`` (or run ``run_id`` again, when a training resumes)."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if run_id is not None and _run_exists(uri, run_id):
        arguments: dict[str, Any] = {"run_id": run_id}
    else:
        arguments = {"experiment_id": experiment_id(experiment, uri), "run_name": run_name}
        arguments["tags"] = tags
    with mlflow.start_run(**arguments) as run:
        try:
            yield run
        except ServerGoneError:
            end_run_quickly("FAILED")  # the server is gone: MLflow's own retries take minutes
            raise


def _run_exists(uri: str, run_id: str) -> bool:
    try:
        with _store_lock(uri):
            MlflowClient(uri).get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return True


def run_info(run: mlflow.ActiveRun) -> dict[str, Any]:
    """What ``models/mlflow_run.json`` holds."""
    return {
        "run_id": run.info.run_id,
        "experiment_id": run.info.experiment_id,
        "tracking_uri": mlflow.get_tracking_uri(),
    }


@contextlib.contextmanager
def open_run(run_file: Path) -> Iterator[mlflow.ActiveRun]:
    """Re-open the training's run (from ``models/mlflow_run.json``) to log into it."""
    run_file = Path(run_file)
    if not run_file.is_file():
        raise UserError(f"{run_file}: missing; run the train stage first (dvc repro)")
    info = json.loads(run_file.read_text())
    uri = info["tracking_uri"]
    check_server(uri)
    if not _run_exists(uri, info["run_id"]):
        raise UserError(
            f"{run_file}: MLflow run {info['run_id']} is not in {uri}; "
            "retrain to log a new run (dvc repro --force train)"
        )
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=info["run_id"]) as run:
        yield run


def check_server(uri: str | None = None, *, run_file: Path | None = None) -> None:
    """Fail in the first seconds, with one line, when the tracking URI (``uri``, the one in
    ``run_file`` if that exists, else ``$MLFLOW_TRACKING_URI`` or the local default) cannot be
    used: an unknown scheme, a server that refuses the connection or answers with an error
    (403: its ``--allowed-hosts`` lacks this host name). Stages call it before any work."""
    name = "MLFLOW_TRACKING_URI"  # what the user fixes, named in every message
    if uri is None and run_file is not None and Path(run_file).is_file():
        uri, name = (
            json.loads(Path(run_file).read_text())["tracking_uri"],
            f"{run_file} tracking_uri",
        )
    uri = uri or tracking_uri()
    scheme = urlsplit(uri).scheme.split("+")[0]
    if scheme in LOCAL_SCHEMES:
        return
    if scheme not in SERVER_SCHEMES:
        raise UserError(
            f"{name}: got {uri!r}; use http(s)://HOST:PORT of a tracking server "
            "(make tracking-server), sqlite:///PATH, or unset it for the local mlflow.db"
        )
    probe = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        response = requests.get(probe, timeout=30)  # a busy server may take a while
    except requests.RequestException as exc:
        reason = type(exc).__name__
        raise UserError(
            f"{name}: no MLflow server answers at {uri} ({reason}); start one "
            "(make tracking-server) or unset MLFLOW_TRACKING_URI for the local mlflow.db"
        ) from None
    if response.status_code == 403:
        raise UserError(
            f"{name}: {uri} answered 403 Forbidden: the server does not allow "
            f"the host name {urlsplit(uri).hostname!r} (add it to its --allowed-hosts)"
        )
    if response.status_code != 200:
        raise UserError(
            f"{name}: {uri} answered HTTP {response.status_code} to an MLflow "
            f"API call; is it an MLflow tracking server? ({response.text[:80]!r})"
        )


def _healthy(uri: str) -> bool:
    if urlsplit(uri).scheme not in SERVER_SCHEMES:
        return True
    try:
        return requests.get(f"{uri.rstrip('/')}/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


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

    def __init__(self, run: mlflow.ActiveRun, wait_s: float | None = None) -> None:
        self.run = run
        self.uri = mlflow.get_tracking_uri()
        self.wait_s = wait_bound_s() if wait_s is None else wait_s
        self._client = MlflowClient(self.uri)
        self._pending: deque[tuple[str, Any]] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self.outage_s = 0.0  # total seconds the worker spent waiting for the server
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
            except Exception as exc:  # the server is away: wait for it, keep the entries
                self._wait_for_server(type(exc).__name__)
                continue
            with self._wake:
                for entry in taken:
                    self._pending.remove(entry)
                self._wake.notify_all()

    def _next_request(self) -> list[tuple[str, Any]]:
        """What to send next: every queued metrics entry in one request (epochs that piled up
        during an outage; at most MLflow's 1000 metrics), else the oldest artifact."""
        metrics = [entry for entry in self._pending if entry[0] == "metrics"]
        taken, count = [], 0
        for entry in metrics:
            count += len(entry[1])
            if taken and count > 1000:
                break
            taken.append(entry)
        return taken or [self._pending[0]]

    def _wait_for_server(self, reason: str) -> None:
        log.warning("MLflow server %s unreachable (%s); buffering", self.uri, reason)
        began = time.monotonic()
        while not _healthy(self.uri):
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
                f"MLflow server {self.uri} unreachable for over {self.wait_s:.0f} s "
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
