"""The evaluate stage: it measures the ONNX file that ships, draws what the CLI draws, gives the
same numbers on any thread count and in any fresh process, never imports TensorFlow, and runs
end to end on the smoke preset through real DVC into a real (SQLite) MLflow store."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.core.cpu import isa_class
from pipeline.core.params import Params, flatten
from pipeline.evaluation import yardstick
from pipeline.evaluation.evaluate import Paths, generate_samples, measure
from pipeline.inference.generator import Generator

from helpers import Dvc, SmokePipeline

REPO = Path(__file__).resolve().parent.parent
KEYS = {"fid", "classifier_score", "precision", "recall"} | {
    "min_class_share",
    "classes_present",
    "class_kl",
}
PLOTS = ["class_histogram.png", "digits.png", "samples.png", "training.gif", "training_curves.png"]
HEAVY = ("tensorflow", "keras", "tf2onnx")
# Runs a module as `python -m` would, then fails if it imported TensorFlow on the way.
NO_TF = (
    "import runpy, sys\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
    f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
    "assert not heavy, heavy\n"
)


def _close(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Equal metrics: the same keys, numbers within 1e-6 relative (identical in practice)."""
    a, b = flatten(a), flatten(b)
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, str):
            assert value == b[key], key
        else:
            assert b[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key


def test_evaluate_draws_what_the_cli_draws(
    onnx_generators: dict[str, Path], tmp_path: Path
) -> None:
    model = onnx_generators["conditional"]
    out = tmp_path / "x.npy"
    cli = [sys.executable, "-m", "pipeline.inference.generate", "--model", str(model)]
    cli += ["--seed", "3", "--n", "4", "--out", str(out)]
    subprocess.run(cli, cwd=REPO, check=True, capture_output=True, timeout=120)
    samples = generate_samples(Generator(model, max_n=1000), 500, seed=3, batch_size=250)
    np.testing.assert_array_equal(np.load(out), samples.images[:4])


@pytest.mark.parametrize("name", ["conditional", "unconditional"])
def test_samples_are_fixed_balanced_and_batch_free(
    name: str, onnx_generators: dict[str, Path]
) -> None:
    generator = Generator(onnx_generators[name], max_n=1000)
    first = generate_samples(generator, num_samples=25, seed=3, batch_size=25)  # batches of 20
    assert first.images.shape == (25, 28, 28) and first.images.dtype == np.float32
    assert 0 <= first.images.min() < first.images.max() <= 1
    if name == "conditional":
        assert first.requested is not None
        assert np.bincount(first.requested).tolist() == [3] * 5 + [2] * 5
        assert first.requested[:12].tolist() == [*range(10), 0, 1]
    else:
        assert first.requested is None
    # Each image gets the same noise and label whatever the batch; BLAS may block a matmul
    # by batch size, so equal up to float rounding (another draw differs by ~0.1).
    again = generate_samples(generator, num_samples=25, seed=3, batch_size=7)  # batches of 10
    np.testing.assert_allclose(first.images, again.images, rtol=0, atol=1e-6)
    other = generate_samples(generator, num_samples=25, seed=4, batch_size=25)
    assert not np.array_equal(first.images, other.images)


def test_numbers_are_the_same_on_one_and_two_threads(
    onnx_generators: dict[str, Path], mnist_dir: Path, smoke_params: Params, tmp_path: Path
) -> None:
    paths = Paths(
        generator=onnx_generators["conditional"],
        yardstick=yardstick.PATH,
        data=mnist_dir,
        **{name: tmp_path / name for name in ("run_file", "history", "samples")},
        **{name: tmp_path / name for name in ("metrics", "shares", "plots")},
    )
    one, *_ = measure(paths, smoke_params.eval, threads=1)
    two, *_ = measure(paths, smoke_params.eval, threads=2)
    _close(one, two)
    assert one["yardstick"] == yardstick.SHA256[:12]
    assert list(tmp_path.iterdir()) == []  # measuring writes nothing


def test_evaluate_code_never_imports_tensorflow() -> None:
    code = (
        "import sys, stages.evaluate, pipeline.evaluation.evaluate\n"
        "import pipeline.evaluation.yardstick, pipeline.tracking.runs\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


@pytest.mark.slow
@pytest.mark.xdist_group("smoke_pipeline")  # one shared smoke run per session
def test_smoke_pipeline_reports_every_metric_into_the_training_run(
    smoke_pipeline: SmokePipeline, tmp_path: Path, dvc: Dvc
) -> None:
    repo_copy, env, uri = smoke_pipeline.repo, smoke_pipeline.env, smoke_pipeline.tracking_uri
    reports = repo_copy / "reports"
    metrics = json.loads((reports / "metrics.json").read_text())
    trained_on = {"compute_dtype", "cpu_isa"}  # copied from the model: the training's machine
    assert set(metrics) == KEYS | {"conditional_accuracy", "real", "yardstick"} | trained_on
    assert metrics["yardstick"] == yardstick.SHA256[:12]
    train = json.loads((repo_copy / "reports" / "train.json").read_text())
    assert {key: metrics[key] for key in trained_on} == {key: train[key] for key in trained_on}
    assert metrics["cpu_isa"] == isa_class() and metrics["compute_dtype"] in {"float32", "bfloat16"}
    assert set(metrics["real"]) == KEYS
    assert 1 <= metrics["classifier_score"] <= 10
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert 0 <= metrics["conditional_accuracy"] <= 1
    # The floor: real test images against real training images, under the pinned yardstick.
    real = metrics["real"]
    assert real["fid"] < 1 < metrics["fid"], metrics
    assert real["classes_present"] == 10 and real["class_kl"] < 0.01, metrics
    assert real["precision"] > 0.85 and real["recall"] > 0.85, metrics
    assert real["classifier_score"] > 9.5, metrics

    with (reports / "class_shares.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["digit"] for row in rows] == [str(d) for d in range(10)]
    assert sum(float(row["generated"]) for row in rows) == pytest.approx(1, abs=1e-5)
    assert sorted(p.name for p in (reports / "plots").iterdir()) == PLOTS
    for name in PLOTS:
        with Image.open(reports / "plots" / name) as image:
            assert image.format == name.rsplit(".")[-1].upper()

    # Same numbers, same run: evaluate logged into the run training opened, with the
    # yardstick's hash as a tag.
    run_id = json.loads((repo_copy / "models" / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.tags["yardstick"] == yardstick.SHA256
    for key, value in flatten(metrics).items():
        if not isinstance(value, str):
            assert run.data.metrics[key] == pytest.approx(value), key
    artifacts = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert artifacts == {f"plots/{name}" for name in PLOTS}
    assert "metrics.json" in {a.path for a in client.list_artifacts(run_id)}

    # A second, independent evaluation: a fresh process writing to fresh folders, with every
    # path on its command line as in dvc.yaml, and TensorFlow never imported.
    fresh = tmp_path / "fresh"
    args = ["--params", "params.yaml", "--generator", "models/generator.onnx"]
    args += ["--yardstick", "yardstick/classifier.onnx", "--data", "data"]
    args += ["--run-file", "models/mlflow_run.json", "--history", "reports/train_history.csv"]
    args += ["--samples", "reports/samples", "--metrics", str(fresh / "metrics.json")]
    args += ["--shares", str(fresh / "shares.csv"), "--plots", str(fresh / "plots")]
    process_env = {**os.environ, **env, "PYTHONPATH": str(repo_copy)}
    command = [sys.executable, "-c", NO_TF, "stages.evaluate", *args]
    subprocess.run(command, cwd=repo_copy, env=process_env, check=True, timeout=600)
    _close(metrics, json.loads((fresh / "metrics.json").read_text()))
    assert sorted(p.name for p in (fresh / "plots").iterdir()) == PLOTS

    # DVC sees the metrics and renders the plots; eval params re-run evaluate alone.
    shown = json.loads(dvc(repo_copy, "metrics", "show", "--json", env=env).stdout)
    assert "reports/metrics.json" in json.dumps(shown)
    dvc(repo_copy, "plots", "show", "--out", str(tmp_path / "html"), env=env)
    html = (tmp_path / "html" / "index.html").read_text()
    assert "training.gif" in html and "d_loss" in html

    def status_after(path: Path, edit: Callable[[str], str]) -> str:
        """`dvc status` with ``path`` edited; the shared run stays as committed."""
        committed = path.read_text()
        path.write_text(edit(committed))
        try:
            return dvc(repo_copy, "status", env=env).stdout
        finally:
            path.write_text(committed)

    def knn_5(text: str) -> str:
        smoke = yaml.safe_load(text)
        smoke["eval"]["knn_k"] = 5
        return yaml.safe_dump(smoke, sort_keys=False)

    status = status_after(repo_copy / "params.yaml", knn_5)
    assert "evaluate:" in status
    assert "train:" not in status and "export:" not in status

    # Editing the downloader (a retry, a log line) changes no stage that does not run it.
    edited = repo_copy / "pipeline" / "data" / "download.py"
    status = status_after(edited, lambda text: text + "\n# edit\n")
    assert "download:" in status
    assert "train:" not in status and "export:" not in status
