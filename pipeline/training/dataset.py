"""The ``tf.data`` input pipeline of training: shuffled, batched ``(image, label)`` pairs whose
order is a pure function of ``(seed, epoch)``, so a resumed run sees the batches an
uninterrupted one would. TensorFlow is imported only when a dataset is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.images import from_unit

if TYPE_CHECKING:  # TensorFlow is imported lazily: importing this module must stay cheap.
    import tensorflow as tf


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    output: str,
    seed: int,
    limit: int | None = None,
    *,
    first_epoch: int = 0,
    epochs: int | None = 1,
    skip_batches: int = 0,
) -> tf.data.Dataset:
    """Shuffled, batched ``(image, label)`` pairs for ``epochs`` epochs (``None``: forever)
    from ``first_epoch``, minus the first ``skip_batches`` batches.

    Epoch ``e`` is ordered by a permutation drawn from ``(seed, e)`` alone, so a training
    resumed at any epoch and batch sees exactly the batches an uninterrupted run would.
    Full batches only, so every step sees the same shapes (one trace, no retracing). Images
    stay uint8 in memory and are scaled per batch: a quarter of the memory of float32.
    """
    import tensorflow as tf

    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    if len(images) < batch_size:
        raise ValueError(
            f"train.batch_size: got {batch_size}; must be at most the {len(images)} "
            "training images available (see data.limit)"
        )
    pixels, classes = tf.constant(images), tf.constant(labels.astype(np.int32))
    count = len(images)

    def epoch_batches(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.argsort(tf.random.stateless_uniform([count], tf.stack([seed, epoch])))
        # One element per batch (not per image, then batched): tf.data's per-element work
        # would otherwise take CPU time from the training step on a small machine.
        steps = count // batch_size
        return tf.data.Dataset.from_tensor_slices(
            tf.reshape(order[: steps * batch_size], [steps, batch_size])
        )

    def gather(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        batch = tf.cast(tf.gather(pixels, index), tf.float32)[..., None] / 255.0
        return from_unit(batch, output), tf.gather(classes, index)

    last = tf.int64.max if epochs is None else first_epoch + epochs
    return (
        tf.data.Dataset.range(first_epoch, last)
        .flat_map(epoch_batches)
        .skip(skip_batches)
        .map(gather)
        .prefetch(2)
    )
