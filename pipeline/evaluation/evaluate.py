"""The evaluate stage: the generator that ships turned into numbers and pictures, so that two
runs are compared by ``dvc exp show``, ``dvc plots`` and the MLflow UI instead of by eye.

It loads ``models/generator.onnx`` (the file the CLI, the service and the Docker image run)
through pipeline.inference.generator.Generator, draws ``eval.num_samples`` images with the
fixed ``eval.seed`` (the first ``n`` of them are what ``python -m
pipeline.inference.generate --seed`` draws; a conditional model is asked for the digits 0-9
in turn), embeds them with the pinned yardstick (pipeline/evaluation/yardstick.py) and
compares them with the real test set (pipeline/evaluation/metrics.py). Beside every figure
it reports the same figure for the real test set against the training set: the floor a
perfect generator would reach. onnxruntime and NumPy only: no TensorFlow.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.files import atomic_path, write_json
from pipeline.core.images import NUM_CLASSES, cycle_labels
from pipeline.core.params import EvalParams, flatten
from pipeline.evaluation import plots, yardstick
from pipeline.evaluation.metrics import class_shares, compare
from pipeline.inference.generator import TRAINED_ON, Generator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Paths:
    """Every file evaluate reads or writes; the stage passes each from dvc.yaml's cmd."""

    generator: Path  # models/generator.onnx
    yardstick: Path  # yardstick/classifier.onnx (verified against the pinned SHA-256)
    data: Path  # the verified MNIST files
    run_file: Path  # models/mlflow_run.json
    history: Path  # reports/train_history.csv
    samples: Path  # reports/samples (the training's sample grids)
    metrics: Path  # reports/metrics.json
    shares: Path  # reports/class_shares.csv
    plots: Path  # reports/plots/


@dataclass(frozen=True)
class Samples:
    images: np.ndarray  # float32 [N, 28, 28] in [0, 1]
    requested: np.ndarray | None  # int64 [N]: the digit asked for (conditional models only)


def generate_samples(generator: Generator, num_samples: int, seed: int, batch_size: int) -> Samples:
    """``num_samples`` images from the noise ``sample_latents`` draws for ``seed``.

    Batches hold a multiple of ten images, so the digits each batch asks for (0..9 in turn,
    restarting at 0) continue the cycle: image ``i`` asks for digit ``i % 10`` whatever the
    batch size, exactly as one large call would."""
    z = generator.sample_noise(num_samples, seed)
    step = max(NUM_CLASSES, batch_size - batch_size % NUM_CLASSES)
    batches = [
        generator.generate(len(chunk), z=chunk)
        for chunk in (z[start : start + step] for start in range(0, num_samples, step))
    ]
    requested = cycle_labels(num_samples) if generator.conditional else None
    return Samples(np.concatenate(batches), requested)


def measure(
    paths: Paths, params: EvalParams, threads: int = 0
) -> tuple[dict[str, Any], Samples, np.ndarray, np.ndarray]:
    """The numbers of one generator: (metrics, samples, predicted digit of each sample,
    predicted digit of each real test image). Reads files, writes none. ``threads`` (0:
    onnxruntime's choice) changes the speed, never the numbers."""
    measuring = yardstick.Yardstick(paths.yardstick, threads=threads)
    generator = Generator(paths.generator, max_n=params.batch_size + NUM_CLASSES, threads=threads)
    samples = generate_samples(generator, params.num_samples, params.seed, params.batch_size)
    fake = measuring.embed(samples.images, params.batch_size)
    reference = yardstick.real_reference(measuring, paths.data, params.batch_size)

    k, batch = params.knn_k, params.batch_size
    metrics: dict[str, Any] = compare(fake.features, fake.probs, reference.test.features, k, batch)
    predicted = fake.probs.argmax(axis=1)
    if samples.requested is not None:
        metrics["conditional_accuracy"] = float(np.mean(predicted == samples.requested))
    metrics["real"] = compare(
        reference.test.features, reference.test.probs, reference.train.features, k, batch
    )
    # Which classifier measured these numbers: FIDs under another hash are not comparable.
    metrics["yardstick"] = yardstick.label(measuring.sha256)
    # Where the generator was trained (float32 and bfloat16 runs differ; the export copied
    # it from the training's run file): "unknown" for models exported before it was.
    for key in TRAINED_ON:
        metrics[key] = generator.metadata.get(key, "unknown")
    return metrics, samples, predicted, reference.test.probs.argmax(axis=1)


def _write_shares(path: Path, generated: np.ndarray, real: np.ndarray) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["digit", "generated", "real"])
        writer.writerows(
            (digit, round(float(g), 6), round(float(r), 6))
            for digit, (g, r) in enumerate(zip(generated, real, strict=True))
        )


def evaluate(paths: Paths, params: EvalParams, threads: int = 0) -> dict[str, Any]:
    """Write the metrics, the class shares and the plots, and log them into the training's
    MLflow run (tag ``yardstick``: the classifier's hash); returns the metrics."""
    import mlflow

    from pipeline.tracking.runs import open_run

    metrics, samples, predicted, real_predicted = measure(paths, params, threads)
    log.info("metrics: %s", json.dumps(metrics))

    generated_shares, real_shares = class_shares(predicted), class_shares(real_predicted)
    _write_shares(paths.shares, generated_shares, real_shares)
    figures = _draw(samples, predicted, generated_shares, real_shares, metrics, paths)
    write_json(paths.metrics, metrics)

    numbers = {key: value for key, value in metrics.items() if not isinstance(value, str)}
    measured_with = yardstick.SHA256  # verified by Yardstick before anything was measured
    with open_run(paths.run_file):
        mlflow.set_tag("yardstick", measured_with)
        mlflow.log_metrics(flatten(numbers))
        mlflow.log_artifact(str(paths.metrics))
        mlflow.log_artifact(str(paths.shares))
        for figure in figures:
            mlflow.log_artifact(str(figure), "plots")
    return metrics


def _draw(
    samples: Samples,
    predicted: np.ndarray,
    generated_shares: np.ndarray,
    real_shares: np.ndarray,
    metrics: dict[str, Any],
    paths: Paths,
) -> list[Path]:
    out = paths.plots
    history = plots.read_history(paths.history)
    epoch_of_step = dict(zip(history["step"].astype(int), history["epoch"], strict=True))
    n = len(samples.images)
    if samples.requested is None:
        by_digit, how = predicted, "as the classifier labels them"
    else:
        by_digit, how = samples.requested, "as requested"
    return [
        plots.plot_training_curves(history, out / "training_curves.png"),
        plots.plot_samples(samples.images, out / "samples.png", f"Generated samples (64 of {n:,})"),
        plots.plot_digits(samples.images, by_digit, out / "digits.png", f"Generated digits, {how}"),
        plots.plot_class_histogram(
            generated_shares,
            real_shares,
            out / "class_histogram.png",
            f"Digits among {n:,} samples: {metrics['classes_present']} of 10 present, "
            f"KL from uniform {metrics['class_kl']:.3f}",
        ),
        plots.training_gif(paths.samples, out / "training.gif", epoch_of_step),
    ]
