"""The MNIST classifier that the evaluate stage measures generators with.

A small CNN (two conv blocks, a 128-unit feature layer, softmax over the ten digits). Its
softmax gives the classifier score and the digit histogram of generated samples; its
penultimate layer, named ``features``, is the embedding for the Fréchet distance and the
k-NN precision/recall, the way Inception-v3's pool layer is for FID on natural images.

It depends only on the data and its own params, so DVC trains it once and every experiment
reuses it. Training also embeds the real images once (the test set, and a same-sized
subset of the training set) so that evaluate can report real-vs-real figures as the floor
without touching the data.

Input convention: float32 [N, 28, 28, 1] in [0, 1], whatever range the generator uses.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.files import atomic_path, write_json
from pipeline.images import NUM_CLASSES, SHAPE, from_uint8
from pipeline.mnist import load_split
from pipeline.params import ClassifierParams

if TYPE_CHECKING:  # TensorFlow is imported lazily so that importing this module stays cheap.
    import keras

log = logging.getLogger(__name__)

FEATURES_LAYER = "features"


@dataclass(frozen=True)
class Embedding:
    """What the classifier sees in a set of images."""

    features: np.ndarray  # float32 [N, 128]: the penultimate layer
    probs: np.ndarray  # float32 [N, 10]: p(y | x)


@dataclass(frozen=True)
class RealReference:
    """The real images, embedded once: generated samples are compared with ``test``; the
    floor compares ``test`` with ``train`` (a seeded training subset of the same size)."""

    test: Embedding
    test_labels: np.ndarray  # uint8 [N]: the true digits
    train: Embedding

    def save(self, path: Path) -> None:
        arrays = {
            "test_features": self.test.features,
            "test_probs": self.test.probs,
            "test_labels": self.test_labels,
            "train_features": self.train.features,
            "train_probs": self.train.probs,
        }
        with atomic_path(path) as tmp:
            np.savez_compressed(tmp, allow_pickle=False, **arrays)

    @classmethod
    def load(cls, path: Path) -> RealReference:
        with np.load(path) as data:
            return cls(
                test=Embedding(data["test_features"], data["test_probs"]),
                test_labels=data["test_labels"],
                train=Embedding(data["train_features"], data["train_probs"]),
            )


@dataclass(frozen=True)
class TrainedClassifier:
    model: keras.Model
    test_accuracy: float
    train_images: int
    train_seconds: float
    reference: RealReference

    def save(self, models_dir: Path, reports_dir: Path) -> dict[str, float]:
        """``models/classifier.keras``, ``models/real_features.npz`` and the metrics in
        ``reports/classifier.json``, each written to a temp file and renamed into place."""
        models_dir.mkdir(parents=True, exist_ok=True)
        reports_dir.mkdir(parents=True, exist_ok=True)
        tmp = models_dir / ".partial-classifier.keras"  # Keras insists on the .keras suffix
        self.model.save(tmp)
        tmp.replace(models_dir / "classifier.keras")
        self.reference.save(models_dir / "real_features.npz")
        metrics = {
            "test_accuracy": self.test_accuracy,
            "train_images": self.train_images,
            "train_seconds": round(self.train_seconds, 1),
        }
        write_json(reports_dir / "classifier.json", metrics)
        return metrics


def build_classifier() -> keras.Model:
    import keras
    from keras import layers

    inputs = keras.Input(SHAPE, name="image")
    x = layers.Conv2D(32, 3, activation="relu")(inputs)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.25)(x)
    features = layers.Dense(128, activation="relu", name=FEATURES_LAYER)(x)
    x = layers.Dropout(0.3)(features)
    probs = layers.Dense(NUM_CLASSES, activation="softmax", name="probs")(x)
    return keras.Model(inputs, probs, name="mnist_classifier")


def embed(classifier: keras.Model, images: np.ndarray, batch_size: int) -> Embedding:
    """Features and class probabilities of float32 images in [0, 1]."""
    import keras

    shape = images.shape
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[1:] != (28, 28, 1):
        raise ValueError(f"images: got shape {shape}; expected [N, 28, 28] or [N, 28, 28, 1]")
    both = keras.Model(
        classifier.inputs, [classifier.get_layer(FEATURES_LAYER).output, classifier.outputs[0]]
    )
    features, probs = both.predict(images.astype(np.float32), batch_size=batch_size, verbose=0)
    return Embedding(features.astype(np.float32), probs.astype(np.float32))


def train_classifier(data_dir: Path, params: ClassifierParams) -> TrainedClassifier:
    """Train on the MNIST training set (seeded, deterministic), report test accuracy, and
    embed the real images the evaluate stage compares against."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(params.seed)
    tf.config.experimental.enable_op_determinism()

    train_images, train_labels = load_split(data_dir, "train")
    test_images, test_labels = load_split(data_dir, "test")
    x_train = from_uint8(train_images[: params.limit], "sigmoid")
    y_train = train_labels[: params.limit].astype(np.int32)
    x_test = from_uint8(test_images, "sigmoid")

    model = build_classifier()
    # Cosine decay to zero over the run: four epochs reach 99.2% test accuracy, where a
    # constant 1e-3 stays near 98.9%.
    steps = params.epochs * -(-len(x_train) // params.batch_size)
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(2e-3, steps)),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    log_epoch = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: log.info(
            "classifier epoch %d/%d: loss %.4f, accuracy %.4f",
            epoch + 1,
            params.epochs,
            logs["loss"],
            logs["accuracy"],
        )
    )
    start = time.perf_counter()
    model.fit(
        x_train,
        y_train,
        batch_size=params.batch_size,
        epochs=params.epochs,
        shuffle=True,
        verbose=0,
        callbacks=[log_epoch],
    )
    seconds = time.perf_counter() - start

    test = embed(model, x_test, batch_size=1000)
    accuracy = float(np.mean(test.probs.argmax(axis=1) == test_labels))
    log.info("classifier: test accuracy %.4f after %.1f s of training", accuracy, seconds)

    # The floor's reference set: as many training images as the test set has, drawn from
    # all 60,000 (not only the `limit` trained on), so the floor is real-vs-real data.
    chosen = np.random.default_rng(params.seed).choice(
        len(train_images), size=len(test_images), replace=False
    )
    train = embed(model, from_uint8(train_images[np.sort(chosen)], "sigmoid"), 1000)
    reference = RealReference(test, test_labels, train)
    return TrainedClassifier(model, accuracy, len(x_train), seconds, reference)
