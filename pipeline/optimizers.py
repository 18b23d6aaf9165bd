"""The optimizers of both nets: Adam, with each variable's update in one kernel.

Part of the training maths, so it is hashed into the checkpoint digest
(``pipeline.checkpoints.SOURCES``) like ``pipeline.gan``.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from pipeline.params import TrainParams


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


def adam(train: TrainParams, lr: float) -> keras.optimizers.Optimizer:
    optimizer = FusedAdam(lr, beta_1=train.beta1, beta_2=train.beta2)
    if keras.mixed_precision.global_policy().name == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
