"""The database behind the team tracking server goes away, for real: PostgreSQL stopped
(``pg_ctl stop -m fast``) under the running ``mlflow server`` while the train stage logs into
it. Meanwhile the server answers ``/health`` 200 and every run call 503; training buffers,
and either everything arrives once (it came back) or one line names the database (it did
not), after the outputs are written."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pipeline.core.errors import UserError
from pipeline.tracking import runs
from pipeline.tracking.server import TrackingServer

from helpers import train_stage, wait_for

# The session's PostgreSQL + MLflow server (conftest.server): on the worker that has it.
pytestmark = pytest.mark.xdist_group("tracking_server")
DATABASE_DOWN = "answers but its database is unavailable (HTTP 503: (psycopg2.OperationalError)"


def test_a_batch_sent_twice_is_stored_once(server: TrackingServer) -> None:
    """What RunLogger's resend relies on: the same Metric objects logged again (a batch the
    server committed but whose answer was lost) leave one value per step, not two."""
    client = MlflowClient(server.uri)
    run_id = client.create_run(client.create_experiment(f"twice-{time.time_ns()}")).info.run_id
    batch = [Metric(key, 0.5, 1_000, step) for key in ("d_loss", "g_loss") for step in (1, 2)]
    client.log_batch(run_id, metrics=batch)
    client.log_batch(run_id, metrics=batch)
    for key in ("d_loss", "g_loss"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2]


@pytest.mark.slow
def test_training_outlives_a_database_outage(
    server: TrackingServer, raw_params: dict[str, Any], mnist_dir: Path, tmp_path: Path
) -> None:
    """PostgreSQL stops after the first epoch and starts again 3 s later while the train
    stage runs: the run ends FINISHED with exactly one value per epoch of every metric."""
    epochs = 60  # ~0.2 s each: the outage falls well inside the training
    with train_stage(server.uri, raw_params, mnist_dir, tmp_path, epochs, wait_s=300) as stage:
        wait_for(stage.first_epoch_logged, 240, "the first epoch in the server")
        try:
            server.stop_postgres()
            time.sleep(3)
        finally:
            server.start_postgres()
        stage.proc.wait(timeout=300)
    output = stage.output
    assert stage.proc.returncode == 0, output
    assert f"MLflow server {server.uri} {DATABASE_DOWN}" in output, output  # it hit a log call
    assert "back after" in output, output
    client = MlflowClient(server.uri)
    run_id = json.loads((tmp_path / "models" / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    per_epoch = [key for key in run.data.metrics if key in ("d_loss", "g_loss")]
    assert len(per_epoch) == 2, run.data.metrics
    for key in per_epoch:  # nothing lost, nothing twice
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(1, epochs + 1)), (key, steps)
    assert len(client.list_artifacts(run_id, "samples")) == epochs


@pytest.mark.slow
def test_a_database_gone_for_good_fails_in_one_line_after_the_outputs(
    server: TrackingServer, raw_params: dict[str, Any], mnist_dir: Path, tmp_path: Path
) -> None:
    """PostgreSQL stops after the first epoch and stays down past MNIST_GAN_TRACKING_WAIT_S:
    training finishes and writes its outputs, then the stage fails with one line naming the
    database and the epochs never logged; a stage starting meanwhile says so first."""
    epochs = 20  # ~4 s: PostgreSQL stops well before the last epoch
    try:
        with train_stage(server.uri, raw_params, mnist_dir, tmp_path, epochs, wait_s=3) as stage:
            wait_for(stage.first_epoch_logged, 240, "the first epoch in the server")
            server.stop_postgres()
            stage.proc.wait(timeout=300)
        with pytest.raises(UserError) as early:
            runs.check_server(server.uri)
    finally:
        server.start_postgres()
    output = stage.output
    assert stage.proc.returncode == 1, output
    last = output.strip().splitlines()[-1]
    assert f"MLflow server {server.uri} {DATABASE_DOWN}" in last, output
    assert "for over 3 s (MNIST_GAN_TRACKING_WAIT_S): not logged to run" in last, last
    assert f"-{epochs}" in last and last.endswith("models, checkpoints and reports are written")
    assert "Traceback" not in output, output
    for written in ("models/generator.keras", "models/checkpoints/checkpoint",
                    "reports/train_history.csv"):  # fmt: skip
        assert (tmp_path / written).is_file(), written
    assert str(early.value).startswith(
        f"MLFLOW_TRACKING_URI: the MLflow server at {server.uri} {DATABASE_DOWN}"
    )
    assert str(early.value).endswith("; rerun once it is back")
    print(last, early.value, sep="\n")
