"""Loss values against numbers worked out by hand.

Logits: real = [0, 2], fake = [0, -1]. With softplus(x) = log(1 + e^x):
softplus(0) = ln 2 = 0.693147, softplus(-2) = 0.126928, softplus(2) = 2.126928,
softplus(-1) = 0.313262, softplus(1) = 1.313262.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from pipeline.training.losses import (
    discriminator_loss,
    generator_loss,
    gradient_penalty,
    mode_seeking,
    r1_penalty,
)

REAL = tf.constant([[0.0], [2.0]])
FAKE = tf.constant([[0.0], [-1.0]])


@pytest.mark.parametrize(
    ("kind", "smoothing", "expected"),
    [
        # -log D(x) - log(1 - D(G(z))) = softplus(-real) + softplus(fake)
        ("minimax", 0.0, [0.693147 + 0.693147, 0.126928 + 0.313262]),
        ("non_saturating", 0.0, [0.693147 + 0.693147, 0.126928 + 0.313262]),
        # real target 0.9: BCE = softplus(x) - 0.9 x -> ln 2 at 0; 2.126928 - 1.8 at 2
        ("non_saturating", 0.1, [0.693147 + 0.693147, 0.326928 + 0.313262]),
        ("wgan_gp", 0.0, [0.0, -3.0]),  # fake - real
        ("hinge", 0.0, [2.0, 0.0]),  # relu(1 - real) + relu(1 + fake)
    ],
)
def test_discriminator_loss(kind: str, smoothing: float, expected: list[float]) -> None:
    loss = discriminator_loss(kind, REAL, FAKE, smoothing).numpy()
    np.testing.assert_allclose(loss, expected, atol=1e-5)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("minimax", [-0.693147, -0.313262]),  # log(1 - sigmoid(x)) = -softplus(x)
        ("non_saturating", [0.693147, 1.313262]),  # -log sigmoid(x) = softplus(-x)
        ("wgan_gp", [0.0, 1.0]),
        ("hinge", [0.0, 1.0]),
    ],
)
def test_generator_loss(kind: str, expected: list[float]) -> None:
    np.testing.assert_allclose(generator_loss(kind, FAKE).numpy(), expected, atol=1e-5)


def test_losses_stay_finite_on_extreme_logits() -> None:
    # sigmoid(-1000) rounds to 0 in float32: log of it would be -inf; on logits it is exact.
    extreme = tf.constant([[-1000.0], [1000.0]])
    np.testing.assert_allclose(generator_loss("non_saturating", extreme).numpy(), [1000.0, 0.0])
    np.testing.assert_allclose(generator_loss("minimax", extreme).numpy(), [0.0, -1000.0])
    d_loss = discriminator_loss("non_saturating", extreme, -extreme).numpy()
    np.testing.assert_allclose(d_loss, [2000.0, 0.0])


def test_gradient_penalty_of_a_linear_critic() -> None:
    # critic(x) = 0.5 * sum(x): its gradient is 0.5 everywhere, norm 0.5 * 28 = 14,
    # so the penalty is (14 - 1)^2 = 169 wherever it is taken.
    def critic(x: tf.Tensor) -> tf.Tensor:
        return 0.5 * tf.reduce_sum(x, axis=[1, 2, 3])

    real, fake = tf.ones([3, 28, 28, 1]), -tf.ones([3, 28, 28, 1])
    eps = tf.constant([0.0, 0.3, 1.0])[:, None, None, None]
    np.testing.assert_allclose(gradient_penalty(critic, real, fake, eps).numpy(), [169.0] * 3)


def test_r1_penalty_of_a_quadratic_critic() -> None:
    # critic(x) = 0.5 * sum(x^2) - sum(x): its gradient at x is x - 1, so the squared norm
    # at an image of all 3s is 784 * 2^2 = 3136, at all 1s 0, at all -1s 784 * 4 = 3136.
    def critic(x: tf.Tensor) -> tf.Tensor:
        return tf.reduce_sum(0.5 * tf.square(x) - x, axis=[1, 2, 3])

    real = tf.constant([3.0, 1.0, -1.0])[:, None, None, None] * tf.ones([3, 28, 28, 1])
    np.testing.assert_allclose(r1_penalty(critic, real).numpy(), 6272.0)
    np.testing.assert_allclose(r1_penalty(critic, real[1:2]).numpy(), 0.0)


def test_mode_seeking_pairs_adjacent_rows() -> None:
    # Pair (0, 1): images 1 apart, latents 2 apart: 1 / (1 / 2) = 2. Pair (2, 3): the same
    # image from two latents (a collapsed pair): 1 / eps. Row 4 has no partner.
    fake = tf.constant([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [9.0, 9.0]])
    z = tf.constant([[0.0, 0.0], [2.0, 2.0], [0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    np.testing.assert_allclose(mode_seeking(fake, z, eps=1e-5).numpy(), [2.0, 1e5], rtol=1e-4)


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match=r"loss.kind: got 'wasserstein'; allowed"):
        generator_loss("wasserstein", FAKE)
    with pytest.raises(ValueError, match=r"loss.kind: got 'lsgan'; allowed"):
        discriminator_loss("lsgan", REAL, FAKE)
