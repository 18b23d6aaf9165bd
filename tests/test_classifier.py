"""The MNIST classifier, trained on a small subset so the tests take seconds, not minutes
(the real run reaches > 99% test accuracy; see the README)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.classifier import (
    FEATURES_LAYER,
    RealReference,
    TrainedClassifier,
    build_classifier,
    embed,
    train_classifier,
)
from pipeline.metrics import classifier_score
from pipeline.mnist import load_split
from pipeline.params import ClassifierParams

REPO = Path(__file__).resolve().parent.parent
SUBSET = ClassifierParams(seed=0, epochs=3, batch_size=128, limit=8192)
TINY = ClassifierParams(seed=1, epochs=1, batch_size=64, limit=256)


@pytest.fixture(scope="module")
def trained(mnist_dir: Path) -> TrainedClassifier:
    return train_classifier(mnist_dir, SUBSET)


def test_shapes_and_feature_layer() -> None:
    model = build_classifier()
    assert model.get_layer(FEATURES_LAYER).output.shape == (None, 128)
    images = np.random.default_rng(0).uniform(size=(7, 28, 28)).astype(np.float32)
    embedding = embed(model, images, batch_size=3)
    assert embedding.features.shape == (7, 128)
    assert embedding.probs.shape == (7, 10)
    assert np.allclose(embedding.probs.sum(axis=1), 1, atol=1e-5)


def test_embed_names_the_expected_shape() -> None:
    with pytest.raises(ValueError, match=r"images: got shape \(4, 32, 32\); expected \[N, 28, 28"):
        embed(build_classifier(), np.zeros((4, 32, 32), np.float32), batch_size=4)


def test_subset_training_learns_and_embeds_the_reference(
    trained: TrainedClassifier, mnist_dir: Path
) -> None:
    assert trained.train_images == 8192
    assert trained.test_accuracy > 0.95  # 8,192 images, 3 epochs; the full run is > 0.99
    reference = trained.reference
    _, test_labels = load_split(mnist_dir, "test")
    assert np.array_equal(reference.test_labels, test_labels)
    for embedding in (reference.test, reference.train):
        assert embedding.features.shape == (10_000, 128)
        assert embedding.probs.shape == (10_000, 10)
    # The reported accuracy is that of the stored test-set probabilities.
    accuracy = np.mean(reference.test.probs.argmax(axis=1) == test_labels)
    assert accuracy == pytest.approx(trained.test_accuracy)


def test_classifier_score_of_the_real_test_set_is_near_its_true_value(
    trained: TrainedClassifier,
) -> None:
    # With perfect, confident predictions it would be exp(H(labels)) = 9.98.
    assert 8.5 < classifier_score(trained.reference.test.probs) < 9.98


def test_training_is_deterministic(mnist_dir: Path) -> None:
    first, again = (train_classifier(mnist_dir, TINY) for _ in range(2))
    for one, other in zip(first.model.get_weights(), again.model.get_weights(), strict=True):
        np.testing.assert_array_equal(one, other)
    np.testing.assert_array_equal(first.reference.train.features, again.reference.train.features)


def test_saved_files_load_without_pipeline_code(trained: TrainedClassifier, tmp_path: Path) -> None:
    metrics = trained.save(tmp_path / "models", tmp_path / "reports")
    report = json.loads((tmp_path / "reports" / "classifier.json").read_text())
    assert report == metrics
    assert report["test_accuracy"] == pytest.approx(trained.test_accuracy)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        "classifier.keras",
        "real_features.npz",
    ]  # no temp files left behind
    # A plain Keras file: a fresh interpreter loads it without importing pipeline/.
    script = (
        "import sys, keras, numpy as np; "
        "m = keras.models.load_model(sys.argv[1]); "
        "print(m.predict(np.zeros((2, 28, 28, 1)), verbose=0).shape)"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "models" / "classifier.keras")],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert loaded.stdout.strip().endswith("(2, 10)")
    reference = RealReference.load(tmp_path / "models" / "real_features.npz")
    np.testing.assert_array_equal(reference.test.features, trained.reference.test.features)
    np.testing.assert_array_equal(reference.train.probs, trained.reference.train.probs)


def test_stage_rejects_bad_params_before_training(tmp_path: Path, raw_params: dict) -> None:
    import yaml

    bad = {**raw_params, "classifier": {**raw_params["classifier"], "epochs": 0}}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(bad))
    result = subprocess.run(
        [sys.executable, "-m", "stages.classifier", "--params", str(params)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 1
    assert "classifier.epochs: got 0" in result.stderr
    assert not (tmp_path / "models").exists()
