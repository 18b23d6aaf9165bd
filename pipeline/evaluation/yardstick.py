"""The yardstick: the one MNIST classifier every evaluation measures generators with.

It is a file in the repo, ``yardstick/classifier.onnx``, whose SHA-256 is pinned below and
checked before every use, so every machine and every fresh clone scores a generator with the
same bytes (a classifier retrained per machine has the same accuracy but other features: the
same generator scored FID 3.76 under one machine's, 4.46 under another's). It runs with
onnxruntime only, no TensorFlow.

The graph: input ``image`` float32 [N, 28, 28, 1] in [0, 1]; outputs ``features`` float32
[N, 128] (the penultimate layer: the embedding for the Fréchet distance and the k-NN
precision/recall, as Inception-v3's pool layer is for FID on photos) and ``probs`` float32
[N, 10] (p(y | x): the classifier score, the digit shares, the conditional accuracy).

Rebuilding it (new training code, say) is one command, ``make yardstick``
(``python -m pipeline.evaluation.classifier``): it trains, converts, reports the test accuracy and
re-pins :data:`SHA256` here. Numbers measured under another hash belong in another column.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pipeline.core.errors import UserError
from pipeline.core.images import SHAPE, from_uint8
from pipeline.data.mnist import load_split
from pipeline.inference.generator import session_options

PATH = Path(__file__).resolve().parents[2] / "yardstick" / "classifier.onnx"
SHA256 = "0b951ba4a0446a0b42816c5d060f7ea84bff0cc3e6404220a52aafcdda70a0cf"
LABEL_CHARS = 12  # how much of the hash tables and metrics.json show, like a short git hash

# The floor's reference set: as many training images as the test set has, drawn by this seed.
REFERENCE_SEED = 0


def label(sha256: str = SHA256) -> str:
    """The short name of a yardstick: the first hex digits of its SHA-256."""
    return sha256[:LABEL_CHARS]


class YardstickError(UserError):
    """The classifier file is missing or is not the pinned one."""


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def verify(path: Path, expected: str = SHA256) -> bytes:
    """The file's bytes, if their SHA-256 is ``expected``; else one line saying what to do."""
    path = Path(path)
    if not path.is_file():
        raise YardstickError(f"yardstick: {path} is missing; restore it with `git checkout {path}`")
    data = path.read_bytes()
    found = hashlib.sha256(data).hexdigest()
    if found != expected:
        raise YardstickError(
            f"yardstick: {path} has SHA-256 {label(found)}..., but "
            f"pipeline/evaluation/yardstick.py pins "
            f"{label(expected)}...; restore the file (git checkout) or rebuild and re-pin it "
            "with `make yardstick`"
        )
    return data


@dataclass(frozen=True)
class Embedding:
    """What the classifier sees in a set of images."""

    features: np.ndarray  # float32 [N, 128]: the penultimate layer
    probs: np.ndarray  # float32 [N, 10]: p(y | x)


class Yardstick:
    """The verified classifier, loaded once. ``threads`` only changes the speed: the
    embeddings are identical on 1 and on several threads (tests/test_evaluate.py)."""

    def __init__(self, path: Path = PATH, expected: str = SHA256, *, threads: int = 1) -> None:
        self.sha256 = expected
        self._session = ort.InferenceSession(
            verify(path, expected), session_options(threads), providers=["CPUExecutionProvider"]
        )

    def embed(self, images: np.ndarray, batch_size: int) -> Embedding:
        """Features and class probabilities of float images in [0, 1], [N, 28, 28(, 1)]."""
        shape = images.shape
        if images.ndim == 3:
            images = images[..., None]
        if images.shape[1:] != SHAPE:
            raise ValueError(f"images: got shape {shape}; expected [N, 28, 28] or [N, 28, 28, 1]")
        images = images.astype(np.float32, copy=False)
        features, probs = [], []
        for start in range(0, len(images), batch_size):
            batch = {"image": images[start : start + batch_size]}
            f, p = self._session.run(["features", "probs"], batch)
            features.append(f)
            probs.append(p)
        return Embedding(np.concatenate(features), np.concatenate(probs))


@dataclass(frozen=True)
class RealReference:
    """The real images as the yardstick sees them: generated samples are compared with
    ``test``; the floor compares ``test`` with ``train`` (a seeded training subset of the
    same size, drawn from all 60,000). Computed at evaluate time from the verified MNIST
    files: deterministic, a few seconds, and 10 MB that need not live in git."""

    test: Embedding
    test_labels: np.ndarray  # uint8 [N]: the true digits
    train: Embedding


def real_reference(yardstick: Yardstick, data_dir: Path, batch_size: int) -> RealReference:
    train_images, _ = load_split(data_dir, "train")
    test_images, test_labels = load_split(data_dir, "test")
    chosen = np.random.default_rng(REFERENCE_SEED).choice(
        len(train_images), size=len(test_images), replace=False
    )
    test = yardstick.embed(from_uint8(test_images, "sigmoid"), batch_size)
    train = yardstick.embed(from_uint8(train_images[np.sort(chosen)], "sigmoid"), batch_size)
    return RealReference(test, test_labels, train)
