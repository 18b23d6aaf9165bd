"""Training throughput: this trainer (a whole epoch inside one ``tf.function``) against the
plain per-batch loop of the TensorFlow DCGAN tutorial (a ``tf.function`` train_step called
from Python per batch), on the seed001 net, in one process, on the same data.

    python -m bench.train_throughput --epochs 3 [--data data] [--xla]

Prints a Markdown table of images/s (median over the timed epochs, after one warm-up epoch
each, which pays for tracing) and the speed-up over the plain loop.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import keras
import tensorflow as tf

from pipeline.dataset import make_dataset
from pipeline.gan import GAN
from pipeline.images import from_uint8
from pipeline.mnist import load_split
from pipeline.models import build_discriminator, build_generator
from pipeline.params import Params, load_params
from pipeline.presets import load_preset

PRESET = "seed001"
REPO_ROOT = Path(__file__).resolve().parent.parent


def seed001_params(**train: object) -> Params:
    params = load_params(REPO_ROOT / "params.yaml", load_preset(PRESET))
    return params.model_copy(update={"train": params.train.model_copy(update=train)})


def plain_loop(params: Params, images: tf.Tensor) -> Callable[[], int]:
    """The tutorial's structure: Python iterates the batches, one graph call per batch."""
    model, train = params.model, params.train
    generator, discriminator = build_generator(model), build_discriminator(model)
    g_opt = keras.optimizers.Adam(train.lr_g, beta_1=train.beta1, beta_2=train.beta2)
    d_opt = keras.optimizers.Adam(train.lr_d, beta_1=train.beta1, beta_2=train.beta2)
    bce = keras.losses.BinaryCrossentropy(from_logits=True)
    smooth = 1.0 - params.loss.label_smoothing
    dataset = (
        tf.data.Dataset.from_tensor_slices(images)
        .shuffle(len(images), seed=params.seed)
        .batch(train.batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )

    @tf.function
    def train_step(real: tf.Tensor) -> None:
        noise = tf.random.uniform([train.batch_size, model.latent_dim], -1.0, 1.0)
        with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
            fake = generator(noise, training=True)
            real_out = discriminator(real, training=True)
            fake_out = discriminator(fake, training=True)
            g_loss = bce(tf.ones_like(fake_out), fake_out)
            d_loss = bce(smooth * tf.ones_like(real_out), real_out)
            d_loss += bce(tf.zeros_like(fake_out), fake_out)
        g_vars, d_vars = generator.trainable_variables, discriminator.trainable_variables
        g_opt.apply(g_tape.gradient(g_loss, g_vars), g_vars)
        d_opt.apply(d_tape.gradient(d_loss, d_vars), d_vars)

    def epoch() -> int:
        steps = 0
        for batch in dataset:
            train_step(batch)
            steps += 1
        return steps * train.batch_size

    return epoch


def epoch_in_graph(params: Params, images: object, labels: object) -> Callable[[], int]:
    """This trainer: one ``train_block`` call per epoch."""
    gan = GAN(params, tf.distribute.get_strategy())
    per_epoch = len(images) // params.train.batch_size
    dataset = make_dataset(
        images, labels, params.train.batch_size, params.model.output, params.seed, epochs=None
    )
    iterator = iter(dataset)

    def epoch() -> int:
        _, done = gan.train_block(iterator, tf.constant(per_epoch))
        return int(done) * params.train.batch_size

    return epoch


def images_per_s(epoch: Callable[[], int], epochs: int) -> float:
    epoch()  # warm-up: tracing and the first pass of tf.data
    rates = []
    for _ in range(epochs):
        began = time.perf_counter()
        count = epoch()
        rates.append(count / (time.perf_counter() - began))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per variant")
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "data")
    parser.add_argument("--xla", action="store_true", help="also time jit_compile=True")
    args = parser.parse_args()
    tf.config.experimental.enable_op_determinism()  # as pipeline.gan.configure_devices does on CPU
    keras.utils.set_random_seed(0)
    images, labels = load_split(args.data, "train")
    params = seed001_params()
    rows = [("plain per-batch loop (tf.function step)", images_per_s(
        plain_loop(params, tf.constant(from_uint8(images, params.model.output))), args.epochs
    ))]  # fmt: skip
    rows.append(("epoch in one tf.function (this trainer)", images_per_s(
        epoch_in_graph(params, images, labels), args.epochs
    )))  # fmt: skip
    if args.xla:
        rows.append(("  + XLA (train.jit_compile=true)", images_per_s(
            epoch_in_graph(seed001_params(jit_compile=True), images, labels), args.epochs
        )))  # fmt: skip
    base = rows[0][1]
    print(f"\nseed001 net, batch {params.train.batch_size}, {args.epochs} timed epochs each, "
          f"{len(images)} images/epoch\n")  # fmt: skip
    print("| loop | images/s | s/epoch | speed-up |\n|---|---:|---:|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} | {len(images) / rate:.2f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
