"""Generator and discriminator, built from ``model`` params, and the latent noise.

Two families: ``mlp`` (the seed presets: dense layers of the given sizes, activation and
initialiser from params) and ``dcgan`` (the conv nets of the TensorFlow DCGAN tutorial, as
published: only ``output`` and ``conditional`` apply). Either can be conditional: the class
label goes through an ``Embedding`` into both nets, so a user can ask for a given digit.
The generator is built from stock Keras layers only, so its saved ``.keras`` file loads
without this module; so is the discriminator, unless ``d_minibatch_std`` adds this module's
:class:`MinibatchStd` (registered with Keras: it loads once this module is imported).

The discriminator always returns logits: the losses apply the sigmoid themselves, which is
numerically stable where ``log(sigmoid(x))`` computed in two steps is not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import keras
import tensorflow as tf
from keras import layers

from pipeline.core.images import NUM_CLASSES, SHAPE
from pipeline.core.params import ModelParams

EMBED_DIM = 50  # size of the learned label code fed to both nets when conditional


@contextlib.contextmanager
def dtype_policy(name: str | None = None) -> Iterator[None]:
    """Keras' global dtype policy set to ``name`` for the block (None: left to the block),
    and the one before given back afterwards, however the block ends. The policy is
    process-wide: nets built later in the process (the export, a test, a notebook) must not
    inherit a training's bfloat16."""
    before = keras.mixed_precision.global_policy()
    try:
        if name is not None:
            keras.mixed_precision.set_global_policy(name)
        yield
    finally:
        keras.mixed_precision.set_global_policy(before)


def _kernel_init(model: ModelParams) -> keras.initializers.Initializer:
    if model.init == "truncated_normal":
        return keras.initializers.TruncatedNormal(stddev=model.init_stddev)
    return keras.initializers.GlorotUniform()


def _activation(model: ModelParams) -> layers.Layer:
    if model.activation == "leaky_relu":
        return layers.LeakyReLU(negative_slope=model.leaky_alpha)
    return layers.ReLU()


def _label() -> keras.KerasTensor:
    return keras.Input(shape=(), dtype="int32", name="label")


def _label_input() -> tuple[keras.KerasTensor, keras.KerasTensor]:
    label = _label()
    return label, layers.Embedding(NUM_CLASSES, EMBED_DIM, name="label_embedding")(label)


def _mlp_generator(model: ModelParams, x: keras.KerasTensor) -> keras.KerasTensor:
    for units in model.g_hidden:
        x = layers.Dense(units, kernel_initializer=_kernel_init(model))(x)
        x = _activation(model)(x)
    return layers.Dense(SHAPE[0] * SHAPE[1], kernel_initializer=_kernel_init(model))(x)


def _dcgan_generator(x: keras.KerasTensor) -> keras.KerasTensor:
    x = layers.Dense(7 * 7 * 256, use_bias=False)(x)
    x = layers.LeakyReLU()(layers.BatchNormalization()(x))
    x = layers.Reshape((7, 7, 256))(x)
    for filters, stride in ((128, 1), (64, 2)):
        x = layers.Conv2DTranspose(filters, 5, strides=stride, padding="same", use_bias=False)(x)
        x = layers.LeakyReLU()(layers.BatchNormalization()(x))
    return layers.Conv2DTranspose(1, 5, strides=2, padding="same")(x)


def build_generator(model: ModelParams) -> keras.Model:
    """``z`` [N, latent_dim] (+ ``label`` int32 [N]) -> images [N, 28, 28, 1] in the training
    range: [-1, 1] for ``tanh``, [0, 1] for ``sigmoid``."""
    z = keras.Input(shape=(model.latent_dim,), name="z")
    inputs, x = [z], z
    if model.conditional:
        label, code = _label_input()
        inputs, x = [z, label], layers.Concatenate()([z, code])
    x = _mlp_generator(model, x) if model.arch == "mlp" else _dcgan_generator(x)
    x = layers.Reshape(SHAPE)(x)
    # float32 even under mixed precision: images leave the net in full precision.
    image = layers.Activation(model.output, dtype="float32", name="image")(x)
    return keras.Model(inputs if model.conditional else z, image, name="generator")


@keras.saving.register_keras_serializable(package="pipeline")
class MinibatchStd(layers.Layer):
    """Appends one feature per row: how much the rows of its group differ (the mean over
    features of their standard deviation; Karras et al., 2018). A D that sees it can tell a
    batch of near-copies from a varied one, so G is pushed to vary within the batch.

    A group is ``group`` rows of the same parity within a block of ``PARITIES * group``
    consecutive rows: the mode-seeking term's pairs (2k, 2k + 1) never share a group, and D's
    call on [real; fake] never mixes the two when each half is a whole number of blocks."""

    PARITIES = 2  # even and odd rows: the two members of each mode-seeking pair

    def __init__(self, group: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.group = group

    def call(self, x: tf.Tensor) -> tf.Tensor:
        width = x.shape[-1]
        shape = (-1, self.group, self.PARITIES, width)
        blocks = keras.ops.reshape(keras.ops.cast(x, "float32"), shape)
        std = keras.ops.sqrt(keras.ops.var(blocks, axis=1, keepdims=True) + 1e-8)
        spread = keras.ops.mean(std, axis=-1, keepdims=True)  # [blocks, 1, parities, 1]
        spread = keras.ops.broadcast_to(
            spread, (keras.ops.shape(blocks)[0], self.group, self.PARITIES, 1)
        )
        spread = keras.ops.cast(keras.ops.reshape(spread, (-1, 1)), x.dtype)
        return keras.ops.concatenate([x, spread], axis=-1)

    def compute_output_shape(self, shape: tuple) -> tuple:
        return (*shape[:-1], shape[-1] + 1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "group": self.group}


def minibatch_block(model: ModelParams) -> int:
    """Rows per block of :class:`MinibatchStd`'s groups in the discriminator ``model`` builds
    (1: it builds none). A slice of a batch, and each half of D's [real; fake] call, must
    hold whole blocks."""
    if model.arch == "mlp" and model.d_minibatch_std:
        return MinibatchStd.PARITIES * model.d_minibatch_std
    return 1


def _mlp_discriminator(
    model: ModelParams, x: keras.KerasTensor, label: keras.KerasTensor | None
) -> keras.KerasTensor:
    for index, units in enumerate(model.d_hidden):
        if model.d_minibatch_std and index == len(model.d_hidden) - 1:
            # Where ProGAN puts it: the last layers can weigh the spread against the image.
            x = MinibatchStd(model.d_minibatch_std)(x)
        x = layers.Dense(units, kernel_initializer=_kernel_init(model))(x)
        if label is not None and index == 0:
            # The label enters as one learned vector per class, added to the first layer:
            # what a dense layer over [image, embedding] computes (10 distinct label rows),
            # without the GEMM over the concatenated input that the embedding's gradient
            # cost every D step (10% of a step's kernel time in bfloat16). Zeros at first:
            # D starts blind to the label (default init: FID 1.78 against 1.66).
            code = layers.Embedding(
                NUM_CLASSES, units, embeddings_initializer="zeros", name="label_bias"
            )(label)
            x = layers.Add()([x, code])
        x = _activation(model)(x)
        if model.d_dropout:  # no layer at 0, so recipes without it build the same net
            x = layers.Dropout(model.d_dropout)(x)
    return x


def _dcgan_discriminator(x: keras.KerasTensor) -> keras.KerasTensor:
    for filters in (64, 128):
        x = layers.Conv2D(filters, 5, strides=2, padding="same")(x)
        x = layers.Dropout(0.3)(layers.LeakyReLU()(x))
    return layers.Flatten()(x)


def build_discriminator(model: ModelParams) -> keras.Model:
    """Images [N, 28, 28, 1] (+ ``label`` int32 [N]) -> logits [N, 1]."""
    image = keras.Input(shape=SHAPE, name="image")
    label, x = None, image
    if model.arch == "mlp":
        label = _label() if model.conditional else None
        x = _mlp_discriminator(model, layers.Flatten()(image), label)
    else:
        if model.conditional:  # the label becomes an extra image channel, as in cDCGANs
            label, code = _label_input()
            plane = layers.Reshape(SHAPE)(layers.Dense(SHAPE[0] * SHAPE[1])(code))
            x = layers.Concatenate()([image, plane])
        x = _dcgan_discriminator(x)
    init = _kernel_init(model) if model.arch == "mlp" else "glorot_uniform"
    logits = layers.Dense(1, kernel_initializer=init, dtype="float32", name="logits")(x)
    if label is not None and model.d_projection:
        # Projection D (Miyato & Koyama, 2018): the logit gains <embed(label), features>,
        # so D scores how well an image fits its label, not only how real it looks. Zeros at
        # first, as the first layer's label code: D starts as the net without it.
        code = layers.Embedding(
            NUM_CLASSES, x.shape[-1], embeddings_initializer="zeros", name="label_projection"
        )(label)
        fit = layers.Dot(axes=1, dtype="float32", name="label_fit")([x, code])
        logits = layers.Add(dtype="float32", name="logits_with_label")([logits, fit])
    inputs = image if label is None else [image, label]
    return keras.Model(inputs, logits, name="discriminator")


def sample_noise(kind: str, shape: tf.Tensor | list, rng: tf.random.Generator) -> tf.Tensor:
    """The training stream of latent noise: ``normal`` N(0, 1) or ``uniform`` in [-1, 1],
    drawn in the graph from ``rng`` (whose state is checkpointed). Everything outside
    training draws with :func:`pipeline.core.images.sample_latents` instead."""
    if kind == "normal":
        return rng.normal(shape)
    if kind == "uniform":
        return rng.uniform(shape, minval=-1.0, maxval=1.0)
    raise ValueError(f"model.noise: got {kind!r}; allowed: ['normal', 'uniform']")
