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
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.stage import UserError


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
        with mlflow.start_run(run_id=run_id) as run:
            yield run
        return
    with mlflow.start_run(
        experiment_id=experiment_id(experiment, uri), run_name=run_name, tags=tags
    ) as run:
        yield run


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
    if not _run_exists(uri, info["run_id"]):
        raise UserError(
            f"{run_file}: MLflow run {info['run_id']} is not in {uri}; "
            "retrain to log a new run (dvc repro --force train)"
        )
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=info["run_id"]) as run:
        yield run
