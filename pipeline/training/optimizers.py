"""The optimizers of both nets: Adam, with each variable's update in one kernel.

Part of the training maths, so it is hashed into the checkpoint digest
(``pipeline.training.checkpoints.SOURCES``) like ``pipeline.training.gan``.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from pipeline.core.params import TrainParams


class FusedAdam(keras.optimizers.Adam):
    """Keras' Adam with each variable's update as one kernel (``ResourceApplyAdam``, the
    formula of Keras' Adam) instead of a dozen small ops: on nets this small the per-op cost
    is what limits a training step. Same variables, so checkpoints are unchanged."""

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        index = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=self._momentums[index].handle,
            v=self._velocities[index].handle,
            beta1_power=tf.pow(beta_1, step),
            beta2_power=tf.pow(beta_2, step),
            lr=tf.cast(learning_rate, dtype),
            beta1=beta_1,
            beta2=beta_2,
            epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype),
        )


class LinearTail(keras.optimizers.schedules.LearningRateSchedule):
    """``lr`` until update ``start``, then falling linearly to 0 at update ``end``: the
    schedule of pix2pix and CycleGAN. A function of the optimizer's update count, which
    checkpoints hold, so a resumed run follows it exactly."""

    def __init__(self, lr: float, start: int, end: int) -> None:
        self.lr, self.start, self.end = lr, start, end

    def __call__(self, step: Any) -> Any:
        left = (self.end - tf.cast(step, tf.float32)) / float(max(self.end - self.start, 1))
        return self.lr * tf.clip_by_value(left, 0.0, 1.0)

    def get_config(self) -> dict[str, Any]:
        return {"lr": self.lr, "start": self.start, "end": self.end}


def adam(train: TrainParams, lr: float, updates: int) -> keras.optimizers.Optimizer:
    """Adam at ``lr``, or with ``train.lr_decay`` > 0, ``lr`` falling to 0 over that last
    fraction of the run's ``updates``."""
    rate: Any = lr
    if train.lr_decay:
        rate = LinearTail(lr, round(updates * (1 - train.lr_decay)), updates)
    optimizer = FusedAdam(rate, beta_1=train.beta1, beta_2=train.beta2)
    if keras.mixed_precision.global_policy().name == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
