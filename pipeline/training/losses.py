"""GAN losses on discriminator logits, one value per example.

Per-example values let the trainer average over the *global* batch
(``tf.nn.compute_average_loss``), which is what keeps the loss the same on one device and on
several. Every formula works on logits: ``softplus`` gives ``-log(sigmoid(-x))`` without the
overflow of taking the log of a sigmoid that rounded to 0 or 1.

- ``minimax``: D maximises log D(x) + log(1 - D(G(z))); G minimises log(1 - D(G(z))) (the
  original objective; its gradient vanishes while D wins, which is why the next one exists).
- ``non_saturating``: the same D; G maximises log D(G(z)).
- ``wgan_gp``: a critic; D minimises D(G(z)) - D(x) + gp_weight * (|grad D(x_hat)| - 1)^2.
- ``hinge``: D minimises relu(1 - D(x)) + relu(1 + D(G(z))); G minimises -D(G(z)).

One-sided label smoothing (real target 1 - s) applies to the two cross-entropy losses.
The mode-seeking term (:func:`mode_seeking`) can be added to any G loss, the R1 penalty
(:func:`r1_penalty`) to any D loss.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

KINDS = ("minimax", "non_saturating", "wgan_gp", "hinge")


def _bce(logits: tf.Tensor, target: float) -> tf.Tensor:
    """Cross-entropy of sigmoid(logits) against ``target``: -t log s(x) - (1 - t) log(1 - s(x))
    = softplus(x) - t x, in two ops (TF's sigmoid_cross_entropy_with_logits takes eight)."""
    logits = tf.reshape(logits, [-1])
    return tf.nn.softplus(logits) - target * logits if target else tf.nn.softplus(logits)


def discriminator_loss(
    kind: str, real_logits: tf.Tensor, fake_logits: tf.Tensor, label_smoothing: float = 0.0
) -> tf.Tensor:
    """Per-example D loss [N] (without the WGAN-GP penalty: see :func:`gradient_penalty`)."""
    real, fake = tf.reshape(real_logits, [-1]), tf.reshape(fake_logits, [-1])
    if kind in ("minimax", "non_saturating"):
        return _bce(real, 1.0 - label_smoothing) + _bce(fake, 0.0)
    if kind == "wgan_gp":
        return fake - real
    if kind == "hinge":
        return tf.nn.relu(1.0 - real) + tf.nn.relu(1.0 + fake)
    raise ValueError(f"loss.kind: got {kind!r}; allowed: {list(KINDS)}")


def generator_loss(kind: str, fake_logits: tf.Tensor) -> tf.Tensor:
    """Per-example G loss [N]."""
    fake = tf.reshape(fake_logits, [-1])
    if kind == "minimax":
        return -tf.nn.softplus(fake)  # log(1 - sigmoid(x)) = -softplus(x)
    if kind == "non_saturating":
        return _bce(fake, 1.0)  # -log(sigmoid(x)) = softplus(-x)
    if kind in ("wgan_gp", "hinge"):
        return -fake
    raise ValueError(f"loss.kind: got {kind!r}; allowed: {list(KINDS)}")


def mode_seeking(fake: tf.Tensor, z: tf.Tensor, eps: float = 1e-5) -> tf.Tensor:
    """Per-pair 1 / (d(G(z1), G(z2)) / d(z1, z2) + eps) [N // 2] over the pairs of rows
    (0, 1), (2, 3), ... (MSGAN, Mao et al., 2019; d: the mean absolute difference).
    Minimising it makes G give different images for different latents under the same
    condition: each pair must share its label, which the caller arranges. Pairs of adjacent
    rows stay the same pairs when a batch is split into shards of even size."""
    pairs = tf.shape(z)[0] // 2 * 2
    flat = tf.reshape(fake, [tf.shape(fake)[0], -1])

    def distance(x: tf.Tensor) -> tf.Tensor:
        return tf.reduce_mean(tf.abs(x[0:pairs:2] - x[1:pairs:2]), axis=1)

    return 1.0 / (distance(flat) / distance(z) + eps)


def gradient_penalty(
    critic: Callable[[tf.Tensor], tf.Tensor], real: tf.Tensor, fake: tf.Tensor, eps: tf.Tensor
) -> tf.Tensor:
    """Per-example (|grad critic(x_hat)|_2 - 1)^2 at x_hat = eps * real + (1 - eps) * fake,
    ``eps`` uniform in [0, 1] with shape [N, 1, 1, 1] (Gulrajani et al., 2017)."""
    grads = _input_gradient(critic, eps * real + (1.0 - eps) * fake)
    norms = tf.sqrt(tf.reduce_sum(tf.square(grads), axis=[1, 2, 3]) + 1e-12)
    return tf.square(norms - 1.0)


def r1_penalty(critic: Callable[[tf.Tensor], tf.Tensor], real: tf.Tensor) -> tf.Tensor:
    """|grad critic(x)|_2^2 summed over the real images ``x`` (R1: Mescheder et al., 2018).
    Penalising it keeps D flat on the data, so it cannot sharpen its boundary there without
    end, which is what makes GAN training oscillate near equilibrium."""
    return tf.reduce_sum(tf.square(_input_gradient(critic, real)))


def _input_gradient(critic: Callable[[tf.Tensor], tf.Tensor], x: tf.Tensor) -> tf.Tensor:
    """d sum(critic(x)) / dx in float32: each row's gradient of its own score (rows are
    independent in D), recorded so that a penalty on it trains D through it."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        scores = tf.reduce_sum(critic(x))
    return tf.cast(tape.gradient(scores, x), tf.float32)
