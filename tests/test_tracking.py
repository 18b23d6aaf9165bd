"""The MLflow store: where runs land, and several experiments starting at once."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking import experiment_id, tracking_uri


def test_default_store_is_under_the_dvc_root(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path.parent)  # a queued run's cwd is a temp copy, not the root
    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"


def _first_use(uri: str) -> str:
    return experiment_id("mnist-gan", uri)


@pytest.mark.slow
def test_processes_creating_a_new_store_at_once_share_one_experiment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`dvc queue start -j 4` on a fresh repo: four trainings open a store that does not
    exist yet. MLflow migrates a new SQLite file on first connect; unserialised, the
    migrations collide and the store is left half-built."""
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        ids = pool.map(_first_use, [uri] * 4, chunksize=1)
    assert len(set(ids)) == 1
    experiment = MlflowClient(uri).get_experiment(ids[0])
    assert experiment.name == "mnist-gan"
    assert experiment.artifact_location == (tmp_path / "mlartifacts" / "mnist-gan").as_uri()
