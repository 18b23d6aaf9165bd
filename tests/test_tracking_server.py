"""Team tracking for real: PostgreSQL and `mlflow server` started on loopback by the tests
(pipeline/tracking/server.py, what `make tracking-server` runs), a queued DVC sweep logging
into it, training that outlives a server restart, and wrong tracking URIs failing first."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline.core.errors import UserError
from pipeline.experiments import compare, ui
from pipeline.tracking import run_logger, runs
from pipeline.tracking.server import TrackingServer

from helpers import REPO, Dvc, free_port, stage_args, tracking_env, train_stage, wait_for

# One PostgreSQL + MLflow server per session: every test here on the same pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("tracking_server")


def test_wrong_tracking_uris_fail_first_with_one_line(
    server: TrackingServer, tmp_path: Path
) -> None:
    """Refused connection (the real train stage, before TensorFlow), a Host header the
    server does not allow (403), and a scheme that is no store at all."""
    closed = f"http://127.0.0.1:{free_port()}"
    began = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "stages.train",
         *stage_args("train", tmp_path, params=REPO / "params.yaml", data=tmp_path / "none")],
        env={**tracking_env(server.uri), "MLFLOW_TRACKING_URI": closed},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    seconds = time.monotonic() - began
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert lines[-1].endswith(
        f"MLFLOW_TRACKING_URI: no MLflow server answers at {closed} (ConnectionError); start "
        "one (make tracking-server) or unset MLFLOW_TRACKING_URI for the local mlflow.db"
    ), result.stderr
    assert "Traceback" not in result.stderr and "training" not in result.stderr
    assert not (tmp_path / "models").exists()
    assert seconds < 120, seconds  # ~6 s of CPU (importing mlflow); no retries, no TF

    # 127.1 is 127.0.0.1 to the socket, but not a Host name the server allows by default
    forbidden = server.uri.replace("127.0.0.1", "127.1")
    with pytest.raises(UserError, match=r"answered 403 Forbidden.*'127\.1'.*--allowed-hosts"):
        runs.check_server(forbidden)
    with pytest.raises(UserError, match=r"got 'ftp://127\.0\.0\.1/x'; use http\(s\)://"):
        runs.check_server("ftp://127.0.0.1/x")
    runs.check_server(server.uri)  # the real one passes


def test_a_run_joins_the_experiment_another_run_created_meanwhile(
    server: TrackingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two queued runs can both find no experiment on the server; the second one's create is
    refused (RESOURCE_ALREADY_EXISTS), and it must join the first's, not fail. The race is
    replayed: the experiment exists, but the first lookup misses it as a run that looked a
    moment earlier would have."""
    name = "created-meanwhile"
    first = MlflowClient(server.uri).create_experiment(name)
    lookup, looked = MlflowClient.get_experiment_by_name, []

    def a_moment_earlier(client: MlflowClient, wanted: str) -> Any:
        looked.append(wanted)
        return None if len(looked) == 1 else lookup(client, wanted)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", a_moment_earlier)
    assert runs.experiment_id(name, runs.Store(server.uri, server.state)) == first
    assert looked == [name, name]


def test_run_logger_names_what_a_gone_server_never_got(server: TrackingServer) -> None:
    """Past the wait bound, what is still queued is named in one error, not silently lost."""
    client = MlflowClient(server.uri)
    run = client.create_run(client.create_experiment(f"gone-{time.time_ns()}"))
    closed = f"http://127.0.0.1:{free_port()}"  # the server's address once it is gone
    mlflow.set_tracking_uri(closed)
    began = time.monotonic()
    logger = run_logger.RunLogger(run, closed, wait_s=2)  # type: ignore[arg-type]
    with pytest.raises(run_logger.ServerGoneError) as caught, logger:
        for epoch in (1, 2, 3, 5):
            logger.log_metrics({"d_loss": 1.0 / epoch}, step=epoch)
        logger.log_artifact(REPO / "params.yaml", "samples")
    assert time.monotonic() - began < 10
    assert str(caught.value) == (
        f"MLflow server {closed} unreachable for over 2 s (MNIST_GAN_TRACKING_WAIT_S): not "
        f"logged to run {run.info.run_id}: metrics of epochs 1-3, 5 and 1 artifacts "
        "(params.yaml); models, checkpoints and reports are written"
    )


@pytest.mark.slow
def test_training_outlives_a_server_restart(
    server: TrackingServer, raw_params: dict[str, Any], mnist_dir: Path, tmp_path: Path
) -> None:
    """The MLflow server goes away after the first epoch and comes back while the train stage
    runs: training neither dies nor waits, and the run ends FINISHED with every epoch."""
    epochs = 60  # ~0.2 s each: training outlasts a server restart on a quiet machine
    client = MlflowClient(server.uri)
    # a busy machine may take minutes to restart the server: wait for it that long
    with train_stage(server.uri, raw_params, mnist_dir, tmp_path, epochs, wait_s=400) as stage:
        wait_for(stage.first_epoch_logged, 240, "the first epoch in the server")
        server.stop_mlflow()
        time.sleep(3)
        server.start_mlflow()
        back = time.monotonic()
        stage.proc.wait(timeout=300)
        after_back = time.monotonic() - back
    output = stage.output
    assert stage.proc.returncode == 0, output
    assert re.search(r"unreachable \(\w+\); buffering", output)  # the outage hit a log call
    # A stall would be MLflow's own retries, ~4 minutes; a loaded machine needs some slack.
    assert after_back < 180, after_back
    run_id = json.loads((tmp_path / "models" / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "d_loss")]
    assert sorted(steps) == list(range(1, epochs + 1))
    with (tmp_path / "reports" / "train_history.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == epochs
    assert (tmp_path / "models" / "generator.keras").is_file()
    samples = {a.path for a in client.list_artifacts(run_id, "samples")}
    assert len(samples) == epochs  # every grid, through the server's artifact proxy


@pytest.mark.slow
def test_queued_sweep_runs_in_parallel_and_logs_into_the_team_server(
    server: TrackingServer,
    repo_copy: Path,
    shared_mnist: Path,
    dvc: Dvc,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`make sweep` queues one experiment per value, named after it; `dvc queue start -j 2`
    runs both in temp copies DVC deletes, and each logs its run, metrics, artifacts and
    registered ONNX model into the PostgreSQL-backed server, with provenance tags that stay
    true; `make compare` and `make ui` show the sweep."""
    env = {"MNIST_MIRROR": str(shared_mnist), "MLFLOW_TRACKING_URI": server.uri}
    model = "mnist-generator-sweep"
    names = {"smoke-lr_g-1e-4": 1e-4, "smoke-lr_g-4e-4": 4e-4}
    sweep = [sys.executable, "-m", "pipeline.experiments.sweep", "smoke", "train.lr_g=1e-4,4e-4"]
    sweep.append(f"export.registered_model={model}")
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # as make's
    queued = subprocess.run(
        sweep, cwd=repo_copy, env={**os.environ, "PATH": path, **env}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert queued.returncode == 0, queued.stderr
    baseline = _git(repo_copy, "rev-parse", "HEAD")
    dvc(repo_copy, "queue", "start", "-j", "2", env=env)
    try:
        for _ in range(120):  # 10 minutes at most
            status = dvc(repo_copy, "queue", "status", env=env).stdout
            if "Queued" not in status and "Running" not in status:
                break
            time.sleep(5)
    finally:
        dvc(repo_copy, "queue", "stop", "--kill", env=env, check=False)
    assert status.count("Success") == 2, status

    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("mnist-gan")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # served by the server
    runs = client.search_runs([experiment.experiment_id])
    assert {run.info.run_name: float(run.data.params["train.lr_g"]) for run in runs} == names
    for run in runs:
        # Provenance that outlives DVC's temp copy: no path into it, the baseline commit,
        # the experiment's own git ref (which exists once the run is done), clean code.
        tags = run.data.tags
        assert tags["mlflow.source.name"] == "stages/train.py"
        assert tags["git_commit"] == tags["mlflow.source.git.commit"] == baseline
        assert tags["git_dirty"] == "false", tags["git_changed"]
        assert tags["dvc_experiment"] == run.info.run_name
        assert _git(repo_copy, "rev-parse", f"{tags['dvc_experiment_ref']}^") == baseline
        (logged,) = client.search_logged_models(
            [experiment.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
        )
        assert logged.tags["mlflow.source.name"] == "stages/export.py"
        assert run.info.status == "FINISHED"
        assert {"d_loss", "g_loss", "fid", "precision", "export_parity_max_abs_diff"} <= set(
            run.data.metrics
        ), run.data.metrics
        assert len(client.get_metric_history(run.info.run_id, "d_loss")) == 1  # one epoch
        assert "samples.png" in {a.path.rsplit("/", 1)[-1] for a in
                                 client.list_artifacts(run.info.run_id, "plots")}  # fmt: skip
    versions = client.search_model_versions(f"name='{model}'")
    assert sorted(v.run_id for v in versions) == sorted(run.info.run_id for run in runs)
    assert list((server.state / "artifacts").rglob("samples.png"))  # stored by the server
    assert not list((repo_copy / ".dvc" / "tmp" / "exps").glob("tmp*"))  # temp copies gone
    assert not (repo_copy / "mlflow.db").exists()  # nothing went to the local store

    # `make compare` from DVC's real JSON: fits 120 columns; the swept param, then the
    # headline metrics.
    text = compare.table(json.loads(dvc(repo_copy, "exp", "show", "--json", env=env).stdout), 120)
    assert max(map(len, text.splitlines())) <= 120, text
    header = text.splitlines()[0].split()
    assert header[:2] == ["Experiment", "lr_g"], text
    assert header[-len(compare.HEADLINE) :] == list(compare.HEADLINE), text
    assert {line.split()[0] for line in text.splitlines()[1:]} >= set(names), text

    # `make ui`'s links: the experiment's runs page, and the Compare page of this sweep.
    monkeypatch.chdir(repo_copy)
    runs_link, sweep_link = ui.links("http://127.0.0.1:5000", server.uri, "mnist-gan")
    assert runs_link.endswith(f"/#/experiments/{experiment.experiment_id}/runs")
    assert all(quote(run.info.run_id) in sweep_link for run in runs)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()
