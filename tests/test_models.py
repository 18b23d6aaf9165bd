"""Generator/discriminator shapes and ranges for every architecture, and the latent noise."""

from __future__ import annotations

import re
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.core.images import sample_latents
from pipeline.core.params import Params, ParamsError, parse_params
from pipeline.training.models import (
    MinibatchStd,
    build_discriminator,
    build_generator,
    sample_noise,
)


def _model_params(smoke: Params, **changes: object):
    return smoke.model.model_copy(update=changes)


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize(
    ("arch", "output", "low", "high"),
    [("mlp", "tanh", -1.0, 1.0), ("mlp", "sigmoid", 0.0, 1.0), ("dcgan", "tanh", -1.0, 1.0)],
)
def test_shapes_and_output_range(
    smoke_params: Params, arch: str, output: str, low: float, high: float, conditional: bool
) -> None:
    model = _model_params(
        smoke_params, arch=arch, output=output, conditional=conditional, latent_dim=16
    )
    g, d = build_generator(model), build_discriminator(model)
    z = tf.constant(
        sample_latents("normal", 5, 16, 0) * 10.0
    )  # large inputs: the output must saturate
    labels = tf.constant([0, 3, 9, 1, 2], tf.int32)
    images = g([z, labels] if conditional else z)
    logits = d([images, labels] if conditional else images)
    assert logits.shape == (5, 1) and logits.dtype == tf.float32
    images = images.numpy()
    assert images.shape == (5, 28, 28, 1) and images.dtype == np.float32
    assert images.min() >= low and images.max() <= high
    assert images.min() < low + 0.5 * (high - low) < images.max()  # not a constant image


def test_conditional_label_changes_the_image(smoke_params: Params) -> None:
    g = build_generator(_model_params(smoke_params, conditional=True))
    z = np.repeat(sample_latents("uniform", 1, smoke_params.model.latent_dim, 1), 2, axis=0)
    images = g([z, np.array([2, 7], np.int32)]).numpy()
    assert not np.allclose(images[0], images[1])


def test_conditional_mlp_discriminator_adds_a_vector_per_class(smoke_params: Params) -> None:
    """The label reaches D's first layer as one learned vector per class, added: no GEMM over
    an [image, embedding] concatenation, whose input gradient every D step paid for."""
    model = _model_params(smoke_params, conditional=True, d_hidden=[64, 32])
    d = build_discriminator(model)
    assert not any(isinstance(layer, keras.layers.Concatenate) for layer in d.layers)
    first = next(layer for layer in d.layers if isinstance(layer, keras.layers.Dense))
    assert first.kernel.shape == (784, 64)
    table = d.get_layer("label_bias").embeddings
    assert table.shape == (10, 64) and not table.numpy().any()  # starts blind to the label
    table.assign(np.random.default_rng(0).normal(size=(10, 64)).astype(np.float32))  # learned
    image = np.full((2, 28, 28, 1), 0.5, np.float32)
    logits = d([image, np.array([2, 7], np.int32)]).numpy()
    assert logits[0, 0] != logits[1, 0]  # same image, another digit: another verdict


def test_mlp_layers_follow_params(smoke_params: Params) -> None:
    model = _model_params(
        smoke_params, g_hidden=[128], d_hidden=[64, 32], init="truncated_normal",
        init_stddev=0.01, conditional=False, activation="relu",
    )  # fmt: skip
    g, d = build_generator(model), build_discriminator(model)
    g_dense = [layer for layer in g.layers if isinstance(layer, keras.layers.Dense)]
    d_dense = [layer for layer in d.layers if isinstance(layer, keras.layers.Dense)]
    assert [layer.units for layer in g_dense] == [128, 784]
    assert [layer.units for layer in d_dense] == [64, 32, 1]
    kernel = g_dense[0].kernel.numpy()
    # truncated normal(0.01): nothing beyond two standard deviations, biases start at zero
    assert np.abs(kernel).max() <= 0.02 and 0.004 < kernel.std() < 0.01
    assert not g_dense[0].bias.numpy().any()


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_mlp_discriminator_dropout(smoke_params: Params, rate: float) -> None:
    model = _model_params(smoke_params, d_hidden=[64, 32], d_dropout=rate, conditional=False)
    d = build_discriminator(model)
    dropouts = [layer for layer in d.layers if isinstance(layer, keras.layers.Dropout)]
    assert [layer.rate for layer in dropouts] == ([rate, rate] if rate else [])
    images = build_generator(model)(sample_latents("normal", 8, model.latent_dim, 3))
    # Active while D trains, off when it judges: then the same images get the same logits.
    np.testing.assert_array_equal(d(images).numpy(), d(images).numpy())
    trained = [d(images, training=True).numpy() for _ in range(2)]
    assert np.array_equal(*trained) == (not rate)


def test_minibatch_std_adds_each_groups_spread(smoke_params: Params, tmp_path: Path) -> None:
    """Group g of a block of 2 x 4 rows is its rows of parity g: the feature is their standard
    deviation averaged over features, the same for each of them, and a change to one row
    moves its own group's feature only (not the mode-seeking partner's, in the other)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 5)).astype(np.float32)
    out = MinibatchStd(4)(x).numpy()
    np.testing.assert_array_equal(out[:, :5], x)
    expected = x.reshape(2, 4, 2, 5).std(axis=1).mean(axis=-1)  # [block, parity]
    np.testing.assert_allclose(
        out[:, 5].reshape(2, 4, 2), np.repeat(expected[:, None], 4, 1), rtol=1e-5
    )
    moved = x.copy()
    moved[2] += 3.0  # block 0, parity 0
    changed = MinibatchStd(4)(moved).numpy()[:, 5] != out[:, 5]
    assert changed.tolist() == [i < 8 and i % 2 == 0 for i in range(16)]

    model = _model_params(smoke_params, d_hidden=[64, 32], d_minibatch_std=4, conditional=True)
    d = build_discriminator(model)
    dense = [layer for layer in d.layers if isinstance(layer, keras.layers.Dense)]
    # The feature joins the input of the last hidden layer: 64 + 1 inputs.
    assert [tuple(layer.kernel.shape) for layer in dense] == [(784, 64), (65, 32), (32, 1)]
    d.save(tmp_path / "d.keras")  # registered: loads where pipeline.training.models is imported
    images = rng.uniform(-1, 1, size=(8, 28, 28, 1)).astype(np.float32)
    labels = np.arange(8, dtype=np.int32)
    loaded = keras.models.load_model(tmp_path / "d.keras")
    np.testing.assert_array_equal(d([images, labels]).numpy(), loaded([images, labels]).numpy())


def test_saved_models_load_without_pipeline_code(smoke_params: Params, tmp_path: Path) -> None:
    model = _model_params(smoke_params, conditional=True)
    g = build_generator(model)
    g.save(tmp_path / "g.keras")
    # No custom_objects: only stock Keras classes may be in the file.
    loaded = keras.models.load_model(tmp_path / "g.keras")
    z = sample_latents("normal", 3, model.latent_dim, 2)
    labels = np.array([1, 2, 3], np.int32)
    np.testing.assert_array_equal(g([z, labels]).numpy(), loaded([z, labels]).numpy())


def test_training_noise_is_a_stream() -> None:
    rng = tf.random.Generator.from_seed(7)
    uniform = sample_noise("uniform", (20000,), rng).numpy()
    assert uniform.min() >= -1.0 and uniform.max() <= 1.0
    assert uniform.min() < -0.99 and uniform.max() > 0.99 and abs(uniform.mean()) < 0.02
    normal = sample_noise("normal", (20000,), rng).numpy()
    assert abs(normal.mean()) < 0.03 and abs(normal.std() - 1.0) < 0.03 and normal.min() < -3
    first, second = sample_noise("uniform", (100,), rng), sample_noise("uniform", (100,), rng)
    assert not np.array_equal(first.numpy(), second.numpy())  # a stream, not a fixed draw
    again = tf.random.Generator.from_seed(7)
    np.testing.assert_array_equal(uniform, sample_noise("uniform", (20000,), again).numpy())
    with pytest.raises(ValueError, match=r"model.noise: got 'gauss'; allowed"):
        sample_noise("gauss", (2,), rng)


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
def test_projection_scores_the_label_against_the_last_features(
    smoke_params: Params, arch: str, tmp_path: Path
) -> None:
    """With ``d_projection`` the logit is the plain net's plus <embed(label), features>:
    zeros at first (the same logits as without it), then each label moves its own rows."""
    model = _model_params(smoke_params, arch=arch, conditional=True, d_projection=True)
    d = build_discriminator(model)
    projection = d.get_layer("label_projection")
    features = keras.Model(d.inputs, d.get_layer("label_fit").input[0])
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(6, 28, 28, 1)).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
    before = d([images, labels], training=False).numpy()
    plain = keras.Model(d.inputs, d.get_layer("logits").output)([images, labels]).numpy()
    np.testing.assert_array_equal(before, plain)  # zeros: D starts as the net without it

    table = rng.normal(size=projection.embeddings.shape).astype(np.float32)
    projection.embeddings.assign(table)
    h = features([images, labels], training=False).numpy()
    expected = plain[:, 0] + np.sum(h * table[labels], axis=1)
    after = d([images, labels], training=False).numpy()[:, 0]
    np.testing.assert_allclose(after, expected, rtol=1e-5, atol=1e-5)
    d.save(tmp_path / "d.keras")
    loaded = keras.models.load_model(tmp_path / "d.keras")
    np.testing.assert_array_equal(loaded([images, labels]).numpy()[:, 0], after)


def test_projection_needs_a_conditional_net(smoke_params: Params) -> None:
    raw = smoke_params.model_dump(mode="json")
    raw["model"].update(conditional=False, d_projection=True)
    line = "model.d_projection: got True; allowed only with model.conditional: true"
    with pytest.raises(ParamsError, match=re.escape(line)):
        parse_params(raw)
