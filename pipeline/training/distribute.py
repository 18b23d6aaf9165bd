"""Where training runs, set up before any weight exists: threads and op determinism, the
seed, the ``tf.distribute`` strategy, and the input stream a (possibly resumed) run feeds it.

Part of what decides the weights (thread pools, the order of the batches, which rows each
replica takes), so it is hashed into the checkpoint digest
(``pipeline.training.checkpoints.SOURCES``) like ``pipeline.training.gan``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from pipeline.core import cpu
from pipeline.core.errors import UserError
from pipeline.core.params import Params, TrainParams
from pipeline.training.dataset import make_dataset
from pipeline.training.models import dtype_policy, minibatch_block

log = logging.getLogger(__name__)


def configure_devices(train: TrainParams) -> None:
    """Threads, op determinism (bit-identical resume) and mixed precision, before TensorFlow's
    runtime starts."""
    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    policy = "float32"
    if train.mixed_precision:
        # The weights stay float32; layers compute in half precision (the losses, the
        # image and the logits in float32). float16 needs loss scaling
        # (pipeline.training.optimizers), bfloat16, with float32's range, does not.
        if on_gpu:
            policy = "mixed_float16"
        elif cpu.native_bfloat16():
            policy = "mixed_bfloat16"
        else:
            log.info("train.mixed_precision ignored: no GPU and no native bfloat16 on this CPU")
    keras.mixed_precision.set_global_policy(policy)
    if on_gpu:  # deterministic GPU kernels cost speed; a GPU run resumes, not bit-exactly
        return
    tf.config.experimental.enable_op_determinism()
    set_thread_pools(train, cpu.cores())


class ThreadPoolsFixedError(UserError, RuntimeError):
    """TensorFlow already runs in this process with other thread pools than training plans:
    they decide how reductions split, so its numbers would differ from a fresh process'."""


def thread_pools(train: TrainParams, cores: int) -> tuple[int, int]:
    """(intra-op, inter-op) threads a CPU training runs with; 0 leaves TensorFlow's default.
    With several shards, the shards are independent subgraphs: TF's inter-op threads run
    them on different cores, one thread per op. Ops this small gain little from two threads
    each, while the hand-offs between threads cost more than the maths."""
    if train.shards == 1:
        return 0, 0
    return max(1, cores // train.shards), min(cores, train.shards)


def set_thread_pools(train: TrainParams, cores: int) -> None:
    """Fix TensorFlow's pools at :func:`thread_pools`, or refuse in one line where this
    process already started TensorFlow with others (pools are fixed once it starts)."""
    intra, inter = thread_pools(train, cores)
    try:  # each setter is a no-op where the value is already the one asked for
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:
        have = (
            tf.config.threading.get_intra_op_parallelism_threads(),
            tf.config.threading.get_inter_op_parallelism_threads(),
        )
        raise ThreadPoolsFixedError(
            f"train.shards: {train.shards} on {cores} cores trains with TensorFlow thread pools "
            f"(intra-op, inter-op) = {(intra, inter)}, but this process already started "
            f"TensorFlow with {have} (0: its default), so its numbers would differ from a "
            "fresh process': train in a fresh process (python -m stages.train, dvc repro)"
        ) from None


def pick_strategy(name: str) -> tf.distribute.Strategy:
    if name == "multi_worker":  # the cluster comes from $TF_CONFIG
        # First: it sets up collective ops, which must happen before TensorFlow's runtime
        # starts (listing logical devices starts it).
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = [device.name for device in tf.config.list_logical_devices("GPU")]
    if name == "mirrored" or (name == "auto" and len(gpus) > 1):
        # Without GPUs, mirror over the logical CPUs (one unless configured otherwise).
        cpus = [device.name for device in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(gpus or cpus)
    return tf.distribute.get_strategy()  # one device: the GPU when there is one


@contextlib.contextmanager
def set_up(params: Params) -> Iterator[tf.distribute.Strategy]:
    """Devices, then the seed, then the strategy, in this order: the seed must come after the
    device policy and before any weight exists. Once per process, before ``GAN``. On exit
    the process' mixed-precision policy is back: nets built later in this process (a test, a
    notebook) are float32 again."""
    train = params.train
    with dtype_policy():  # configure_devices sets train.mixed_precision's
        configure_devices(train)
        keras.utils.set_random_seed(params.seed)
        strategy = pick_strategy(train.strategy)
        parts = strategy.num_replicas_in_sync * train.shards
        block = minibatch_block(params.model)  # D's minibatch groups may not straddle slices
        if train.batch_size % (parts * block):
            why = f" x blocks of {block} rows (model.d_minibatch_std)" if block > 1 else ""
            raise ValueError(
                f"train.batch_size: got {train.batch_size}; must be a multiple of "
                f"{parts * block} ({strategy.num_replicas_in_sync} replicas of strategy "
                f"{train.strategy!r} x train.shards {train.shards}{why})"
            )
        name, replicas = type(strategy).__name__, strategy.num_replicas_in_sync
        log.info("strategy %s with %d replicas", name, replicas)
        yield strategy


def steps_per_epoch(params: Params, available: int) -> int:
    """Full batches per epoch over the first ``data.limit`` of ``available`` images."""
    count = min(available, params.data.limit or available)
    if count < params.train.batch_size:
        raise ValueError(f"train.batch_size: got {params.train.batch_size}; at most {count} images")
    return count // params.train.batch_size


def input_batches(
    params: Params,
    strategy: tf.distribute.Strategy,
    images: np.ndarray,
    labels: np.ndarray,
    start: int,
) -> Any:
    """An endless iterator of (distributed) batches that continues at step ``start``: the
    batches an uninterrupted run would see from there."""
    per_epoch = steps_per_epoch(params, len(images))
    dataset = make_dataset(
        images, labels, params.train.batch_size, params.model.output, params.seed,
        params.data.limit, first_epoch=start // per_epoch, epochs=None,
        skip_batches=start % per_epoch,
    )  # fmt: skip
    if strategy.num_replicas_in_sync > 1:
        return iter(strategy.distribute_datasets_from_function(replica_rows(dataset)))
    return iter(strategy.experimental_distribute_dataset(dataset))


def replica_rows(dataset: tf.data.Dataset) -> Any:
    """The input function of a run over several replicas (GPUs, workers or both): replica
    ``r`` of ``R`` gets rows ``[r * n, (r + 1) * n)`` of each global batch, ``n = batch / R``,
    the same rows ``GAN.train_step`` takes of the shared noise. So the replicas together see
    exactly the global batch a one-device run sees, whatever the cluster. Every worker builds
    the whole (deterministic) stream and keeps its own replicas' rows: no auto-sharding."""

    def rows(context: tf.distribute.InputContext) -> tf.data.Dataset:
        batch = int(dataset.element_spec[0].shape[0])
        local = batch // context.num_input_pipelines  # this worker's replicas' rows
        first = context.input_pipeline_id * local  # its replicas have consecutive ids
        per_replica = context.get_per_replica_batch_size(batch)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return (
            dataset.map(lambda x, y: (x[first : first + local], y[first : first + local]))
            .rebatch(per_replica, drop_remainder=True)  # one element per local replica, in order
            .with_options(options)
        )

    return rows
