"""The MLflow store: where runs land, and several experiments starting at once."""

from __future__ import annotations

import json
import multiprocessing
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from mlflow.tracking import MlflowClient

from pipeline import compare, ui
from pipeline.stage import UserError
from pipeline.tracking import experiment_id, open_run, tracking_uri

from conftest import Dvc


def test_default_store_is_under_the_dvc_root(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path.parent)  # a queued run's cwd is a temp copy, not the root
    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_later_stages_name_a_missing_or_unknown_training_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    run_file = tmp_path / "mlflow_run.json"
    missing = r"mlflow_run.json: missing; run the train stage first"
    with pytest.raises(UserError, match=missing), open_run(run_file):
        pass
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id("mnist-gan", uri)  # a real store, without that run in it
    run_file.write_text(json.dumps({"run_id": "0" * 32, "tracking_uri": uri}))
    unknown = rf"MLflow run 0{{32}} is not in {re.escape(uri)}; retrain"
    with pytest.raises(UserError, match=unknown), open_run(run_file):
        pass


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


@pytest.mark.slow
def test_queued_experiments_run_in_parallel_and_log_into_the_repo_store(
    monkeypatch: pytest.MonkeyPatch, repo_copy: Path, shared_mnist: Path, dvc: Dvc
) -> None:
    """What `make exp PRESET=... QUEUE=1` + `dvc queue start -j 2` does on a fresh repo: each
    run works in a temp copy DVC deletes, yet its MLflow run and artifacts stay in the repo."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    env = {"MNIST_MIRROR": str(shared_mnist)}
    names = {"smoke-seed-1": "1", "smoke-seed-2": "2"}
    # `make sweep PRESET=smoke SET=seed=1,2`: one queued experiment per value, named after it.
    sweep = [sys.executable, "-m", "pipeline.sweep", "smoke", "seed=1,2"]
    queued = subprocess.run(sweep, cwd=repo_copy, capture_output=True, text=True, timeout=300)
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
    assert status.count("Success") == len(names), status

    store = repo_copy / "mlflow.db"
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("mnist-gan")
    assert experiment.artifact_location == (repo_copy / "mlartifacts" / "mnist-gan").as_uri()
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(names)
    for name, run in runs.items():
        assert run.data.params["seed"] == names[name]
        assert {"d_loss", "g_loss", "fid", "precision"} <= set(run.data.metrics)
        assert len(client.get_metric_history(run.info.run_id, "d_loss")) == 1  # one epoch
        artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
        assert artifacts.is_relative_to(repo_copy / "mlartifacts")
        assert (artifacts / "plots" / "samples.png").is_file()
        # Provenance that outlives DVC's temp copy: no path into it, the baseline commit,
        # the experiment's own git ref (which exists once the run is done), clean code.
        tags = run.data.tags
        assert tags["mlflow.source.name"] == "stages/train.py"
        assert tags["git_commit"] == tags["mlflow.source.git.commit"] == baseline
        assert tags["git_dirty"] == "false", tags["git_changed"]
        assert tags["dvc_experiment"] == name
        assert _git(repo_copy, "rev-parse", f"{tags['dvc_experiment_ref']}^") == baseline
        (model,) = client.search_logged_models(
            [experiment.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
        )
        assert model.tags["mlflow.source.name"] == "stages/export.py"
    assert not list((repo_copy / ".dvc" / "tmp" / "exps").glob("tmp*"))  # temp copies gone

    # The comparison of the sweep, from DVC's real JSON: fits 120 columns, names the swept
    # param and the headline metrics.
    shown = dvc(repo_copy, "exp", "show", "--json", env=env).stdout
    text = compare.table(json.loads(shown), width=120)
    assert max(map(len, text.splitlines())) <= 120, text
    header = text.splitlines()[0].split()
    assert header[:2] == ["Experiment", "seed"], text
    assert header[-len(compare.HEADLINE) :] == list(compare.HEADLINE), text
    assert {line.split()[0] for line in text.splitlines()[1:]} >= set(names), text

    # `make ui`'s links: the experiment's runs page, and the Compare page of this sweep.
    monkeypatch.chdir(repo_copy)
    runs_link, sweep_link = ui.links("http://127.0.0.1:5000", f"sqlite:///{store}", "mnist-gan")
    assert runs_link.endswith(f"/#/experiments/{experiment.experiment_id}/runs")
    assert all(quote(run.info.run_id) in sweep_link for run in runs.values())


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()
