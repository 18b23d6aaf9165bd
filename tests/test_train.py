"""Real training runs on the smoke preset: outputs, MLflow, resume, SIGKILL, mirrored, NaN."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml
from mlflow.tracking import MlflowClient

from pipeline.core.cpu import cores, native_bfloat16
from pipeline.core.params import Params
from pipeline.tracking.runs import Store
from pipeline.training.distribute import ThreadPoolsFixedError, set_thread_pools
from pipeline.training.train import HISTORY_COLUMNS, TrainingDivergedError, train

from helpers import stage_args, train_outputs, with_train

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_smoke_training_writes_outputs_and_mlflow_run(
    smoke_params: Params, mnist_dir: Path, tmp_path: Path, mlflow_store: str
) -> None:
    params = with_train(smoke_params, epochs=2)
    metrics = train(params, mnist_dir, train_outputs(tmp_path), Store(mlflow_store, tmp_path))
    assert all(np.isfinite(metrics[key]) for key in ("d_loss", "g_loss", "d_real", "d_fake"))
    assert metrics["epochs"] == 2 and metrics["steps"] == 2 * (512 // 64)

    history = (tmp_path / "reports" / "train_history.csv").read_text().splitlines()
    assert history[0] == ",".join(HISTORY_COLUMNS) and len(history) == 3
    assert json.loads((tmp_path / "reports" / "train.json").read_text()) == metrics
    grids = sorted(path.name for path in (tmp_path / "reports" / "samples").iterdir())
    assert grids == ["step_0000008.png", "step_0000016.png"]

    generator = keras.models.load_model(tmp_path / "models" / "generator.keras")
    z, labels = tf.zeros([2, params.model.latent_dim]), tf.constant([3, 7])
    images = generator([z, labels] if params.model.conditional else z).numpy()
    assert images.shape == (2, 28, 28, 1) and np.abs(images).max() <= 1.0
    keras.models.load_model(tmp_path / "models" / "discriminator.keras")

    run_info = json.loads((tmp_path / "models" / "mlflow_run.json").read_text())
    assert run_info["tracking_uri"] == mlflow_store
    client = MlflowClient(mlflow_store)
    run = client.get_run(run_info["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["preset"] == "smoke"
    assert run.data.params["train.epochs"] == "2"
    d_loss = client.get_metric_history(run.info.run_id, "d_loss")
    assert [m.step for m in d_loss] == [1, 2]
    assert d_loss[-1].value == pytest.approx(metrics["d_loss"])
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert artifacts == ["samples/step_0000008.png", "samples/step_0000016.png"]
    experiment = client.get_experiment(run_info["experiment_id"])
    assert experiment.artifact_location == (tmp_path / "mlartifacts" / "mnist-gan").as_uri()


def test_mixed_precision_on_a_cpu_trains_in_bfloat16_where_it_is_native(
    smoke_params: Params, mnist_dir: Path, tmp_path: Path, mlflow_store: str
) -> None:
    metrics = train(
        with_train(smoke_params, mixed_precision=True),
        mnist_dir,
        train_outputs(tmp_path),
        Store(mlflow_store, tmp_path),
    )
    assert keras.mixed_precision.global_policy().name == "float32"  # the process' policy again
    assert all(np.isfinite(metrics[key]) for key in ("d_loss", "g_loss", "d_real", "d_fake"))
    expected = "bfloat16" if native_bfloat16() else "float32"
    run_id = json.loads((tmp_path / "models" / "mlflow_run.json").read_text())["run_id"]
    assert MlflowClient(mlflow_store).get_run(run_id).data.tags["compute_dtype"] == expected
    generator = keras.models.load_model(tmp_path / "models" / "generator.keras")
    dense = [layer for layer in generator.layers if isinstance(layer, keras.layers.Dense)]
    assert {layer.compute_dtype for layer in dense} == {expected}
    assert {weight.dtype for weight in generator.weights} == {"float32"}  # the master weights
    assert generator.get_layer("image").compute_dtype == "float32"  # images leave in float32


def test_rerun_resumes_and_changed_params_start_fresh(
    smoke_params: Params, mnist_dir: Path, tmp_path: Path, mlflow_store: str, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.training.checkpoints")
    out, models = train_outputs(tmp_path), tmp_path / "models"
    store = Store(mlflow_store, tmp_path)
    first = train(smoke_params, mnist_dir, out, store)
    run_id = json.loads((models / "mlflow_run.json").read_text())["run_id"]
    # Nothing left to train: the same metrics come back from the checkpointed history.
    assert train(smoke_params, mnist_dir, out, store) == first
    assert "resuming from" in caplog.text
    assert json.loads((models / "mlflow_run.json").read_text())["run_id"] == run_id

    caplog.clear()
    train(with_train(smoke_params, lr_g=1e-3), mnist_dir, out, store)
    assert "from other params or code" in caplog.text and "starting fresh" in caplog.text
    assert json.loads((models / "mlflow_run.json").read_text())["run_id"] != run_id


def test_non_finite_loss_stops_with_epoch_and_step(
    smoke_params: Params, mnist_dir: Path, tmp_path: Path, mlflow_store: str
) -> None:
    # lr 1e30: Adam moves every weight by ~1e30 on the first update, so logits overflow.
    params = with_train(smoke_params, lr_d=1e30, lr_g=1e30, epochs=None, steps=6,
                     checkpoint_every=1, sample_every=6)  # fmt: skip
    with pytest.raises(TrainingDivergedError, match=r"non-finite loss at epoch 1, step (\d)") as e:
        train(params, mnist_dir, train_outputs(tmp_path), Store(mlflow_store, tmp_path))
    bad_step = int(e.value.args[0].split("step ")[1].split(";")[0])
    saved = tf.train.latest_checkpoint(tmp_path / "models" / "checkpoints")
    # Only steps before the bad one were checkpointed; no model file was written.
    assert saved is None or int(saved.rsplit("-", 1)[1]) < bad_step
    assert not (tmp_path / "models" / "generator.keras").exists()


def test_training_refuses_thread_pools_it_did_not_plan(
    smoke_params: Params, mnist_dir: Path, tmp_path: Path, mlflow_store: str
) -> None:
    """TensorFlow's pools are fixed once it starts, and they decide how reductions split: a
    training whose plan differs from the pools this process runs with would not give a fresh
    process' numbers, so it says so in one line before any weight exists."""
    tf.constant(1.0) + 1.0  # started: the pools are the session's (conftest), one shard's differ
    one_shard = with_train(smoke_params, shards=1)
    with pytest.raises(ThreadPoolsFixedError) as refused:
        train(one_shard, mnist_dir, train_outputs(tmp_path), Store(mlflow_store, tmp_path))
    assert "train.shards: 1" in str(refused.value) and "\n" not in str(refused.value)
    assert "fresh process" in str(refused.value)
    assert keras.mixed_precision.global_policy().name == "float32"  # the policy given back
    assert not (tmp_path / "models" / "generator.keras").exists()
    set_thread_pools(smoke_params.train, cores())  # the session's plan: accepted as it is


def _write_params(smoke: Params, path: Path, **train: Any) -> Path:
    raw = with_train(smoke, **train).model_dump(mode="json")
    path.write_text(yaml.safe_dump(raw))
    return path


def _stage(params: Path, mnist: Path, out: Path, env: dict[str, str]) -> subprocess.Popen:
    paths = stage_args("train", out, params=params, data=mnist)
    command = [sys.executable, "-m", "stages.train", *paths]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_sigkill_then_rerun_is_bit_identical(
    smoke_params: Params, mnist_dir: Path, tmp_path: Path, mlflow_store: str
) -> None:
    # With the EMA of G on: the superset of the state (its average is checkpointed too, under
    # its own key), and generator.keras is then that average. With lazy R1 on: the resumed
    # run must take it on the same updates.
    lazy_r1 = smoke_params.loss.model_copy(update={"r1": 0.1, "r1_every": 4})
    smoke = smoke_params.model_copy(update={"loss": lazy_r1})
    params = _write_params(smoke, tmp_path / "params.yaml", epochs=12, ema_decay=0.9)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    reference = tmp_path / "reference"  # uninterrupted, in a fresh process as the stage runs
    done = _stage(params, mnist_dir, reference, env)
    assert done.wait(timeout=300) == 0, done.communicate()[0]

    out = tmp_path / "killed"
    victim = _stage(params, mnist_dir, out, env)
    index = out / "models" / "checkpoints" / "ckpt-24.index"  # epoch 3 of 12 saved
    while not index.exists() and victim.poll() is None:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL, "finished before it could be killed"
    assert not (out / "models" / "generator.keras").exists()
    saved = [name for name, _ in tf.train.list_variables(str(index.with_suffix("")))]
    assert any(name.startswith("generator_ema/") for name in saved)

    resumed = _stage(params, mnist_dir, out, env)
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    assert "resuming from" in log
    for net in ("generator", "discriminator"):
        expected = keras.models.load_model(reference / "models" / f"{net}.keras")
        actual = keras.models.load_model(out / "models" / f"{net}.keras")
        for want, got in zip(expected.get_weights(), actual.get_weights(), strict=True):
            np.testing.assert_array_equal(got, want)  # bit-identical, not approximately equal
    raw_grids = sorted(path.name for path in (out / "reports" / "samples" / "raw").iterdir())
    assert len(raw_grids) == 12  # the raw G's grid beside each EMA one


MIRRORED = """
import logging
import sys
from pathlib import Path
import tensorflow as tf
logging.basicConfig(level=logging.INFO)
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, "tests")
from helpers import train_outputs
from pipeline.core.params import load_params
from pipeline.training.train import train
from pipeline.tracking.runs import resolve_store
out = train_outputs(Path(sys.argv[2]))
print(train(load_params(sys.argv[1]), Path(sys.argv[3]), out, resolve_store()))
"""


def test_mirrored_strategy_on_two_logical_cpus(
    smoke_params: Params, mnist_dir: Path, tmp_path: Path, mlflow_store: str
) -> None:
    params = _write_params(smoke_params, tmp_path / "params.yaml", strategy="mirrored")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED, str(params), str(tmp_path), str(mnist_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "strategy MirroredStrategy with 2 replicas" in result.stderr
    metrics = json.loads((tmp_path / "reports" / "train.json").read_text())
    assert all(np.isfinite(metrics[key]) for key in ("d_loss", "g_loss", "d_real", "d_fake"))
    assert 0.0 < metrics["d_real"] < 1.0
