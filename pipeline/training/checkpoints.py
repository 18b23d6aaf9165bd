"""Resumable training: what a checkpoint holds, when it may be resumed, and stop signals.

A checkpoint holds everything the rest of a run depends on (both nets, both optimizers, the
noise stream, the step, the running sums of the current epoch and the history so far), so
a rerun continues where the last one stopped. It is resumed only when it came from the same
params and the same weight-deciding code: ``checkpoint_digest`` hashes both, and
``models/checkpoints/params.json`` records it beside the MLflow run to continue.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from pipeline.core.files import write_json
from pipeline.core.params import Params
from pipeline.training.gan import GAN

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parent.parent  # pipeline/

# The code that decides the weights (paths under pipeline/): a checkpoint written by
# other code is not resumed. gan.py holds the step; distribute.py the seeding, the devices
# (with cpu.py: thread pools, bfloat16) and where a resumed input stream starts;
# optimizers/models/losses the maths; images/dataset/mnist the pixels fed in. Every other
# module the train stage runs is BOOKKEEPING, and tests/test_layout.py checks that the two
# lists cover the stage's whole import graph, so a new import has to be placed.
SOURCES = (
    "training/gan.py",
    "training/distribute.py",
    "core/cpu.py",
    "training/models.py",
    "training/losses.py",
    "training/optimizers.py",
    "core/images.py",
    "training/dataset.py",
    "data/mnist.py",
)
# train.py only decides where blocks end (a block boundary changes no step: the SIGKILL
# resume test checks it), what is logged and where outputs go; this module stores and
# restores state and computes none; the rest validate, log and write files.
BOOKKEEPING = (
    "training/train.py",
    "training/checkpoints.py",
    "core/params.py",
    "core/stage.py",
    "core/errors.py",
    "tracking/runs.py",
    "tracking/run_logger.py",
    "core/files.py",
    "core/png.py",  # writes the sample grids' files
)


def checkpoint_digest(params: Params) -> str:
    """Params and training code: a checkpoint is resumed only when both are unchanged."""
    code = b"".join((PACKAGE / name).read_bytes() for name in SOURCES)
    training = params.digest("seed", "data", "model", "loss", "train")
    return hashlib.sha256(training.encode() + code).hexdigest()[:16]


@dataclass
class LoopState:
    """The loop's own part of a checkpoint, beside the GAN's."""

    step: tf.Variable  # steps done
    epoch_sums: tf.Variable  # the current epoch's metric sums, + steps and seconds
    history: tf.Variable  # JSON rows: saved with the weights they describe


def new_checkpoint(gan: GAN, metrics: int) -> tuple[tf.train.Checkpoint, LoopState]:
    """The checkpoint of a run; its object names are the keys of every saved checkpoint."""
    state = LoopState(
        step=tf.Variable(0, dtype=tf.int64),
        epoch_sums=tf.Variable(tf.zeros([metrics + 2], tf.float64)),
        history=tf.Variable("[]"),
    )
    objects = dict(
        generator=gan.generator,
        discriminator=gan.discriminator,
        g_opt=gan.g_opt,
        d_opt=gan.d_opt,
        rng=gan.rng,
        step=state.step,
        epoch_sums=state.epoch_sums,
        history=state.history,
    )
    if gan.generator_ema is not None:  # a key of its own; absent when off, as before
        objects["generator_ema"] = gan.generator_ema
    return tf.train.Checkpoint(**objects), state


def write_stamp(directory: Path, digest: str, run_id: str | None) -> None:
    """Record which params and code wrote the checkpoints, and the MLflow run they log to."""
    write_json(directory / "params.json", {"digest": digest, "run_id": run_id})


def open_checkpoints(
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
        write_stamp(directory, digest, None)
        return manager, None
    checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    log.info("resuming from %s", manager.latest_checkpoint)
    return manager, saved.get("run_id")


@contextlib.contextmanager
def stop_signals() -> Iterator[list[int]]:
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
