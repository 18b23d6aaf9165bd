"""The MLflow store: where runs land, and several experiments starting at once."""

from __future__ import annotations

import json
import multiprocessing
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.core.errors import UserError
from pipeline.tracking.runs import Store, experiment_id, open_run, resolve_store


def test_default_store_is_under_the_dvc_root(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path.parent)  # a queued run's cwd is a temp copy, not the root
    assert resolve_store() == Store(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    server = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "DVC_ROOT": str(tmp_path)}
    assert resolve_store(server) == Store("http://127.0.0.1:5000", tmp_path)
    assert resolve_store({}, cwd=tmp_path).uri == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_later_stages_name_a_missing_or_unknown_training_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    run_file = tmp_path / "mlflow_run.json"
    missing = r"mlflow_run.json: missing; run the train stage first"
    with pytest.raises(UserError, match=missing), open_run(run_file):
        pass
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id("mnist-gan", Store(uri, tmp_path))  # a real store, without that run in it
    run_file.write_text(json.dumps({"run_id": "0" * 32, "tracking_uri": uri}))
    unknown = rf"MLflow run 0{{32}} is not in {re.escape(uri)}; retrain"
    with pytest.raises(UserError, match=unknown), open_run(run_file):
        pass


def _first_use(store: Store) -> str:
    return experiment_id("mnist-gan", store)


@pytest.mark.slow
def test_processes_creating_a_new_store_at_once_share_one_experiment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`dvc queue start -j 4` on a fresh repo: four trainings open a store that does not
    exist yet. MLflow migrates a new SQLite file on first connect; unserialised, the
    migrations collide and the store is left half-built."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        ids = pool.map(_first_use, [Store(uri, tmp_path)] * 4, chunksize=1)
    assert len(set(ids)) == 1
    experiment = MlflowClient(uri).get_experiment(ids[0])
    assert experiment.name == "mnist-gan"
    assert experiment.artifact_location == (tmp_path / "mlartifacts" / "mnist-gan").as_uri()
