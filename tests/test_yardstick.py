"""The pinned yardstick: the committed classifier is the pinned one, anything else is refused
in one line, and it measures the same on any number of threads. onnxruntime only (seconds)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from pipeline.core.images import from_uint8
from pipeline.data.mnist import load_split
from pipeline.evaluation import yardstick
from pipeline.evaluation.yardstick import Yardstick, YardstickError


@pytest.fixture(scope="module")
def test_images(mnist_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_split(mnist_dir, "test")
    return from_uint8(images[:2000], "sigmoid"), labels[:2000]


def test_the_committed_file_is_the_pinned_one() -> None:
    assert yardstick.sha256_of(yardstick.PATH) == yardstick.SHA256
    assert yardstick.PATH.stat().st_size < 1024 * 1024  # small enough for git
    graph = onnx.load(str(yardstick.PATH)).graph
    assert [node.name for node in graph.input] == ["image"]
    assert sorted(node.name for node in graph.output) == ["features", "probs"]


def test_it_reads_real_digits(test_images: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = test_images
    embedding = Yardstick().embed(images, batch_size=700)
    assert embedding.features.shape == (2000, 128) and embedding.features.dtype == np.float32
    assert embedding.probs.shape == (2000, 10)
    np.testing.assert_allclose(embedding.probs.sum(axis=1), 1, atol=1e-5)
    assert np.mean(embedding.probs.argmax(axis=1) == labels) > 0.985


def test_threads_and_batches_change_nothing(test_images: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = test_images
    one = Yardstick(threads=1).embed(images, batch_size=1000)
    two = Yardstick(threads=2).embed(images, batch_size=1000)
    np.testing.assert_array_equal(one.features, two.features)
    np.testing.assert_array_equal(one.probs, two.probs)
    # Another batch size may block a matmul differently: equal to float rounding.
    other = Yardstick(threads=1).embed(images[..., 0], batch_size=333)
    np.testing.assert_allclose(other.features, one.features, rtol=1e-5, atol=1e-6)


def test_a_changed_file_is_refused_in_one_line(tmp_path: Path) -> None:
    copy = tmp_path / "classifier.onnx"
    data = bytearray(yardstick.PATH.read_bytes())
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    with pytest.raises(YardstickError) as caught:
        Yardstick(copy)
    message = str(caught.value)
    assert "\n" not in message
    assert f"pins {yardstick.SHA256[:12]}" in message and "make yardstick" in message
    with pytest.raises(YardstickError, match="missing"):
        Yardstick(tmp_path / "absent.onnx")


def test_another_pin_is_another_yardstick(tmp_path: Path) -> None:
    copy = tmp_path / "classifier.onnx"
    shutil.copy(yardstick.PATH, copy)
    assert Yardstick(copy).sha256 == yardstick.SHA256
    with pytest.raises(YardstickError, match="has SHA-256"):
        Yardstick(copy, expected="0" * 64)
    assert yardstick.label() == yardstick.SHA256[:12]


def test_real_reference_is_the_test_set_and_a_training_subset(mnist_dir: Path) -> None:
    reference = yardstick.real_reference(Yardstick(threads=0), mnist_dir, batch_size=1000)
    assert reference.test.features.shape == reference.train.features.shape == (10_000, 128)
    _, labels = load_split(mnist_dir, "test")
    np.testing.assert_array_equal(reference.test_labels, labels)
    # What `make yardstick` reported for the pinned file: 99.23% of the test digits (another
    # CPU's rounding may flip a borderline digit or two, no more).
    accuracy = np.mean(reference.test.probs.argmax(axis=1) == labels)
    assert accuracy == pytest.approx(0.9923, abs=2e-4)
