"""Building the yardstick (pipeline/evaluation/yardstick.py): train the MNIST classifier
with TensorFlow, convert it to ONNX, measure it with onnxruntime, and pin the new file's SHA-256.

    make yardstick        # = python -m pipeline.evaluation.classifier --data data

Nothing in the pipeline runs this: evaluate uses the committed, pinned file, so a fresh clone
never retrains it and every machine measures with the same bytes. Run it when the classifier
itself should change, and commit ``yardstick/classifier.onnx`` with the new pin; numbers
measured under the old hash stay labelled with it.

The net: a small CNN (two conv blocks, a 128-unit feature layer, softmax over the ten digits),
about 225k parameters. Input float32 [N, 28, 28, 1] in [0, 1], whatever range a generator uses.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core import stage
from pipeline.core.errors import UserError
from pipeline.core.files import atomic_path
from pipeline.core.images import NUM_CLASSES, SHAPE, from_uint8
from pipeline.data.mnist import load_split
from pipeline.evaluation import yardstick

if TYPE_CHECKING:  # TensorFlow is imported lazily so that importing this module stays cheap.
    import keras
    import onnx

log = logging.getLogger(__name__)

FEATURES_LAYER = "features"
OPSET = 17


@dataclass(frozen=True)
class Recipe:
    """How the yardstick is trained: code, not params.yaml, because it is no experiment knob."""

    seed: int = 0
    epochs: int = 4  # 99.2% test accuracy; about 2 minutes on 2 quiet CPU cores
    batch_size: int = 128
    limit: int | None = None  # train on the first N images only (tests); None = all 60,000


@dataclass(frozen=True)
class Built:
    path: Path
    sha256: str
    test_accuracy: float  # measured on the ONNX file with onnxruntime, not on the Keras model
    train_seconds: float


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


def train_classifier(data_dir: Path, recipe: Recipe) -> tuple[keras.Model, float]:
    """The trained model and its training seconds (seeded, deterministic per machine)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(recipe.seed)
    tf.config.experimental.enable_op_determinism()
    images, labels = load_split(data_dir, "train")
    x_train = from_uint8(images[: recipe.limit], "sigmoid")
    y_train = labels[: recipe.limit].astype(np.int32)

    model = build_classifier()
    # Cosine decay to zero over the run: four epochs reach 99.2% test accuracy, where a
    # constant 1e-3 stays near 98.9%.
    steps = recipe.epochs * -(-len(x_train) // recipe.batch_size)
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(2e-3, steps)),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    log_epoch = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: log.info(
            "classifier epoch %d/%d: loss %.4f, accuracy %.4f",
            epoch + 1,
            recipe.epochs,
            logs["loss"],
            logs["accuracy"],
        )
    )
    start = time.perf_counter()
    model.fit(
        x_train,
        y_train,
        batch_size=recipe.batch_size,
        epochs=recipe.epochs,
        shuffle=True,
        verbose=0,
        callbacks=[log_epoch],
    )
    return model, time.perf_counter() - start


def to_onnx(model: keras.Model, recipe: Recipe) -> onnx.ModelProto:
    """The yardstick graph: ``image`` -> ``features``, ``probs`` (see yardstick.py).
    tf2onnx's ``from_keras`` does not understand Keras 3, so, as in pipeline/training/export.py, a
    ``tf.function`` with a named TensorSpec is converted with ``from_function``."""
    import keras
    import onnx
    import tensorflow as tf
    import tf2onnx

    both = keras.Model(model.inputs, [model.get_layer(FEATURES_LAYER).output, model.outputs[0]])
    signature = [tf.TensorSpec([None, *SHAPE], tf.float32, name="image")]

    @tf.function(input_signature=signature)
    def measure(image: tf.Tensor) -> dict[str, tf.Tensor]:
        features, probs = both(image, training=False)
        return {"features": features, "probs": probs}  # a dict names the graph outputs

    onnx_model, _ = tf2onnx.convert.from_function(measure, input_signature=signature, opset=OPSET)
    for value in [*onnx_model.graph.input, *onnx_model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    # No export date or host name: the same weights must give the same bytes.
    props = {"purpose": "mnist-gan yardstick", **{k: str(v) for k, v in asdict(recipe).items()}}
    onnx.helper.set_model_props(onnx_model, props)
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def measure_accuracy(path: Path, sha256: str, data_dir: Path) -> float:
    """Share of the 10,000 test digits the ONNX file reads correctly, with onnxruntime."""
    images, labels = load_split(data_dir, "test")
    measured = yardstick.Yardstick(path, sha256, threads=0)
    probs = measured.embed(from_uint8(images, "sigmoid"), batch_size=1000).probs
    return float(np.mean(probs.argmax(axis=1) == labels))


def build(data_dir: Path, out: Path, recipe: Recipe) -> Built:
    """Train, convert and check; ``out`` is written only once the ONNX file loads and runs."""
    model, seconds = train_classifier(data_dir, recipe)
    serialized = to_onnx(model, recipe).SerializeToString()
    with atomic_path(out) as temp:
        temp.write_bytes(serialized)
        sha256 = yardstick.sha256_of(temp)
        accuracy = measure_accuracy(temp, sha256, data_dir)
    return Built(out, sha256, accuracy, seconds)


def pin(sha256: str, module: Path = Path(yardstick.__file__)) -> None:
    """Rewrite the ``SHA256 = "..."`` line of evaluation/yardstick.py: the diff to commit."""
    source = module.read_text()
    line = re.compile(r'^SHA256 = "[0-9a-f]{64}"$', flags=re.M)
    pinned, count = line.subn(f'SHA256 = "{sha256}"', source)
    if count != 1:
        raise UserError(f'{module}: found {count} `SHA256 = "..."` lines; expected 1')
    with atomic_path(module) as temp:
        temp.write_text(pinned)


def main() -> None:
    parser = argparse.ArgumentParser(description="Rebuild and re-pin the evaluation classifier.")
    parser.add_argument("--data", type=Path, required=True, help="the download stage's folder")
    parser.add_argument("--out", type=Path, default=yardstick.PATH)
    parser.add_argument("--epochs", type=int, default=Recipe.epochs)
    parser.add_argument(
        "--no-pin", action="store_true", help="leave pipeline/evaluation/yardstick.py alone"
    )
    args = parser.parse_args()
    if args.epochs < 1:
        raise UserError(f"--epochs: got {args.epochs}; allowed: an integer >= 1")
    built = build(args.data, args.out, Recipe(epochs=args.epochs))
    if not args.no_pin:
        pin(built.sha256)
    log.info(
        "yardstick %s: test accuracy %.4f after %.1f s of training; SHA-256 %s%s",
        built.path,
        built.test_accuracy,
        built.train_seconds,
        built.sha256,
        "" if args.no_pin else " (pinned in pipeline/evaluation/yardstick.py: commit both)",
    )


if __name__ == "__main__":
    stage.run(main)
