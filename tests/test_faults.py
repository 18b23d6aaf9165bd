"""Faults a team meets, made to happen for real: a torn checkpoint, a full disk. Nothing is
lost, and each says so in one line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from pipeline.core.params import Params
from pipeline.tracking.runs import Store
from pipeline.training.train import train

from helpers import train_outputs

pytestmark = pytest.mark.slow


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # mlartifacts/ lands in tmp, not the repo
    return uri


def _params(smoke: Params, **train: Any) -> Params:
    return smoke.model_copy(update={"train": smoke.train.model_copy(update=train)})


def _weights(path: Path) -> list[np.ndarray]:
    return list(keras.models.load_model(path).get_weights())


def _assert_same(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    for actual, expected in zip(got, want, strict=True):
        np.testing.assert_array_equal(actual, expected)  # bit-identical


def _truncate(path: Path) -> None:
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def _zero(path: Path) -> None:
    path.write_bytes(b"\0" * path.stat().st_size)


@pytest.mark.parametrize("tear", ["data cut, list zeroed", "index zeroed", "both torn"])
def test_torn_checkpoint_is_named_and_skipped(
    tear: str,
    smoke_params: Params,
    mnist_dir: Path,
    tmp_path: Path,
    mlflow_store: str,
    caplog: Any,
) -> None:
    """A power loss leaves the newest checkpoint's files cut short or zeroed: the rerun
    names it in one line and resumes from the one before (or starts fresh without one),
    and still ends on the uninterrupted run's weights."""
    params = _params(smoke_params, epochs=3, checkpoint_every=1)  # ckpt-16 and ckpt-24 kept
    out, ckpts = train_outputs(tmp_path), tmp_path / "models" / "checkpoints"
    store = Store(mlflow_store, tmp_path)
    train(params, mnist_dir, out, store)
    reference = _weights(out.generator)
    out.generator.unlink()

    newest = ckpts / "ckpt-24"
    if tear == "data cut, list zeroed":
        _truncate(next(ckpts.glob("ckpt-24.data-*")))
        _zero(ckpts / "checkpoint")
    elif tear == "index zeroed":
        _zero(newest.with_suffix(".index"))
    else:
        _zero(newest.with_suffix(".index"))
        _truncate(next(ckpts.glob("ckpt-16.data-*")))

    caplog.clear()
    caplog.set_level(logging.INFO, logger="pipeline.training.checkpoints")
    train(params, mnist_dir, out, store)
    torn = [r.getMessage() for r in caplog.records if "is torn" in r.getMessage()]
    assert torn and all("\n" not in line for line in torn), caplog.text
    assert f"checkpoint {newest} is torn" in torn[0]
    if tear == "both torn":
        assert "starting fresh" in torn[-1] and "resuming from" not in caplog.text
    else:
        assert "resuming from ckpt-16" in torn[0]
        assert f"resuming from {ckpts / 'ckpt-16'}" in caplog.text
    if tear == "data cut, list zeroed":
        assert "checkpoint is unreadable: rewriting it" in caplog.text
    _assert_same(_weights(out.generator), reference)
    assert sorted(p.name for p in ckpts.glob("ckpt-*.index")) == ["ckpt-16.index", "ckpt-24.index"]
