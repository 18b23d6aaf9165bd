"""GAN training: the loop that runs the GAN in blocks, tracks it in MLflow and writes the
outputs DVC expects. Fast, deterministic and resumable thanks to its parts:
``pipeline.training.gan`` (the nets, the step, one ``tf.function`` per block) and
``pipeline.training.checkpoints`` (what a checkpoint holds and when it is resumed).

A block runs up to the next epoch end, sample grid or checkpoint, whichever comes first;
Python then logs, samples and checkpoints, and checks for stop signals.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from pipeline.core.cpu import isa_class
from pipeline.core.errors import UserError
from pipeline.core.files import atomic_path, write_json
from pipeline.core.images import GRID_PAD, cycle_labels, sample_latents, tile, to_uint8, to_unit
from pipeline.core.params import Params, TrainParams
from pipeline.core.png import encode_gray
from pipeline.data.mnist import load_split
from pipeline.tracking import runs
from pipeline.tracking.run_logger import RunLogger
from pipeline.training.checkpoints import (
    checkpoint_digest,
    new_checkpoint,
    open_checkpoints,
    save_checkpoint,
    stop_signals,
    write_stamp,
)
from pipeline.training.distribute import input_batches, set_up, steps_per_epoch
from pipeline.training.gan import GAN, METRICS

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "step", *METRICS, "epoch_seconds", "images_per_s")
RAW_SAMPLES = "raw"  # with train.ema_decay > 0: the raw generator's grids, in this subfolder


class TrainingDivergedError(UserError, RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterruptedError(RuntimeError):
    """SIGTERM/SIGINT arrived; a checkpoint was saved and a rerun resumes from it."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by signal {signum} at step {step}; rerun to resume")
        self.signum = signum


def _length(train: TrainParams, per_epoch: int) -> tuple[int, int]:
    """(total steps, steps per unit of sample_every/checkpoint_every): epochs or steps."""
    if train.epochs is not None:
        return train.epochs * per_epoch, per_epoch
    assert train.steps is not None  # TrainParams holds exactly one of epochs/steps
    return train.steps, 1


@dataclass(frozen=True)
class Outputs:
    """Where training writes. dvc.yaml passes every path (it is the one map of files), so
    no file name is written down here."""

    generator: Path  # .keras
    discriminator: Path  # .keras
    checkpoints: Path  # a directory that persists between runs (resume)
    run_file: Path  # JSON naming the MLflow run, for the stages that log into it later
    samples: Path  # a directory of fixed-noise grids, step_<step>.png
    history: Path  # CSV, one row per epoch
    metrics: Path  # JSON, the final losses and timings


def train(params: Params, data_dir: Path, out: Outputs, store: runs.Store) -> dict[str, Any]:
    """Train and write ``out``, tracked in ``store``; returns the final metrics. In a
    multi-worker cluster (``train.strategy: multi_worker``, ``$TF_CONFIG``) only the chief
    writes ``out`` and logs to ``store``."""
    with set_up(params) as strategy:
        if strategy.extended.should_checkpoint:  # the chief, or the only worker
            return _train(params, strategy, data_dir, out, store)
        with _scratch(out) as (scratch, throwaway):
            return _train(params, strategy, data_dir, scratch, throwaway)


@contextlib.contextmanager
def _scratch(out: Outputs) -> Iterator[tuple[Outputs, runs.Store]]:
    """Where a non-chief worker writes: TF's pattern for MultiWorkerMirroredStrategy, whose
    workers must all save (weights and checkpoints) though only the chief's files count. A
    temp folder, deleted afterwards, starting with a copy of the chief's checkpoints so every
    worker resumes from the same step."""
    with tempfile.TemporaryDirectory(prefix="worker-") as tmp:
        root = Path(tmp)
        scratch = Outputs(**{f: root / getattr(out, f).name for f in Outputs.__dataclass_fields__})
        # Safe to copy now: the chief opens its checkpoints only after every worker built
        # the GAN (the strategy broadcasts the initial weights), which comes after this.
        if out.checkpoints.is_dir():
            shutil.copytree(out.checkpoints, scratch.checkpoints)
        # Its MLflow calls go to a throwaway store: the pipeline's store gets the chief's run.
        yield scratch, runs.Store(f"sqlite:///{root / 'mlflow.db'}", root)


def _train(
    params: Params,
    strategy: tf.distribute.Strategy,
    data_dir: Path,
    out: Outputs,
    store: runs.Store,
) -> dict[str, Any]:
    train_p, model_p = params.train, params.model
    images, labels = load_split(data_dir, "train")
    per_epoch = steps_per_epoch(params, len(images))  # full batches only
    total, unit = _length(train_p, per_epoch)
    sample_every, checkpoint_every = train_p.sample_every * unit, train_p.checkpoint_every * unit

    gan = GAN(params, strategy, total)
    checkpoint, state = new_checkpoint(gan, len(METRICS))
    # Grids live beside the checkpoints: they persist across a resume, like the weights.
    ckpt_dir, samples_dir = out.checkpoints, out.checkpoints / "samples"
    digest = checkpoint_digest(params)
    manager, run_id = open_checkpoints(checkpoint, ckpt_dir, digest)
    samples_dir.mkdir(exist_ok=True)
    if gan.generator_ema is not None:
        (samples_dir / RAW_SAMPLES).mkdir(exist_ok=True)
    rows: list[dict[str, float]] = json.loads(state.history.numpy())
    side = train_p.sample_grid
    fixed_z = sample_latents(model_p.noise, side * side, model_p.latent_dim, params.seed)
    fixed_labels = cycle_labels(side * side).astype(np.int32)

    start = int(state.step.numpy())  # > 0 when resuming
    iterator = input_batches(params, strategy, images, labels, start)

    run_name = os.environ.get("DVC_EXP_NAME") or f"{params.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    # Where the numbers came from: what train.mixed_precision came to on this machine
    # (distribute.py) and the CPU's ISA class; recorded in the run, train.json, the run file
    # (export copies them into the ONNX model, evaluate into metrics.json).
    machine = {
        "compute_dtype": keras.mixed_precision.global_policy().compute_dtype,
        "cpu_isa": isa_class(),
    }
    tags = {**runs.provenance_tags(), "preset": params.preset, **machine}
    with (
        runs.start_run(store, params.mlflow.experiment, run_name, tags, run_id) as run,
        RunLogger(run, store.uri) as logger,  # per-epoch logging that outlives a server restart
        stop_signals() as stop,
        tqdm(total=total, initial=start, unit="step", disable=not sys.stderr.isatty()) as bar,
    ):
        write_stamp(ckpt_dir, digest, run.info.run_id)
        mlflow.log_params(params.flat())  # again on resume: same values, allowed
        log.info("training %d steps (%d per epoch) from step %d", total, per_epoch, start)
        while (s := int(state.step.numpy())) < total:
            block = min(per_epoch - s % per_epoch, sample_every - s % sample_every,
                        checkpoint_every - s % checkpoint_every, total - s)  # fmt: skip
            began = time.perf_counter()
            sums, done = gan.train_block(iterator, tf.constant(block))
            seconds = time.perf_counter() - began
            if int(done) < block:
                bad = s + int(done) + 1
                raise TrainingDivergedError(
                    f"non-finite loss at epoch {(bad - 1) // per_epoch + 1}, step {bad}; the last "
                    f"good checkpoint stays in {ckpt_dir} (try a lower train.lr_d / train.lr_g)"
                )
            s += block
            state.step.assign(s)
            state.epoch_sums.assign_add([*sums.numpy(), block, seconds])
            bar.update(block)
            if s % per_epoch == 0 or s == total:
                rows.append(_epoch_row(state.epoch_sums, s, per_epoch, train_p.batch_size))
                state.history.assign(json.dumps(rows))
                logger.log_metrics(
                    {k: rows[-1][k] for k in HISTORY_COLUMNS[2:]}, step=math.ceil(rows[-1]["epoch"])
                )
                bar.set_postfix({k: f"{rows[-1][k]:.3f}" for k in METRICS})
            if s % sample_every == 0 or s == total:
                grid = samples_dir / f"step_{s:07d}.png"  # what ships: the EMA G when on
                _save_grid(gan.sample(fixed_z, fixed_labels), model_p.output, grid)
                logger.log_artifact(grid, "samples")
                if gan.generator_ema is not None:  # the raw G beside it, to see what EMA buys
                    raw = samples_dir / RAW_SAMPLES / grid.name
                    _save_grid(gan.sample(fixed_z, fixed_labels, raw=True), model_p.output, raw)
            if s % checkpoint_every == 0 or s == total or stop:
                save_checkpoint(manager, ckpt_dir, s)
            if stop:
                mlflow.end_run("KILLED")
                raise TrainingInterruptedError(stop[0], s)
        return _write_outputs(gan, rows, logger, samples_dir, out, store, machine)


def _save_grid(images: np.ndarray, output: str, path: Path) -> None:
    """[n*n, 28, 28, 1] in the training range -> one n x n PNG with white gaps."""
    pixels = to_uint8(to_unit(images[..., 0], output))
    grid = tile(pixels, round(len(pixels) ** 0.5), pad=GRID_PAD, fill=255)
    with atomic_path(path) as tmp:
        tmp.write_bytes(encode_gray(grid))


def _save_model(model: keras.Model, path: Path) -> None:
    with atomic_path(path) as tmp:
        model.save(tmp)


def _epoch_row(sums: tf.Variable, step: int, per_epoch: int, batch: int) -> dict[str, float]:
    """One history row from the epoch's running sums (and reset them). The last row of a
    run measured in steps may cover part of an epoch: its ``epoch`` is then fractional."""
    totals = sums.numpy()
    steps, seconds = totals[len(METRICS)], totals[len(METRICS) + 1]
    sums.assign(tf.zeros_like(sums))
    epoch = step // per_epoch if step % per_epoch == 0 else round(step / per_epoch, 3)
    row: dict[str, float] = {"epoch": epoch, "step": step}
    row.update({key: float(value / steps) for key, value in zip(METRICS, totals, strict=False)})
    row.update(epoch_seconds=float(seconds), images_per_s=float(steps * batch / seconds))
    return row


def _write_outputs(
    gan: GAN,
    rows: list[dict[str, float]],
    logger: RunLogger,
    samples_dir: Path,
    out: Outputs,
    store: runs.Store,
    machine: dict[str, str],
) -> dict[str, Any]:
    """Models, history, metrics and sample grids where DVC and MLflow expect them."""
    _save_model(gan.shipped, out.generator)  # the EMA weights when train.ema_decay > 0
    _save_model(gan.discriminator, out.discriminator)
    with atomic_path(out.history) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    shutil.rmtree(out.samples, ignore_errors=True)
    shutil.copytree(samples_dir, out.samples)
    last = rows[-1]
    metrics: dict[str, Any] = {key: last[key] for key in METRICS}
    metrics.update(
        epochs=last["epoch"],
        steps=last["step"],
        images_per_s=float(np.median([row["images_per_s"] for row in rows])),
        train_seconds=float(sum(row["epoch_seconds"] for row in rows)),
        **machine,
    )
    write_json(out.metrics, metrics)
    logger.log_artifact(out.history)
    logger.log_artifact(out.metrics)
    write_json(out.run_file, {**runs.run_info(logger.run, store), **machine})
    return metrics
