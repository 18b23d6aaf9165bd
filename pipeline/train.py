"""GAN training: fast, deterministic, resumable, tracked in MLflow.

The shape follows the keras-io GAN examples: a ``GAN`` holds both nets and their optimizers,
and ``train_step`` returns a dict of named losses. What differs is speed: Keras' ``fit`` (or
a Python loop around a ``tf.function`` step) returns to Python after every batch, which on
small nets costs as much as the maths. Here ``train_block`` runs a whole epoch (or the steps
up to the next sample/checkpoint) inside one ``tf.function`` that pulls batches from a
``tf.data`` iterator, so Python wakes up once per block.

Determinism and resumption: one ``seed`` sets the weight init, the noise stream (a
``tf.random.Generator`` whose state is checkpointed) and each epoch's shuffle order (a pure
function of (seed, epoch), see ``pipeline.data.make_dataset``). A checkpoint therefore holds
everything the rest of the run depends on, and a resumed run ends bit-identical to an
uninterrupted one (on CPU, with op determinism).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import tensorflow as tf
from PIL import Image
from tqdm import tqdm

from pipeline import tracking
from pipeline.dataset import make_dataset
from pipeline.files import atomic_path, write_json
from pipeline.images import cycle_labels, sample_latents, tile, to_uint8, to_unit
from pipeline.losses import discriminator_loss, generator_loss, gradient_penalty
from pipeline.mnist import load_split
from pipeline.models import build_discriminator, build_generator, sample_noise
from pipeline.params import Params, TrainParams
from pipeline.stage import UserError

log = logging.getLogger(__name__)

METRICS = ("d_loss", "g_loss", "d_real", "d_fake")
HISTORY_COLUMNS = ("epoch", "step", *METRICS, "epoch_seconds", "images_per_s")
# The code that decides the weights: a checkpoint written by other code is not resumed.
SOURCES = ("train.py", "models.py", "losses.py", "dataset.py", "mnist.py", "images.py")


class TrainingDivergedError(UserError, RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterruptedError(RuntimeError):
    """SIGTERM/SIGINT arrived; a checkpoint was saved and a rerun resumes from it."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by signal {signum} at step {step}; rerun to resume")
        self.signum = signum


def pick_strategy(name: str) -> tf.distribute.Strategy:
    gpus = [device.name for device in tf.config.list_logical_devices("GPU")]
    if name == "mirrored" or (name == "auto" and len(gpus) > 1):
        # Without GPUs, mirror over the logical CPUs (one unless configured otherwise).
        cpus = [device.name for device in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(gpus or cpus)
    if name == "multi_worker":  # the cluster comes from $TF_CONFIG
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()  # one device: the GPU when there is one


class GAN:
    """Generator, discriminator, their Adam optimizers and the training noise stream."""

    def __init__(self, params: Params, strategy: tf.distribute.Strategy) -> None:
        self.model, self.loss, self.strategy = params.model, params.loss, strategy
        self.global_batch = params.train.batch_size
        with strategy.scope():
            self.generator = build_generator(params.model)
            self.discriminator = build_discriminator(params.model)
            self.g_opt = _adam(params.train, params.train.lr_g)
            self.d_opt = _adam(params.train, params.train.lr_d)
            # Built now, so a checkpoint restores into existing slots (no deferred restore).
            self.g_opt.build(self.generator.trainable_variables)
            self.d_opt.build(self.discriminator.trainable_variables)
            self.rng = tf.random.Generator.from_seed(params.seed)
        step_fn = tf.function(self.train_step, jit_compile=params.train.jit_compile)
        self._step = step_fn if params.train.jit_compile else self.train_step

    def _with_label(self, x: tf.Tensor, labels: tf.Tensor) -> Any:
        return [x, labels] if self.model.conditional else x

    def _mean(self, per_example: tf.Tensor) -> tf.Tensor:
        # Divide by the global batch: summed over replicas, this is the batch mean.
        return tf.nn.compute_average_loss(per_example, global_batch_size=self.global_batch)

    def train_step(self, real: tf.Tensor, labels: tf.Tensor) -> dict[str, tf.Tensor]:
        g, d, kind = self.generator, self.discriminator, self.loss.kind
        shape = [tf.shape(real)[0], self.model.latent_dim]
        for _ in range(self.loss.d_steps):  # critic steps per generator step (unrolled)
            z = sample_noise(self.model.noise, shape, self.rng)
            with tf.GradientTape() as tape:
                fake = g(self._with_label(z, labels), training=True)
                real_logits = d(self._with_label(real, labels), training=True)
                fake_logits = d(self._with_label(fake, labels), training=True)
                per_example = discriminator_loss(
                    kind, real_logits, fake_logits, self.loss.label_smoothing
                )
                if kind == "wgan_gp":
                    eps = self.rng.uniform([shape[0], 1, 1, 1])
                    critic = lambda x: d(self._with_label(x, labels), training=True)  # noqa: E731
                    penalty = gradient_penalty(critic, real, fake, eps)
                    per_example += self.loss.gp_weight * penalty
                d_loss = self._mean(per_example)
                scaled = self.d_opt.scale_loss(d_loss)  # loss scaling under mixed precision
            grads = tape.gradient(scaled, d.trainable_variables)
            self.d_opt.apply(grads, d.trainable_variables)
        z = sample_noise(self.model.noise, shape, self.rng)
        with tf.GradientTape() as tape:
            # D judges in inference mode here: its dropout regularises D's own updates, while
            # G learns from the whole discriminator.
            logits = d(self._with_label(g(self._with_label(z, labels), training=True), labels))
            g_loss = self._mean(generator_loss(kind, logits))
            scaled = self.g_opt.scale_loss(g_loss)
        grads = tape.gradient(scaled, g.trainable_variables)
        self.g_opt.apply(grads, g.trainable_variables)
        return {
            "d_loss": d_loss,
            "g_loss": g_loss,
            "d_real": self._mean(tf.reshape(tf.sigmoid(real_logits), [-1])),
            "d_fake": self._mean(tf.reshape(tf.sigmoid(fake_logits), [-1])),
        }

    @tf.function
    def train_block(self, iterator: Any, steps: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Up to ``steps`` steps in one graph: (sum of each metric, steps done). Stops at
        the first non-finite metric, so ``done < steps`` says the run diverged."""
        sums, done = tf.zeros([len(METRICS)]), tf.constant(0)
        for _ in tf.range(steps):
            per_replica = self.strategy.run(self._step, args=next(iterator))
            metrics = tf.stack(
                [self.strategy.reduce("SUM", per_replica[key], axis=None) for key in METRICS]
            )
            if not tf.reduce_all(tf.math.is_finite(metrics)):
                break
            sums += metrics
            done += 1
        return sums, done

    def sample(self, z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return self.generator(self._with_label(z, labels), training=False).numpy()


def _adam(train: TrainParams, lr: float) -> keras.optimizers.Optimizer:
    adam = keras.optimizers.Adam(lr, beta_1=train.beta1, beta_2=train.beta2)
    if keras.mixed_precision.global_policy().name == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(adam)
    return adam


def configure_devices(train: TrainParams) -> None:
    """Op determinism (bit-identical resume) on CPU; mixed precision only where it pays."""
    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    if on_gpu and train.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    elif train.mixed_precision:
        log.info("train.mixed_precision ignored: no GPU")
    if not on_gpu:  # on GPU deterministic kernels cost speed; a GPU run resumes, not bit-exactly
        tf.config.experimental.enable_op_determinism()


def checkpoint_digest(params: Params) -> str:
    """Params and training code: a checkpoint is resumed only when both are unchanged."""
    code = b"".join((Path(__file__).parent / name).read_bytes() for name in SOURCES)
    training = params.digest("seed", "data", "model", "loss", "train")
    return hashlib.sha256(training.encode() + code).hexdigest()[:16]


GRID_PAD = 2  # white gaps between the digits of a sample grid make them readable


def _save_grid(images: np.ndarray, output: str, path: Path) -> None:
    """[n*n, 28, 28, 1] in the training range -> one n x n PNG with white gaps."""
    pixels = to_uint8(to_unit(images[..., 0], output))
    grid = tile(pixels, round(len(pixels) ** 0.5), pad=GRID_PAD, fill=255)
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, "PNG")


def _save_model(model: keras.Model, path: Path) -> None:
    with atomic_path(path) as tmp:
        model.save(tmp)


@contextlib.contextmanager
def _stop_signals() -> Iterator[list[int]]:
    """Record SIGTERM/SIGINT instead of dying; the loop checkpoints and stops after the
    current block (signals reach Python only between blocks anyway)."""
    received: list[int] = []
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in handlers:
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    try:
        yield received
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _open_checkpoints(
    checkpoint: tf.train.Checkpoint, directory: Path, digest: str
) -> tuple[tf.train.CheckpointManager, str | None]:
    """Restore the latest checkpoint if it came from these params and code, else start
    fresh. Returns the manager and the MLflow run id to continue (None: a new run)."""
    stamp = directory / "params.json"
    saved = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if directory.exists() and saved.get("digest") != digest:
        log.warning(
            "checkpoints in %s are from other params or code (digest %s, now %s): starting fresh",
            directory,
            saved.get("digest"),
            digest,
        )
        shutil.rmtree(directory)
        saved = {}
    directory.mkdir(parents=True, exist_ok=True)
    manager = tf.train.CheckpointManager(checkpoint, str(directory), max_to_keep=2)
    if manager.latest_checkpoint is None:
        write_json(stamp, {"digest": digest, "run_id": None})
        return manager, None
    checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    log.info("resuming from %s", manager.latest_checkpoint)
    return manager, saved.get("run_id")


def train(params: Params, data_dir: Path, models_dir: Path, reports_dir: Path) -> dict[str, Any]:
    """Train, write the models, reports and ``mlflow_run.json``; returns the final metrics."""
    train_p, model_p = params.train, params.model
    configure_devices(train_p)
    keras.utils.set_random_seed(params.seed)
    strategy = pick_strategy(train_p.strategy)
    if train_p.batch_size % strategy.num_replicas_in_sync:
        raise ValueError(
            f"train.batch_size: got {train_p.batch_size}; must be a multiple of the "
            f"{strategy.num_replicas_in_sync} replicas of strategy {train_p.strategy!r}"
        )
    log.info("strategy %s with %d replicas", type(strategy).__name__, strategy.num_replicas_in_sync)
    images, labels = load_split(data_dir, "train")
    count = min(len(images), params.data.limit or len(images))
    if count < train_p.batch_size:
        raise ValueError(f"train.batch_size: got {train_p.batch_size}; at most {count} images")
    per_epoch = count // train_p.batch_size  # steps per epoch (full batches only)
    unit = per_epoch if train_p.epochs is not None else 1  # steps per unit of the length
    total = (train_p.epochs or 0) * per_epoch or train_p.steps
    sample_every, checkpoint_every = train_p.sample_every * unit, train_p.checkpoint_every * unit

    gan = GAN(params, strategy)
    step = tf.Variable(0, dtype=tf.int64)
    epoch_sums = tf.Variable(tf.zeros([len(METRICS) + 2], tf.float64))  # + steps, seconds
    history = tf.Variable("[]")  # JSON rows: saved with the weights they describe
    checkpoint = tf.train.Checkpoint(
        generator=gan.generator,
        discriminator=gan.discriminator,
        g_opt=gan.g_opt,
        d_opt=gan.d_opt,
        rng=gan.rng,
        step=step,
        epoch_sums=epoch_sums,
        history=history,
    )
    ckpt_dir, samples_dir = models_dir / "checkpoints", models_dir / "checkpoints" / "samples"
    manager, run_id = _open_checkpoints(checkpoint, ckpt_dir, checkpoint_digest(params))
    samples_dir.mkdir(exist_ok=True)
    rows: list[dict[str, float]] = json.loads(history.numpy())
    side = train_p.sample_grid
    fixed_z = sample_latents(model_p.noise, side * side, model_p.latent_dim, params.seed)
    fixed_labels = cycle_labels(side * side).astype(np.int32)

    start = int(step.numpy())  # > 0 when resuming
    dataset = make_dataset(
        images, labels, train_p.batch_size, model_p.output, params.seed, params.data.limit,
        first_epoch=start // per_epoch, epochs=None, skip_batches=start % per_epoch,
    )  # fmt: skip
    iterator = iter(strategy.experimental_distribute_dataset(dataset))

    run_name = os.environ.get("DVC_EXP_NAME") or f"{params.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = {**tracking.provenance_tags(), "preset": params.preset}
    with (
        tracking.start_run(params.mlflow.experiment, run_name, tags, run_id) as run,
        _stop_signals() as stop,
        tqdm(total=total, initial=start, unit="step", disable=not sys.stderr.isatty()) as bar,
    ):
        write_json(
            ckpt_dir / "params.json",
            {"digest": checkpoint_digest(params), "run_id": run.info.run_id},
        )
        mlflow.log_params(params.flat())  # again on resume: same values, allowed
        log.info("training %d steps (%d per epoch) from step %d", total, per_epoch, start)
        while (s := int(step.numpy())) < total:
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
            step.assign(s)
            epoch_sums.assign_add([*sums.numpy(), block, seconds])
            bar.update(block)
            if s % per_epoch == 0 or s == total:
                rows.append(_epoch_row(epoch_sums, s, per_epoch, train_p.batch_size))
                history.assign(json.dumps(rows))
                mlflow.log_metrics(
                    {k: rows[-1][k] for k in HISTORY_COLUMNS[2:]}, step=math.ceil(rows[-1]["epoch"])
                )
                bar.set_postfix({k: f"{rows[-1][k]:.3f}" for k in METRICS})
            if s % sample_every == 0 or s == total:
                grid = samples_dir / f"step_{s:07d}.png"
                _save_grid(gan.sample(fixed_z, fixed_labels), model_p.output, grid)
                mlflow.log_artifact(str(grid), "samples")
            if s % checkpoint_every == 0 or s == total or stop:
                manager.save(checkpoint_number=s)
            if stop:
                mlflow.end_run("KILLED")
                raise TrainingInterruptedError(stop[0], s)
        return _write_outputs(gan, rows, run, samples_dir, models_dir, reports_dir)


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
    run: mlflow.ActiveRun,
    samples_dir: Path,
    models_dir: Path,
    reports_dir: Path,
) -> dict[str, Any]:
    """Models, history, metrics and sample grids where DVC and MLflow expect them."""
    models_dir.mkdir(parents=True, exist_ok=True)
    _save_model(gan.generator, models_dir / "generator.keras")
    _save_model(gan.discriminator, models_dir / "discriminator.keras")
    reports_dir.mkdir(parents=True, exist_ok=True)
    history_csv = reports_dir / "train_history.csv"
    with history_csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    # Grids live beside the checkpoints (they persist across a resume); reports gets a copy.
    shutil.rmtree(reports_dir / "samples", ignore_errors=True)
    shutil.copytree(samples_dir, reports_dir / "samples")
    last = rows[-1]
    metrics = {key: last[key] for key in METRICS}
    metrics.update(
        epochs=last["epoch"],
        steps=last["step"],
        images_per_s=float(np.median([row["images_per_s"] for row in rows])),
        train_seconds=float(sum(row["epoch_seconds"] for row in rows)),
    )
    write_json(reports_dir / "train.json", metrics)
    mlflow.log_artifact(str(history_csv))
    mlflow.log_artifact(str(reports_dir / "train.json"))
    write_json(models_dir / "mlflow_run.json", tracking.run_info(run))
    return metrics
