"""The evaluate stage: fixed-seed samples from a generator, and the whole pipeline on the
smoke preset through real DVC into a real (SQLite) MLflow store."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.evaluate import generate_samples
from pipeline.models import build_generator
from pipeline.params import Params, flatten

from conftest import Dvc, SmokePipeline

KEYS = {"fid", "classifier_score", "precision", "recall"} | {
    "min_class_share",
    "classes_present",
    "class_kl",
}
PLOTS = ["class_histogram.png", "digits.png", "samples.png", "training.gif", "training_curves.png"]


def _model(params: Params, **changes: Any) -> Any:
    return params.model.model_copy(update=changes)


@pytest.mark.parametrize("output", ["tanh", "sigmoid"])
def test_samples_are_fixed_balanced_and_in_unit_range(smoke_params: Params, output: str) -> None:
    model = _model(smoke_params, conditional=True, output=output)
    generator = build_generator(model)
    first = generate_samples(generator, model, num_samples=25, seed=3, batch_size=10)
    assert first.images.shape == (25, 28, 28)
    assert first.images.dtype == np.float32
    assert first.images.min() >= 0 and first.images.max() <= 1
    assert first.requested is not None
    assert np.bincount(first.requested).tolist() == [3] * 5 + [2] * 5
    again = generate_samples(generator, model, num_samples=25, seed=3, batch_size=25)
    # Batching changes nothing but float rounding: each sample gets the same noise (another
    # draw differs by ~0.1), while BLAS may block a matmul by batch size (1-ulp differences).
    np.testing.assert_allclose(first.images, again.images, rtol=0, atol=1e-6)
    other = generate_samples(generator, model, num_samples=25, seed=4, batch_size=25)
    assert not np.array_equal(first.images, other.images)


def test_unconditional_samples_request_nothing(smoke_params: Params) -> None:
    model = _model(smoke_params, conditional=False)
    samples = generate_samples(build_generator(model), model, 12, seed=0, batch_size=5)
    assert samples.requested is None
    assert samples.images.shape == (12, 28, 28)


def test_params_that_disagree_with_the_generator_are_named(smoke_params: Params) -> None:
    generator = build_generator(_model(smoke_params, conditional=False))
    with pytest.raises(ValueError, match=r"model\.conditional: got True.*1 input"):
        generate_samples(generator, _model(smoke_params, conditional=True), 10, 0, 10)


@pytest.mark.slow
def test_smoke_pipeline_reports_every_metric_into_the_training_run(
    smoke_pipeline: SmokePipeline, tmp_path: Path, dvc: Dvc
) -> None:
    repo_copy, env, uri = smoke_pipeline.repo, smoke_pipeline.env, smoke_pipeline.tracking_uri
    reports = repo_copy / "reports"
    metrics = json.loads((reports / "metrics.json").read_text())
    assert set(metrics) == KEYS | {"conditional_accuracy", "real"}  # smoke is conditional
    assert set(metrics["real"]) == KEYS
    assert 1 <= metrics["classifier_score"] <= 10
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert 0 <= metrics["conditional_accuracy"] <= 1
    # The floor: real test images against real training images are close on every figure
    # (loosely here: smoke's classifier saw 2,048 images for one epoch).
    real = metrics["real"]
    assert real["fid"] < metrics["fid"], metrics
    assert real["classes_present"] == 10 and real["class_kl"] < 0.25, metrics
    assert real["precision"] > 0.5 and real["recall"] > 0.5, metrics

    with (reports / "class_shares.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["digit"] for row in rows] == [str(d) for d in range(10)]
    assert sum(float(row["generated"]) for row in rows) == pytest.approx(1, abs=1e-5)
    assert sorted(p.name for p in (reports / "plots").iterdir()) == PLOTS
    for name in PLOTS:
        with Image.open(reports / "plots" / name) as image:
            assert image.format == name.rsplit(".")[-1].upper()

    # Same numbers, same run: evaluate logged into the run training opened.
    run_id = json.loads((repo_copy / "models" / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(uri)
    logged = client.get_run(run_id).data.metrics
    for key, value in flatten(metrics).items():
        assert logged[key] == pytest.approx(value), key
    artifacts = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert artifacts == {f"plots/{name}" for name in PLOTS}
    assert "metrics.json" in {a.path for a in client.list_artifacts(run_id)}

    # DVC sees the metrics and renders the plots; eval params re-run evaluate alone.
    shown = json.loads(dvc(repo_copy, "metrics", "show", "--json", env=env).stdout)
    assert "reports/metrics.json" in json.dumps(shown)
    dvc(repo_copy, "plots", "show", "--out", str(tmp_path / "html"), env=env)
    html = (tmp_path / "html" / "index.html").read_text()
    assert "training.gif" in html and "d_loss" in html
    params_file = repo_copy / "params.yaml"
    committed = params_file.read_text()
    smoke = yaml.safe_load(committed)
    smoke["eval"]["knn_k"] = 5
    params_file.write_text(yaml.safe_dump(smoke, sort_keys=False))
    try:
        status = dvc(repo_copy, "status", env=env).stdout
    finally:
        params_file.write_text(committed)  # the shared run stays as committed
    assert "evaluate:" in status
    assert "train:" not in status and "classifier:" not in status

    # Editing the downloader (a retry, a log line) changes no stage that does not run it.
    downloader = repo_copy / "pipeline" / "download.py"
    source = downloader.read_text()
    downloader.write_text(source + "\n# an edit\n")
    try:
        status = dvc(repo_copy, "status", env=env).stdout
    finally:
        downloader.write_text(source)  # the shared run stays as committed
    assert "download:" in status
    assert "train:" not in status and "classifier:" not in status
