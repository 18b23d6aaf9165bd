"""Faults a team meets, made to happen for real: a torn checkpoint, a full disk. Nothing is
lost, and each says so in one line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.core.files import DiskFullError
from pipeline.core.params import Params
from pipeline.tracking.runs import Store
from pipeline.training.train import train

from helpers import fill, small_disk, train_outputs, with_train

pytestmark = pytest.mark.slow


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
    params = with_train(smoke_params, epochs=3, checkpoint_every=1)  # ckpt-16 and ckpt-24 kept
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


def test_full_disk_while_checkpointing_then_resume(
    smoke_params: Params, mnist_dir: Path, tmp_path: Path, mlflow_store: str, caplog: Any
) -> None:
    """The disk fills while ckpt-16 is written: one line names it and the space left, none
    of its files stay, and once space is freed the rerun resumes from ckpt-8 and ends on the
    uninterrupted run's weights. Only the outputs are on the small disk."""
    params = with_train(smoke_params, epochs=3, checkpoint_every=1)
    store = Store(mlflow_store, tmp_path)
    reference = train_outputs(tmp_path / "reference")
    train(params, mnist_dir, reference, store)

    with small_disk(tmp_path / "disk", "4m") as disk:
        out, ckpts = train_outputs(disk), disk / "models" / "checkpoints"
        ballast = fill(disk, leave=1100 * 1024)  # ckpt-8 fits (~0.7 MB), ckpt-16 does not
        with pytest.raises(DiskFullError) as full:
            train(params, mnist_dir, out, store)
        message = str(full.value)
        assert "\n" not in message and " free of 4.0 MiB" in message
        assert message.startswith(f"no space left on device writing {ckpts / 'ckpt-16'} (")
        assert not list(ckpts.glob("ckpt-16*"))  # nothing half-written to trust
        assert tf.train.latest_checkpoint(ckpts) == str(ckpts / "ckpt-8")
        assert not out.generator.exists()

        ballast.unlink()
        caplog.set_level(logging.INFO, logger="pipeline.training.checkpoints")
        train(params, mnist_dir, out, store)
        assert f"resuming from {ckpts / 'ckpt-8'}" in caplog.text
        assert "is torn" not in caplog.text
        _assert_same(_weights(out.generator), _weights(reference.generator))


def test_full_disk_while_exporting_leaves_no_onnx(smoke_params: Params, tmp_path: Path) -> None:
    """The ONNX file does not fit: one line names it and the space left, and neither it nor
    its temp file stays; with space freed the same export succeeds."""
    from pipeline.inference.generator import Generator
    from pipeline.training.export import export_model
    from pipeline.training.models import build_generator

    keras.utils.set_random_seed(0)
    generator = build_generator(smoke_params.model)
    with small_disk(tmp_path / "disk", "256k") as disk:
        onnx_path = disk / "models" / "generator.onnx"
        ballast = fill(disk, leave=16 * 1024)
        with pytest.raises(DiskFullError) as full:
            export_model(generator, smoke_params, onnx_path, run_id="test-run")
        message = str(full.value)
        assert "\n" not in message
        assert message.startswith(f"no space left on device writing {onnx_path} (")
        assert list(onnx_path.parent.iterdir()) == []  # no generator.onnx, no .partial- file

        ballast.unlink()
        export_model(generator, smoke_params, onnx_path, run_id="test-run")
        assert Generator(onnx_path).generate(2, seed=0).shape[0] == 2
