"""Multi-worker training for real: two train stages on loopback (MultiWorkerMirroredStrategy
over gRPC, on CPU) started by ``python -m pipeline.training.multiworker``, a worker killed,
the rerun resumed from the chief's checkpoint, and the result compared with a one-worker run."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.core.errors import UserError
from pipeline.core.params import Params, load_params
from pipeline.tracking.runs import Store
from pipeline.training.export import export_model
from pipeline.training.multiworker import check_params, dvc_train_args, free_ports, tf_config
from pipeline.training.train import train

from helpers import stage_args, train_outputs

REPO = Path(__file__).resolve().parent.parent

# Two workers agree with one device up to float rounding, not bit for bit. Each worker
# builds the same global batch and the same global noise (drawn once, outside the replicas)
# and takes its half (distribute.replica_rows), so every step computes the same maths;
# what differs is the order of additions: one device sums a loss's 64 terms at once, two
# workers sum 32 each and all-reduce the gradients. That is float32 rounding, ~1e-7 relative
# per step, and 24 Adam steps (each moves a weight by at most ~lr) do not amplify it past
# ~1e-6: measured 5e-8 (weights) and 1.2e-7 (losses) on a 2-core x86 box. 1e-5 leaves 100x
# for other CPUs' kernels, and is still far below what one wrong row or noise draw makes
# (the first step alone then moves the losses by ~1e-2).
TOLERANCE = 1e-5
STEPS = 24  # 3 epochs of 8 batches of 64 on the smoke preset's 512 images
# Seconds for a launch to reach a checkpoint or finish: ~30 s on an idle 2-core machine, but
# importing TensorFlow alone took 3 minutes per worker on a shared one (load 20).
WAIT_S = 600


class Launcher:
    """``python -m pipeline.training.multiworker`` in the background; its output lines in
    ``lines``."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        command = [
            sys.executable,
            "-m",
            "pipeline.training.multiworker",
            "--workers",
            "2",
            "--grace",
            "5",
        ]
        self.proc = subprocess.Popen(
            [*command, "--", *args], cwd=REPO, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def log(self, prefix: str = "") -> str:
        return "".join(line for line in self.lines if line.startswith(prefix))

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code

    def wait_for(self, predicate: Any, timeout: float, what: str) -> None:
        """Until ``predicate()``; fails with the log if the launcher ends or time runs out."""
        deadline = time.monotonic() + timeout
        while not predicate():
            assert self.proc.poll() is None, f"no {what}: launcher exited\n{self.log()}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s\n{self.log()}"
            time.sleep(0.05)

    def kill(self) -> None:  # the launcher stops its workers; this is the last resort
        if self.proc.poll() is None:
            self.proc.kill()
        for pid in re.findall(r"worker \d: pid (\d+)", self.log("[launcher]")):
            with contextlib.suppress(OSError):  # gone already; only our stage, not a reused pid
                if b"stages.train" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(int(pid), 9)
        self.wait(timeout=30)


def _params(smoke: Params, strategy: str) -> Params:
    # float32: the cluster adds its gradients in another order than one worker does, and
    # bfloat16's rounding of that difference would swamp the comparison with one worker.
    update = {"strategy": strategy, "epochs": 3, "mixed_precision": False}
    return smoke.model_copy(update={"train": smoke.train.model_copy(update=update)})


def _write(params: Params, path: Path) -> Path:
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return path


@pytest.fixture
def reference_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process one-worker run's MLflow store, apart from the cluster's."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'reference.db'}")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "reference"))


def test_launcher_config_and_bad_params(smoke_params: Params, tmp_path: Path) -> None:
    ports = free_ports(3)
    assert len(set(ports)) == 3
    config = json.loads(tf_config(ports, 2))
    assert config["cluster"]["worker"][2] == f"127.0.0.1:{ports[2]}"
    assert config["task"] == {"type": "worker", "index": 2}
    args = dvc_train_args(REPO / "dvc.yaml")
    assert args[:4] == ["--params", "params.yaml", "--data", "data"]

    params_file = tmp_path / "params.yaml"
    for strategy, workers, message in (
        ("auto", 2, "train.strategy: got 'auto'; set 'multi_worker'"),
        ("multi_worker", 3, "train.batch_size: got 64; must be a multiple of the 3 workers"),
    ):
        _write(_params(smoke_params, strategy), params_file)
        with pytest.raises(UserError, match=re.escape(message)):
            check_params(["--params", str(params_file)], workers)
    check_params(["--params", str(params_file)], 2)  # multi_worker, 64 = 2 x 32: fine


@pytest.mark.slow
@pytest.mark.timeout(2 * WAIT_S + 300)
def test_two_loopback_workers_resume_and_agree_with_one(
    smoke_params: Params, mnist_dir: Path, tmp_path: Path, reference_store: None
) -> None:
    params = _params(smoke_params, "multi_worker")
    params_file = _write(params, tmp_path / "params.yaml")
    cluster = tmp_path / "cluster"
    store = f"sqlite:///{tmp_path / 'cluster.db'}"  # the cluster's runs, apart from the reference's
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "DVC_ROOT": str(cluster)}
    args = stage_args("train", cluster, params=params_file, data=mnist_dir)
    checkpoints = cluster / "models" / "checkpoints"

    first = Launcher(args, env)
    try:  # Kill the non-chief once the chief saved epoch 1: the launcher stops the chief.
        first.wait_for(lambda: (checkpoints / "ckpt-8.index").exists(), WAIT_S, "checkpoint 8")
        pid = int(re.findall(r"worker 1: pid (\d+)", first.log("[launcher]"))[0])
        os.kill(pid, 9)
        assert first.wait(timeout=60) != 0, first.log()
    finally:
        first.kill()
    assert "worker 1 exited with -9: stopping the others" in first.log(), first.log()
    assert not (cluster / "models" / "generator.keras").exists(), "finished before the kill"

    second = Launcher(args, env)
    try:
        assert second.wait(timeout=WAIT_S) == 0, second.log()
    finally:
        second.kill()
    assert "resuming from" in second.log("[worker 0]"), second.log()
    assert "resuming from" in second.log("[worker 1]")  # from its copy of the chief's

    # One MLflow run (the chief's, continued by the rerun), none from worker 1.
    client = MlflowClient(store)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    run_file = json.loads((cluster / "models" / "mlflow_run.json").read_text())
    assert [run.info.run_id for run in runs] == [run_file["run_id"]]
    assert runs[0].info.status == "FINISHED"
    artifacts = cluster / "mlartifacts" / params.mlflow.experiment
    assert [path.name for path in artifacts.iterdir()] == [run_file["run_id"]]

    reference = tmp_path / "reference"  # one worker, one device, same global batch
    store = Store(f"sqlite:///{reference / 'mlflow.db'}", reference)
    expected = train(_params(smoke_params, "default"), mnist_dir, train_outputs(reference), store)
    actual = json.loads((cluster / "reports" / "train.json").read_text())
    assert actual["steps"] == expected["steps"] == STEPS
    for key in ("d_loss", "g_loss", "d_real", "d_fake"):
        assert actual[key] == pytest.approx(expected[key], abs=TOLERANCE), key
    want = keras.models.load_model(reference / "models" / "generator.keras")
    got = keras.models.load_model(cluster / "models" / "generator.keras")
    worst = max(
        float(np.abs(a - b).max())
        for a, b in zip(got.get_weights(), want.get_weights(), strict=True)
    )
    print(f"max |weight difference| after {STEPS} steps: {worst:.3g}")
    assert worst < TOLERANCE

    report = export_model(got, load_params(params_file), tmp_path / "generator.onnx")
    assert (tmp_path / "generator.onnx").is_file() and report["opset"] == params.export.opset
