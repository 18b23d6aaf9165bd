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
from typing import Any

import tensorflow as tf

from pipeline.core.files import DiskFullError, disk_space, write_json
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
    "tracking/credentials.py",
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
    """Restore the newest whole checkpoint if it came from these params and code, else start
    fresh. Returns the manager and the MLflow run id to continue (None: a new run). A torn
    checkpoint (files cut short or zeroed by a power loss) is named in a warning, removed,
    and the one before it is used: never resume from garbage."""
    stamp = directory / "params.json"
    saved = _read_stamp(stamp)
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
    _drop_torn(directory)
    manager = tf.train.CheckpointManager(checkpoint, str(directory), max_to_keep=2)
    if manager.latest_checkpoint is None:
        write_stamp(directory, digest, None)
        return manager, None
    checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    log.info("resuming from %s", manager.latest_checkpoint)
    return manager, saved.get("run_id")


def _read_stamp(stamp: Path) -> dict[str, Any]:
    """params.json, or {} when absent or unreadable (then the checkpoints start fresh)."""
    try:
        return dict(json.loads(stamp.read_text())) if stamp.is_file() else {}
    except (ValueError, UnicodeDecodeError):
        return {}


def _drop_torn(directory: Path) -> None:
    """Check every checkpoint on disk, newest first, and remove the torn ones; then rewrite
    the manager's ``checkpoint`` file from what is left. The files on disk are the truth:
    that text file may itself be zeroed or cut (TF then lists nothing, or fails)."""
    state_file = directory / "checkpoint"
    numbers = sorted(
        (int(p.name[5:-6]) for p in directory.glob("ckpt-*.index") if p.name[5:-6].isdigit()),
        reverse=True,
    )
    problems = {n: _unreadable(str(directory / f"ckpt-{n}")) for n in numbers}
    whole = [str(directory / f"ckpt-{n}") for n in numbers if problems[n] is None]
    for number, problem in problems.items():
        if problem is None:
            continue
        older = [f"ckpt-{n}" for n in numbers if n < number and problems[n] is None]
        log.warning(
            "checkpoint %s is torn (%s): removing it; %s",
            directory / f"ckpt-{number}",
            problem,
            f"resuming from {older[0]}" if older else "no whole one before it: starting fresh",
        )
        for path in directory.glob(f"ckpt-{number}.*"):
            path.unlink()
    try:
        state = tf.train.get_checkpoint_state(str(directory))
        listed = None if state is None else list(state.all_model_checkpoint_paths)
    except ValueError:  # an empty or garbled file
        listed = None
    kept = whole[::-1]  # oldest first, as the manager lists them
    if listed is None and kept:
        log.warning("%s is unreadable: rewriting it from the checkpoints on disk", state_file)
    if [str(directory / Path(p).name) for p in listed or []] != kept:
        if kept:
            tf.compat.v1.train.update_checkpoint_state(
                str(directory), kept[-1], all_model_checkpoint_paths=kept
            )
        else:
            state_file.unlink(missing_ok=True)


def _unreadable(prefix: str) -> str | None:
    """Why the checkpoint at ``prefix`` cannot be read back whole, or None. Reads every
    tensor: TF checks each one's CRC32C, so zeroed or cut bytes show up here."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        for key in reader.get_variable_to_shape_map():
            reader.get_tensor(key)
    except (tf.errors.OpError, ValueError, IndexError, OSError) as error:
        lines = str(error).strip().splitlines() or [type(error).__name__]
        return lines[0][:200]
    return None


def save_checkpoint(manager: tf.train.CheckpointManager, directory: Path, step: int) -> None:
    """Save ``ckpt-<step>``; on a full disk, remove what TF half-wrote and say so in one line
    (DiskFullError). The ``checkpoint`` list still names the last whole one, which the rerun
    resumes from once there is space."""
    try:
        with disk_space(directory / f"ckpt-{step}"):
            manager.save(checkpoint_number=step)
    except DiskFullError:
        for path in directory.glob(f"ckpt-{step}[._]*"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        raise


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
