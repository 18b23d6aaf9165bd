"""The evaluate stage: a trained generator turned into numbers and pictures, so that two runs
are compared by ``dvc exp show``, ``dvc plots`` and the MLflow UI instead of by eye.

It draws ``eval.num_samples`` images with the fixed ``eval.seed`` (for a conditional model,
the digits 0-9 requested in turn), embeds them with the MNIST classifier, and compares them
with the real test set (pipeline/metrics.py). Beside every figure it reports the same figure
for the real test set against the training set: the floor a perfect generator would reach.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import plots
from pipeline.classifier import RealReference, embed
from pipeline.files import atomic_path, write_json
from pipeline.images import cycle_labels, sample_latents, to_unit
from pipeline.metrics import class_shares, compare
from pipeline.params import EvalParams, ModelParams, flatten

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Samples:
    images: np.ndarray  # float32 [N, 28, 28] in [0, 1]
    requested: np.ndarray | None  # int32 [N]: the digit asked for (conditional models only)


def generate_samples(
    generator: Any, model: ModelParams, num_samples: int, seed: int, batch_size: int
) -> Samples:
    """``num_samples`` images from fixed noise, rescaled from the training range to [0, 1]."""
    if len(generator.inputs) != 1 + model.conditional:
        raise ValueError(
            f"model.conditional: got {model.conditional}, but the generator takes "
            f"{len(generator.inputs)} input(s); allowed: the value it was trained with "
            "(retrain with dvc repro)"
        )
    z = sample_latents(model.noise, num_samples, model.latent_dim, seed)
    # Each digit requested equally often: any imbalance in the histogram is the model's.
    requested = cycle_labels(num_samples).astype(np.int32) if model.conditional else None
    batches = []
    for start in range(0, num_samples, batch_size):
        chunk = slice(start, start + batch_size)
        inputs = z[chunk] if requested is None else [z[chunk], requested[chunk]]
        batches.append(np.asarray(generator(inputs, training=False)))
    images = to_unit(np.concatenate(batches)[..., 0], model.output)
    return Samples(np.clip(images, 0.0, 1.0).astype(np.float32), requested)


def _write_shares(path: Path, generated: np.ndarray, real: np.ndarray) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["digit", "generated", "real"])
        writer.writerows(
            (digit, round(float(g), 6), round(float(r), 6))
            for digit, (g, r) in enumerate(zip(generated, real, strict=True))
        )


def evaluate(
    model: ModelParams, params: EvalParams, models_dir: Path, reports_dir: Path
) -> dict[str, Any]:
    """Write ``reports/metrics.json``, ``reports/class_shares.csv`` and ``reports/plots/``
    and log them into the training's MLflow run; returns the metrics."""
    import keras
    import mlflow

    from pipeline.tracking import open_run

    models_dir, reports_dir = Path(models_dir), Path(reports_dir)
    generator = keras.models.load_model(models_dir / "generator.keras", compile=False)
    classifier = keras.models.load_model(models_dir / "classifier.keras", compile=False)
    reference = RealReference.load(models_dir / "real_features.npz")

    samples = generate_samples(generator, model, params.num_samples, params.seed, params.batch_size)
    fake = embed(classifier, samples.images, params.batch_size)
    predicted = fake.probs.argmax(axis=1)
    k, batch = params.knn_k, params.batch_size
    metrics: dict[str, Any] = compare(fake.features, fake.probs, reference.test.features, k, batch)
    if samples.requested is not None:
        metrics["conditional_accuracy"] = float(np.mean(predicted == samples.requested))
    metrics["real"] = compare(
        reference.test.features, reference.test.probs, reference.train.features, k, batch
    )
    log.info("metrics: %s", json.dumps(metrics))

    reports_dir.mkdir(parents=True, exist_ok=True)
    generated_shares = class_shares(predicted)
    real_shares = class_shares(reference.test.probs.argmax(axis=1))
    _write_shares(reports_dir / "class_shares.csv", generated_shares, real_shares)
    figures = _draw(samples, predicted, generated_shares, real_shares, metrics, reports_dir)
    write_json(reports_dir / "metrics.json", metrics)

    with open_run(models_dir / "mlflow_run.json"):
        mlflow.log_metrics(flatten(metrics))
        mlflow.log_artifact(str(reports_dir / "metrics.json"))
        mlflow.log_artifact(str(reports_dir / "class_shares.csv"))
        for figure in figures:
            mlflow.log_artifact(str(figure), "plots")
    return metrics


def _draw(
    samples: Samples,
    predicted: np.ndarray,
    generated_shares: np.ndarray,
    real_shares: np.ndarray,
    metrics: dict[str, Any],
    reports_dir: Path,
) -> list[Path]:
    out = reports_dir / "plots"
    history = plots.read_history(reports_dir / "train_history.csv")
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
        plots.training_gif(reports_dir / "samples", out / "training.gif", epoch_of_step),
    ]
