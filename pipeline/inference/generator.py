"""Generate MNIST digits from ``models/generator.onnx`` with onnxruntime and numpy only.

This is the deployment path: it must never import TensorFlow (6 s of start-up and a
gigabyte of wheels for what is a few matrix products). Everything a consumer needs to
know about the model travels inside the ONNX file:

- input ``z`` float32 [N, latent_dim], plus ``label`` int64 [N] for conditional models;
- output ``image`` float32 [N, 28, 28, 1] already in [0, 1] (tanh/sigmoid scaling is
  folded into the graph at export);
- metadata_props ``latent_dim``, ``noise`` (normal | uniform), ``num_classes`` (0 when
  unconditional), plus provenance (preset, mlflow_run_id, params_hash, export_date).

Typical use::

    generator = Generator("models/generator.onnx")
    images = generator.generate(16, seed=0, digit=7)   # float32 [16, 28, 28] in [0, 1]
    Path("sevens.png").write_bytes(encode_png(images))
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from pipeline.core.images import (
    NOISE_KINDS,
    SIDE,
    grid_columns,
    labels_for,
    sample_latents,
    sample_latents_many,
    tile,
    to_uint8,
)
from pipeline.core.png import encode_gray

# What inference needs; the provenance keys (preset, mlflow_run_id, ...) are informational.
REQUIRED_METADATA = ("latent_dim", "noise", "num_classes")
# Where the weights were trained: the compute dtype and the CPU's ISA class (pipeline.core.cpu)
TRAINED_ON = ("compute_dtype", "cpu_isa")


class ModelError(RuntimeError):
    """The model file is missing, unreadable, or does not follow the generator contract."""


class InputError(ValueError):
    """A caller-supplied value is out of range; names the field, the value and what is allowed."""

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}: got {_short(value)}; allowed: {allowed}")


def _short(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"array of shape {list(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."  # room for a whole file path


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `digit=True` is a bug, not a request for a one.
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def session_options(threads: int = 1) -> ort.SessionOptions:
    """Options for a small CPU model: a few MFLOPs per image, so one thread per call is
    near the optimum and leaves the other cores to concurrent requests."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: warnings would drown CLI output
    return options


@dataclass(frozen=True, eq=False)  # eq=False: z is an array
class Draw:
    """One checked request for images: ``n`` of them from ``seed``'s latents, or from the
    explicit ``z`` when given, of ``digit`` (None: the digits in turn)."""

    n: int
    seed: int
    digit: int | None = None
    z: np.ndarray | None = None


class Generator:
    """An exported generator, loaded once; call :meth:`generate` as often as needed
    (onnxruntime sessions are safe to run from several threads)."""

    def __init__(self, path: str | Path, max_n: int = 1024, *, threads: int = 1) -> None:
        if not _is_int(max_n) or max_n < 1:
            raise InputError("max_n", max_n, "an integer >= 1")
        self.path = Path(path)
        self.max_n = int(max_n)
        if not self.path.is_file():
            raise ModelError(
                f"model file {self.path} not found; run `dvc repro export` (or pass --model)"
            )
        try:
            self._session = ort.InferenceSession(
                str(self.path), session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises a zoo of pybind11 types; unify them
            raise ModelError(
                f"model file {self.path} is not a loadable ONNX model ({_first_line(exc)})"
            ) from exc
        self.metadata: dict[str, str] = dict(self._session.get_modelmeta().custom_metadata_map)
        self.latent_dim, self.noise, self.num_classes = self._check_contract()
        self.conditional = self.num_classes > 0

    def _fail(self, problem: str) -> ModelError:
        return ModelError(f"model file {self.path} breaks the generator contract: {problem}")

    def _check_contract(self) -> tuple[int, str, int]:
        missing = [key for key in REQUIRED_METADATA if key not in self.metadata]
        if missing:
            raise self._fail(f"metadata_props lack {missing}")
        try:
            latent_dim = int(self.metadata["latent_dim"])
            num_classes = int(self.metadata["num_classes"])
        except ValueError:
            raise self._fail("metadata latent_dim and num_classes must be integers") from None
        noise = self.metadata["noise"]
        if latent_dim < 1 or num_classes < 0 or noise not in NOISE_KINDS:
            raise self._fail(
                f"metadata latent_dim={latent_dim} (>= 1), num_classes={num_classes} (>= 0), "
                f"noise={noise!r} ({' | '.join(NOISE_KINDS)})"
            )

        inputs = {node.name: node for node in self._session.get_inputs()}
        expected = {"z", "label"} if num_classes else {"z"}
        if set(inputs) != expected:
            raise self._fail(f"inputs are {sorted(inputs)}, expected {sorted(expected)}")
        z = inputs["z"]
        if z.type != "tensor(float)" or len(z.shape) != 2 or z.shape[1] != latent_dim:
            raise self._fail(f"input z is {z.type} {z.shape}, expected float32 [N, {latent_dim}]")
        label = inputs.get("label")
        if label is not None and (label.type != "tensor(int64)" or len(label.shape) != 1):
            raise self._fail(f"input label is {label.type} {label.shape}, expected int64 [N]")

        outputs = {node.name: node for node in self._session.get_outputs()}
        image = outputs.get("image")
        if image is None or image.type != "tensor(float)" or image.shape[1:] != [28, 28, 1]:
            found = [(node.name, node.type, node.shape) for node in outputs.values()]
            raise self._fail(f"outputs are {found}, expected image float32 [N, 28, 28, 1]")
        return latent_dim, noise, num_classes

    def sample_noise(self, n: int, seed: int | None = None) -> np.ndarray:
        """The noise the model was trained on: :func:`pipeline.core.images.sample_latents`, so a
        seed draws the same latents here as in evaluate, the service and the browser."""
        seed = secrets.randbits(53) if seed is None else seed
        return sample_latents(self.noise, n, self.latent_dim, seed)

    def columns(self, n: int, digit: int | None) -> int:
        """Grid columns for ``n`` images: one digit per column when the labels cycle."""
        cycling = self.conditional and digit is None
        return grid_columns(n, cycling, self.num_classes)

    def generate(
        self,
        n: int,
        *,
        seed: int | None = None,
        digit: int | None = None,
        z: np.ndarray | None = None,
    ) -> np.ndarray:
        """``n`` images as float32 [n, 28, 28] in [0, 1].

        ``seed`` makes the noise reproducible (None: fresh randomness); ``z`` replaces the
        sampled noise (float [n, latent_dim]). Conditional models draw ``digit`` when given,
        else the digits 0..9 in turn, so a 10-column grid shows one class per column.
        """
        return self.run(self.feeds([self.draw(n, seed=seed, digit=digit, z=z)]))

    def draw(
        self,
        n: int,
        *,
        seed: int | None = None,
        digit: int | None = None,
        z: np.ndarray | None = None,
    ) -> Draw:
        """The checked request of one :meth:`generate` call (see there), which
        :meth:`feeds` turns into model inputs, alone or with others."""
        if not _is_int(n) or not 1 <= n <= self.max_n:
            raise InputError("n", n, f"an integer from 1 to {self.max_n}")
        if seed is not None and (not _is_int(seed) or seed < 0):
            raise InputError("seed", seed, "an integer >= 0, or none for random noise")
        if digit is not None:
            if not self.conditional:
                raise InputError("digit", digit, "none: this model is unconditional")
            if not _is_int(digit) or not 0 <= digit < self.num_classes:
                raise InputError("digit", digit, f"an integer from 0 to {self.num_classes - 1}")
        if z is not None:
            z = self._check_z(z, n)
        return Draw(n, secrets.randbits(53) if seed is None else seed, digit, z)

    def feeds(self, draws: Sequence[Draw]) -> dict[str, np.ndarray]:
        """The model inputs (``z`` and, for conditional models, ``label``) of ``draws``,
        concatenated along the first axis for one :meth:`run`; the seeded latents of all of
        them are drawn in one pass (the service's dynamic batching runs many at once)."""
        seeded = [(draw.n, draw.seed) for draw in draws if draw.z is None]
        z = sample_latents_many(self.noise, self.latent_dim, seeded)
        if len(seeded) < len(draws):  # explicit z among them: each in its place
            drawn = iter(np.split(z, np.cumsum([n for n, _ in seeded])))
            z = np.concatenate([next(drawn) if draw.z is None else draw.z for draw in draws])
        feeds = {"z": z}
        if self.conditional:
            labels = [labels_for(draw.n, draw.digit, self.num_classes) for draw in draws]
            feeds["label"] = labels[0] if len(labels) == 1 else np.concatenate(labels)
        return feeds

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """float32 [N, 28, 28] in [0, 1] for :meth:`feeds` (N = their first axis)."""
        n = len(feeds["z"])
        try:
            (image,) = self._session.run(["image"], feeds)
        except Exception as exc:  # inputs are valid by now: the graph itself is broken
            raise ModelError(f"model file {self.path} failed to run ({_first_line(exc)})") from exc
        # The graph's scaling keeps values in [0, 1] up to float rounding; clip the rounding.
        return np.clip(image.reshape(n, SIDE, SIDE), 0.0, 1.0)

    def _check_z(self, z: Any, n: int) -> np.ndarray:
        allowed = f"a finite float array of shape [{n}, {self.latent_dim}]"
        if not isinstance(z, np.ndarray) or z.shape != (n, self.latent_dim):
            raise InputError("z", z, allowed)
        if not np.issubdtype(z.dtype, np.floating) or not np.isfinite(z).all():
            raise InputError("z", z, allowed)
        return z.astype(np.float32, copy=False)


def make_grid(
    images: np.ndarray, cols: int | None = None, *, pad: int = 0, scale: int = 1
) -> np.ndarray:
    """Tile [n, 28, 28] images (float in [0, 1] or uint8) row by row into one uint8 image,
    each pixel ``scale`` x ``scale``. With ``pad``, white gaps between and around the digits
    and in the last row's empty cells; without (the service's grids), those cells are black.
    Default: as square as possible."""
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[0] < 1:
        raise InputError("images", images, "an array of shape [n >= 1, height, width]")
    cols = grid_columns(len(images), cycling=False) if cols is None else cols
    if not _is_int(cols) or cols < 1:
        raise InputError("cols", cols, "an integer >= 1")
    if not _is_int(scale) or not 1 <= scale <= MAX_SCALE:
        raise InputError("scale", scale, f"an integer 1..{MAX_SCALE}")
    tiles = images if images.dtype == np.uint8 else to_uint8(images)
    grid = tile(tiles, min(cols, len(images)), pad=pad, fill=255 if pad else 0)
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


MAX_SCALE = 8  # screen pixels per digit pixel in a PNG grid: 224 x 224 per digit at most


def encode_png(
    images: np.ndarray, cols: int | None = None, *, pad: int = 0, scale: int = 1
) -> bytes:
    """A grayscale PNG of :func:`make_grid`."""
    return encode_gray(make_grid(images, cols, pad=pad, scale=scale))
