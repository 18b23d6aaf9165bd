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
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import mlflow
import requests
from filelock import FileLock
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.core.errors import UserError
from pipeline.tracking import credentials, run_logger

log = logging.getLogger("tracking")
# Stores MLflow opens itself (paths, databases) and tracking servers (checked before any work).
LOCAL_SCHEMES = {"", "file", "sqlite", "postgresql", "mysql", "mssql"}


@dataclass(frozen=True)
class Store:
    """Where a stage's MLflow runs go: resolved once per stage (:func:`resolve_store`) and
    passed down as a value."""

    uri: str
    root: Path  # the repo root: a local store keeps its artifacts under root/mlartifacts


def resolve_store(environ: Mapping[str, str] = os.environ, cwd: Path | None = None) -> Store:
    """``$MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/mlflow.db``; the root is
    ``$DVC_ROOT`` when DVC runs us (a queued run's cwd is a temp copy), else ``cwd``."""
    root = Path(environ.get("DVC_ROOT") or cwd or Path.cwd()).resolve()
    return Store(environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}", root)


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a local SQLite store. MLflow creates and migrates a new
    database on first connect, and experiments queued with ``dvc queue start -j 2`` do that
    at the same moment: unserialised, they leave it half-migrated and every run fails."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    with FileLock(uri.removeprefix("sqlite:///") + ".lock"):
        yield


def experiment_id(name: str, store: Store) -> str:
    """The id of experiment ``name``, created on first use with its artifacts under the repo
    (for a local store; a tracking server keeps its own artifact location)."""
    uri = store.uri
    with _store_lock(uri):
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if uri.startswith(("sqlite:", "file:", "/")):
            location = (store.root / "mlartifacts" / name).as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as error:
            # A server has no lock of ours: two queued runs can both find no experiment,
            # and the second create is refused. Join the one the other run made.
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id


def experiment_name(name: str, uri: str, environ: Mapping[str, str] = os.environ) -> str:
    """``name``, or ``name/USER`` on a tracking server with accounts
    (``$MLFLOW_TRACKING_USERNAME`` set): MLflow grants permissions per experiment, so each
    teammate's runs go to their own, which the others read but cannot change (in one shared
    experiment, everyone allowed to log could delete everyone's runs)."""
    user = environ.get(credentials.USERNAME)
    server = urlsplit(uri).scheme in run_logger.SERVER_SCHEMES
    return f"{name}/{user}" if user and server else name


@contextlib.contextmanager
def start_run(
    store: Store, experiment: str, run_name: str, tags: dict[str, str], run_id: str | None = None
) -> Iterator[mlflow.ActiveRun]:
    """A new run in ``experiment`` (or run ``run_id`` again, when a training resumes)."""
    uri = store.uri
    if run_id is not None and _run_exists(uri, run_id):
        arguments: dict[str, Any] = {"run_id": run_id}
    else:
        name = experiment_name(experiment, uri)
        arguments = {"experiment_id": experiment_id(name, store), "run_name": run_name}
        user = os.environ.get(credentials.USERNAME)
        # the run's user is its account (MLflow would name the local login)
        arguments["tags"] = {**tags, "mlflow.user": user} if name != experiment else tags
    with fluent_uri(uri), mlflow.start_run(**arguments) as run:
        try:
            yield run
        except run_logger.ServerGoneError:
            run_logger.end_run_quickly(
                "FAILED"
            )  # the server is gone: MLflow's own retries take minutes
            raise


@contextlib.contextmanager
def fluent_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (start_run, log_*) reads a process-wide URI, and setting it also
    sets ``$MLFLOW_TRACKING_URI`` (for MLflow's child processes): ``uri`` for the block, both
    as they were afterwards, so a run in a notebook or a test leaks no store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # type: ignore[arg-type]  # None: its default again
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)


def _run_exists(uri: str, run_id: str) -> bool:
    try:
        with _store_lock(uri):
            MlflowClient(uri).get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return True


def run_info(run: mlflow.ActiveRun, store: Store) -> dict[str, Any]:
    """What ``models/mlflow_run.json`` holds."""
    return {
        "run_id": run.info.run_id,
        "experiment_id": run.info.experiment_id,
        "tracking_uri": store.uri,
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
    with fluent_uri(uri), mlflow.start_run(run_id=info["run_id"]) as run:
        yield run


def check_server(uri: str, *, run_file: Path | None = None) -> None:
    """Fail in the first seconds, with one line, when the tracking URI (the one in
    ``run_file`` if that exists, else ``uri``) cannot be used: an unknown scheme, a server
    that refuses the connection, a certificate not trusted, a missing or wrong password (401),
    a refusal (403: no permission, or its ``--allowed-hosts`` lacks this host name), its
    database down (503) or another error. Each message names the variable to set. Stages call
    it before any work."""
    name = "MLFLOW_TRACKING_URI"  # what the user fixes, named in every message
    if uri is None and run_file is not None and Path(run_file).is_file():
        uri, name = (
            json.loads(Path(run_file).read_text())["tracking_uri"],
            f"{run_file} tracking_uri",
        )
    scheme = urlsplit(uri).scheme.split("+")[0]
    if scheme in LOCAL_SCHEMES:
        return
    if scheme not in run_logger.SERVER_SCHEMES:
        raise UserError(
            f"{name}: got {uri!r}; use http(s)://HOST:PORT of a tracking server "
            "(make tracking-server), sqlite:///PATH, or unset it for the local mlflow.db"
        )
    probe = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1"
    auth = credentials.tracking_auth()
    try:  # a busy server may take a while
        response = requests.get(probe, timeout=30, auth=auth, verify=credentials.tracking_verify())
    except requests.exceptions.SSLError:
        cert = os.environ.get(credentials.CERT_PATH)
        raise UserError(
            f"{credentials.CERT_PATH}: the certificate of {uri} is not trusted (got "
            f"{cert!r}); set it to the server's certificate file, from its operator"
        ) from None
    except requests.RequestException as exc:
        reason = type(exc).__name__
        raise UserError(
            f"{name}: no MLflow server answers at {uri} ({reason}); start one "
            "(make tracking-server) or unset MLFLOW_TRACKING_URI for the local mlflow.db"
        ) from None
    _check_answer(response, uri, name, auth)


def _check_answer(
    response: requests.Response, uri: str, name: str, auth: tuple[str, str] | None
) -> None:
    accounts = f"{credentials.USERNAME}/{credentials.PASSWORD}"
    if response.status_code == 401:
        said = f"user {auth[0]!r}: wrong password" if auth else "none set"
        raise UserError(
            f"{accounts}: {uri} answered 401 Unauthorized ({said}); set them to your "
            "account on that server (its operator creates one)"
        )
    if response.status_code == 403 and "host" in response.text.lower():
        raise UserError(
            f"{name}: {uri} answered 403 Forbidden: the server does not allow "
            f"the host name {urlsplit(uri).hostname!r} (add it to its --allowed-hosts)"
        )
    if response.status_code == 403:
        user = auth[0] if auth else None
        raise UserError(
            f"{credentials.USERNAME}: {uri} answered 403 Forbidden to user {user!r}: "
            "no permission; ask the server's operator for access, or use your own account"
        )
    if response.status_code == 503:  # what `mlflow server` answers while its database is down
        why = run_logger.outage(uri, "0") or "answered HTTP 503"
        raise UserError(f"{name}: the MLflow server at {uri} {why}; rerun once it is back")
    if response.status_code != 200:
        raise UserError(
            f"{name}: {uri} answered HTTP {response.status_code} to an MLflow "
            f"API call; is it an MLflow tracking server? ({response.text[:80]!r})"
        )


# Provenance: what code a run ran. MLflow takes its source tags from sys.argv[0] and the
# git repo around it, which for `dvc queue start` are a temp copy DVC deletes afterwards and
# the baseline it was copied from; the repo's HEAD may have moved on by then. These say
# instead what stays true: the script's path in the repo, the baseline commit DVC started
# from, the experiment's own git ref (DVC commits the experiment there when it ends), and
# whether the code differed from that baseline.

# What `dvc exp run -S` and a finished stage change by design: not "dirty" code.
EXPERIMENT_FILES = ("params.yaml", "dvc.lock")


def _git(*args: str) -> str:
    result = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
    return result.stdout if result.returncode == 0 else ""


def source_tags() -> dict[str, str]:
    """MLflow's own source tags, true for queued experiments too: for a run and a logged
    model (both take ``tags=``, which win over the ones MLflow infers)."""
    script = Path(sys.argv[0]).resolve()
    workspace = Path.cwd().resolve()  # a stage runs in the repo root or DVC's copy of it
    name = script.relative_to(workspace) if script.is_relative_to(workspace) else script
    baseline = os.environ.get("DVC_EXP_BASELINE_REV") or _git("rev-parse", "HEAD").strip()
    return {
        "mlflow.source.name": name.as_posix(),
        "mlflow.source.type": "LOCAL",
        "mlflow.source.git.commit": baseline or "unknown",
    }


def provenance_tags() -> dict[str, str]:
    """Source tags plus ``git_commit`` (the baseline), ``git_dirty`` (code or config other
    than params.yaml/dvc.lock differs from it), ``git_changed`` (every changed path), and
    the DVC experiment's name and ref."""
    tags = source_tags()
    baseline = tags["mlflow.source.git.commit"]
    status = _git("status", "--porcelain", "--untracked-files=no")
    changed = sorted(line[3:] for line in status.splitlines())
    name = os.environ.get("DVC_EXP_NAME", "")
    ref = f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}" if name and baseline else ""
    return {
        **tags,
        "git_commit": baseline,
        "git_dirty": str(any(p not in EXPERIMENT_FILES for p in changed)).lower(),
        "git_changed": " ".join(changed)[:4000],
        "dvc_experiment": name,
        "dvc_experiment_ref": ref,
    }
