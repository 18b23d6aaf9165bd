"""Faults met by live processes, made to happen for real: two `dvc repro` at once in one
workspace, and SIGTERM to the service while it is busy."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.core.params import apply_overrides
from pipeline.experiments.presets import load_preset

from helpers import Dvc

pytestmark = pytest.mark.slow

DVC_LOCK_MESSAGES = ("Unable to acquire lock", "is busy, it is being blocked by")


def test_second_dvc_repro_stops_at_once_and_the_first_finishes(
    repo_copy: Path, dvc: Dvc, raw_params: dict[str, Any], shared_mnist: Path, tmp_path: Path
) -> None:
    """A second `dvc repro train` in a workspace whose first one is training stops within
    seconds with DVC's lock message, and touches nothing: the first one finishes and its
    outputs are what dvc.lock records."""
    smoke = apply_overrides(raw_params, {**load_preset("smoke"), "train.epochs": 12})
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(smoke, sort_keys=False))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "MNIST_MIRROR": str(shared_mnist),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    command = ["dvc", "repro", "train"]
    first = subprocess.Popen(
        command, cwd=repo_copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        stamp = repo_copy / "models" / "checkpoints" / "params.json"  # training has begun
        deadline = time.monotonic() + 120
        while not stamp.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None and stamp.exists(), "the first repro did not start training"

        began = time.monotonic()
        second = subprocess.run(
            command, cwd=repo_copy, env=env, capture_output=True, text=True, timeout=60
        )
        took = time.monotonic() - began
        assert first.poll() is None, "the first repro ended before the second was refused"
        said = second.stdout + second.stderr
        assert second.returncode != 0 and any(m in said for m in DVC_LOCK_MESSAGES), said
        assert took < 20, f"the second repro took {took:.1f} s to stop"

        log = first.communicate(timeout=300)[0]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=30)
    assert first.returncode == 0, log
    assert "Running stage 'train'" in log
    status = dvc(repo_copy, "status", "train", env=env).stdout
    assert "up to date" in status, status
    history = (repo_copy / "reports" / "train_history.csv").read_text().splitlines()
    assert len(history) == 1 + 12
