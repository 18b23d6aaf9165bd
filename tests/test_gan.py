"""The GAN on its own: every loss and architecture takes real training steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from pipeline.dataset import make_dataset
from pipeline.gan import GAN
from pipeline.mnist import load_split
from pipeline.params import Params

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("arch", "loss", "d_steps"),
    [("mlp", "minimax", 1), ("mlp", "wgan_gp", 2), ("mlp", "hinge", 1), ("dcgan", "wgan_gp", 1)],
)
def test_every_loss_and_architecture_trains(
    smoke_params: Params, mnist_dir: Path, arch: str, loss: str, d_steps: int
) -> None:
    """Two steps of each combination: finite metrics, and both nets moved."""
    params = smoke_params.model_copy(
        update={
            "model": smoke_params.model.model_copy(update={"arch": arch}),
            "loss": smoke_params.loss.model_copy(update={"kind": loss, "d_steps": d_steps}),
            "train": smoke_params.train.model_copy(update={"batch_size": 16}),
        }
    )
    gan = GAN(params, tf.distribute.get_strategy())
    before = [net.get_weights()[0].copy() for net in (gan.generator, gan.discriminator)]
    images, labels = load_split(mnist_dir, "train")
    dataset = make_dataset(images, labels, 16, params.model.output, params.seed, limit=64)
    sums, done = gan.train_block(iter(dataset), tf.constant(2))
    assert int(done) == 2 and np.isfinite(sums.numpy()).all()
    after = [net.get_weights()[0] for net in (gan.generator, gan.discriminator)]
    assert all(not np.array_equal(b, a) for b, a in zip(before, after, strict=True))
