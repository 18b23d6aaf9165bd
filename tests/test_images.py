"""The image contract (pipeline/core/images.py): ranges, labels, the one latent sampler, grids."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.images import (
    cycle_labels,
    from_uint8,
    grid_columns,
    labels_for,
    sample_latents,
    sample_latents_many,
    tile,
    to_uint8,
    to_unit,
)


def test_ranges_round_trip() -> None:
    pixels = np.array([[[0, 255]]], dtype=np.uint8)
    assert from_uint8(pixels, "tanh").ravel().tolist() == [-1.0, 1.0]
    assert from_uint8(pixels, "sigmoid").ravel().tolist() == [0.0, 1.0]
    assert from_uint8(pixels, "tanh").shape == (1, 1, 2, 1)
    for output in ("tanh", "sigmoid"):
        back = to_uint8(to_unit(from_uint8(pixels, output), output))
        np.testing.assert_array_equal(back[..., 0], pixels)


def test_labels_cycle_or_repeat_the_digit() -> None:
    assert cycle_labels(12).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert labels_for(3, 7).tolist() == [7, 7, 7]
    assert labels_for(3, None).dtype == np.int64


# Pinned values: the browser page (pipeline/serve/web) and any other client reproduce these
# bit for bit, so a change here is a change of contract.
PINNED = {
    ("normal", 0): [0.729062557220459, 1.1801990270614624, 0.9170739054679871],
    ("uniform", 0): [0.3048969805240631, -0.6672071218490601, 0.01975799910724163],
}


@pytest.mark.parametrize(("noise", "seed"), list(PINNED))
def test_latents_are_pinned(noise: str, seed: int) -> None:
    z = sample_latents(noise, 1, 3, seed)
    assert z.dtype == np.float32 and z.shape == (1, 3)
    np.testing.assert_array_equal(z[0], np.float32(PINNED[noise, seed]))


def test_latents_distribution_and_prefix() -> None:
    normal = sample_latents("normal", 400, 100, 7)
    assert abs(normal.mean()) < 0.01 and abs(normal.std() - 1.0) < 0.01
    uniform = sample_latents("uniform", 400, 100, 7)
    assert uniform.min() >= -1.0 and uniform.max() < 1.0
    assert abs(uniform.std() - 1 / np.sqrt(3)) < 0.01
    # The first rows of a larger draw are a smaller draw: evaluate's first images for seed s
    # are the CLI's and the service's for seed s.
    np.testing.assert_array_equal(sample_latents("normal", 3, 100, 7), normal[:3])
    assert not np.array_equal(sample_latents("normal", 3, 100, 8), normal[:3])
    with pytest.raises(ValueError, match=r"noise: got 'gauss'; allowed"):
        sample_latents("gauss", 1, 1, 0)


@pytest.mark.parametrize("noise", ["normal", "uniform"])
def test_many_draws_at_once_are_each_draw_alone(noise: str) -> None:
    """The service's batches draw all their requests' latents in one pass."""
    draws = [(1, 0), (5, 2**53 - 1), (3, 7), (1, 7), (16, 12345)]
    together = sample_latents_many(noise, 100, draws)
    alone = [sample_latents(noise, n, 100, seed) for n, seed in draws]
    np.testing.assert_array_equal(together, np.concatenate(alone))


def test_grid_columns() -> None:
    assert grid_columns(64, cycling=False) == 8
    assert grid_columns(10, cycling=False) == 4
    assert grid_columns(25, cycling=True) == 10
    assert grid_columns(3, cycling=True) == 3


def test_tile_with_and_without_gaps() -> None:
    images = np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2) + 1
    plain = tile(images, cols=2)
    assert plain.shape == (4, 4) and plain.dtype == np.uint8
    np.testing.assert_array_equal(plain[:2, 2:], images[1])
    assert not plain[2:, 2:].any()  # the empty cell
    gapped = tile(images.astype(np.float32), cols=2, pad=1, fill=0.5)
    assert gapped.shape == (7, 7)
    np.testing.assert_array_equal(gapped[4:6, 1:3], images[2])
    assert (gapped[0] == 0.5).all() and (gapped[4:6, 4:6] == 0.5).all()
