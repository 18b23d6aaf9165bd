"""The image contract, written once: what a digit image, a label, a latent vector and a grid
of digits are, for every part of the pipeline (train, export, evaluate, plots, inference,
generate, serve). numpy only, so the serving path can import it without TensorFlow.

- An image is 28 x 28 grey pixels; the nets see [N, 28, 28, 1] in their *training range*
  ([-1, 1] for a ``tanh`` generator, [0, 1] for ``sigmoid``); everything outside the nets
  (ONNX output, files, HTTP) uses [0, 1] floats or 0..255 bytes.
- A conditional model takes one of ``NUM_CLASSES`` labels; asked for no particular digit, the
  i-th image gets label ``i % NUM_CLASSES``, so a ten-column grid shows one digit per column.
- A latent vector comes from :func:`sample_latents`: the same seed gives the same vectors in
  evaluate, export's parity check, the CLI, the HTTP service and the browser page.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

NUM_CLASSES = 10
SIDE = 28
SHAPE = (SIDE, SIDE, 1)  # one image as the nets see it (channels last)
OUTPUTS = ("tanh", "sigmoid")  # the generator's last activation sets its training range
NOISE_KINDS = ("normal", "uniform")


# --------------------------------------------------------------------------- pixel ranges


def from_uint8(pixels: np.ndarray, output: str) -> np.ndarray:
    """uint8 [N, 28, 28] (as stored) -> float32 [N, 28, 28, 1] in the training range."""
    return from_unit(pixels.astype(np.float32)[..., None] / 255.0, output)


def from_unit(images: np.ndarray, output: str) -> np.ndarray:
    """[0, 1] -> the training range of a ``tanh`` or ``sigmoid`` generator."""
    return images * 2.0 - 1.0 if output == "tanh" else images


def to_unit(images: np.ndarray, output: str) -> np.ndarray:
    """The training range -> [0, 1] (unclipped: the caller decides about rounding)."""
    return (images + 1.0) * 0.5 if output == "tanh" else images


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] floats to 0..255 bytes (rounded, not truncated, so 1.0 maps to 255)."""
    return np.rint(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8)


# --------------------------------------------------------------------------- labels


def cycle_labels(n: int, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """int64 [n]: the digits 0..num_classes-1 in turn."""
    return np.arange(n, dtype=np.int64) % num_classes


def labels_for(n: int, digit: int | None, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """The labels a conditional generator is fed: ``digit`` n times, else the cycle."""
    return cycle_labels(n, num_classes) if digit is None else np.full(n, digit, np.int64)


# --------------------------------------------------------------------------- latents

_MASK = (1 << 64) - 1
# splitmix64's constants as numpy scalars, made once: building them per call was a third
# of a one-image draw (the service draws one per request).
_GOLDEN, _MIX1, _MIX2 = (
    np.uint64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
)
_S11, _S27, _S30, _S31 = (np.uint64(s) for s in (11, 27, 30, 31))
_Words = TypeVar("_Words", np.ndarray, np.uint64)  # an array of words, or one


def _splitmix64(x: _Words) -> _Words:
    # uint64 arithmetic wraps modulo 2**64, which is what splitmix64 needs (the caller
    # silences numpy's overflow warning).
    x = x + _GOLDEN
    x = (x ^ (x >> _S30)) * _MIX1
    x = (x ^ (x >> _S27)) * _MIX2
    return x ^ (x >> _S31)


def _uniform01(draws: Sequence[tuple[int, int]]) -> np.ndarray:
    """float64 [sum of counts] in [0, 1): for each ``(count, seed)`` in turn, the first
    ``count`` values of a counter-based stream keyed by ``seed``, all in one pass."""
    if len(draws) == 1:  # the common case, and a scalar key: a 1-element array costs 3x more
        ((count, seed),) = draws
        counters = np.arange(count, dtype=np.uint64)
        counters += _splitmix64(np.uint64(seed & _MASK))
    else:
        counts = np.array([count for count, _ in draws], dtype=np.int64)
        keys = _splitmix64(np.array([seed & _MASK for _, seed in draws], dtype=np.uint64))
        # Element j of draw i is counter (j - start_i) + key_i: one arange over all draws,
        # each draw's offset repeated over its span (wrapping modulo 2**64 as the key does).
        starts = (np.cumsum(counts) - counts).astype(np.uint64)
        counters = np.arange(counts.sum(), dtype=np.uint64)
        counters += np.repeat(keys - starts, counts)
    return (_splitmix64(counters) >> _S11).astype(np.float64) * 2.0**-53


def sample_latents(noise: str, n: int, latent_dim: int, seed: int) -> np.ndarray:
    """float32 [n, latent_dim]: N(0, 1) (``normal``) or U(-1, 1) (``uniform``) noise.

    Deliberately simple and portable rather than numpy's own generators: splitmix64 over a
    counter, Box-Muller for the normal. Element ``i`` of the row-major array depends only on
    ``(seed, i)``, so the first rows of a larger draw equal a smaller draw with the same seed,
    and a browser page reproduces it exactly (pipeline/serve/web/app.js does, with BigInt).
    """
    return sample_latents_many(noise, latent_dim, [(n, seed)])


def sample_latents_many(
    noise: str, latent_dim: int, draws: Sequence[tuple[int, int]]
) -> np.ndarray:
    """The :func:`sample_latents` of each ``(n, seed)`` in ``draws``, concatenated, in one
    pass: the service's batches draw every request's latents at once."""
    if noise not in NOISE_KINDS:
        raise ValueError(f"noise: got {noise!r}; allowed: {list(NOISE_KINDS)}")
    n = sum(rows for rows, _ in draws)
    with np.errstate(over="ignore"):
        if noise == "uniform":
            values = 2.0 * _uniform01([(rows * latent_dim, seed) for rows, seed in draws]) - 1.0
        else:  # two uniforms per value; each draw's count is even, so pairs never straddle
            u = _uniform01([(2 * rows * latent_dim, seed) for rows, seed in draws])
            u = u.reshape(n * latent_dim, 2)
            values = np.sqrt(-2.0 * np.log1p(-u[:, 0])) * np.cos(2.0 * math.pi * u[:, 1])
    return values.astype(np.float32).reshape(n, latent_dim)


# --------------------------------------------------------------------------- grids


def grid_columns(n: int, cycling: bool, num_classes: int = NUM_CLASSES) -> int:
    """Columns of a grid of ``n`` images: one digit per column when the labels cycle, else
    as square as possible."""
    return min(n, num_classes) if cycling else min(n, math.ceil(math.sqrt(n)))


GRID_PAD = 2  # white pixels between the digits of a grid make them readable


def tile(images: np.ndarray, cols: int, pad: int = 0, fill: float = 0) -> np.ndarray:
    """[n, h, w] -> one [rows*h, cols*w] image (plus ``pad`` pixels between cells and around
    them), row by row; gaps and the empty cells of the last row get ``fill``. Keeps the
    dtype, so uint8 in gives the bytes of a PNG and floats in give a float canvas."""
    images = np.asarray(images)
    n, height, width = images.shape
    rows = -(-n // cols)
    cell_h, cell_w = height + pad, width + pad
    canvas = np.full((rows * cell_h + pad, cols * cell_w + pad), fill, dtype=images.dtype)
    for index, image in enumerate(images):
        row, col = divmod(index, cols)
        canvas[pad + row * cell_h : pad + row * cell_h + height,
               pad + col * cell_w : pad + col * cell_w + width] = image  # fmt: skip
    return canvas
