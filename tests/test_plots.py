"""Every picture is a valid PNG/GIF of the size DVC and MLflow will show."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.images import tile
from pipeline.evaluation.plots import (
    DPI,
    FIGSIZE,
    mosaic,
    plot_class_histogram,
    plot_digits,
    plot_samples,
    plot_training_curves,
    read_history,
    training_gif,
)

COLUMNS = ["epoch", "step", "d_loss", "g_loss", "d_real", "d_fake", "epoch_seconds", "images_per_s"]


def expected_size(name: str) -> tuple[int, int]:
    width, height = FIGSIZE[name]
    return round(width * DPI), round(height * DPI)


def assert_png(path: Path, name: str) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == expected_size(name)
        # Not a blank canvas: a figure has both ink and background.
        extrema = image.convert("L").getextrema()
        assert extrema[0] < 100 < extrema[1]


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).uniform(size=(100, 28, 28)).astype(np.float32)


def write_history(path: Path, rows: list[list[float]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return path


def test_history_is_averaged_per_epoch(tmp_path: Path) -> None:
    rows = [
        [1, 10, 1.0, 2.0, 0.9, 0.1, 5, 100],
        [1, 20, 3.0, 4.0, 0.7, 0.3, 5, 100],
        [2, 30, 0.5, 1.0, 0.6, 0.4, 4, 120],
    ]
    history = read_history(write_history(tmp_path / "h.csv", rows))
    assert history["epoch"].tolist() == [1, 2]
    assert history["d_loss"].tolist() == [2.0, 0.5]
    assert history["d_fake"].tolist() == pytest.approx([0.2, 0.4])


def test_empty_history_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no rows"):
        read_history(write_history(tmp_path / "h.csv", []))


def test_training_curves(tmp_path: Path) -> None:
    epochs = np.arange(1, 31)
    rows = [[e, 100 * e, 1 / e, 2 - 1 / e, 0.9 - e / 100, 0.1 + e / 100, 3, 1e4] for e in epochs]
    history = read_history(write_history(tmp_path / "h.csv", rows))
    assert_png(plot_training_curves(history, tmp_path / "curves.png"), "training_curves")


def test_mosaic_layout() -> None:
    tiles = np.stack([np.full((28, 28), value, np.float32) for value in (0.0, 0.5, 0.25)])
    canvas = mosaic(tiles, cols=2, pad=2)
    assert canvas.shape == (2 + 2 * 30, 2 + 2 * 30)
    assert canvas[2, 2] == 0.0 and canvas[2, 32] == 0.5 and canvas[32, 2] == 0.25
    assert canvas[32, 32] == 1.0  # the missing fourth cell stays blank


def test_sample_grid(tmp_path: Path, images: np.ndarray) -> None:
    assert_png(plot_samples(images, tmp_path / "samples.png", "Samples"), "samples")


def test_digit_grid_with_missing_digits(tmp_path: Path, images: np.ndarray) -> None:
    labels = np.arange(100) % 7  # digits 7, 8, 9 never occur
    path = plot_digits(images, labels, tmp_path / "digits.png", "By digit")
    assert_png(path, "digits")


def test_class_histogram(tmp_path: Path) -> None:
    generated = np.array([0.3, 0.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05])
    path = plot_class_histogram(generated, np.full(10, 0.1), tmp_path / "h.png", "Digits")
    assert_png(path, "class_histogram")


def test_training_gif(tmp_path: Path) -> None:
    samples = tmp_path / "samples"
    samples.mkdir()
    # Numeric order, not name order, and a stray file is ignored.
    for step, shade in ((500, 50), (1500, 250), (1000, 150)):
        Image.new("L", (122, 122), color=shade).save(samples / f"step_{step:07d}.png")
    (samples / "notes.txt").write_text("not a frame")
    path = training_gif(samples, tmp_path / "training.gif", {1000: 2})
    with Image.open(path) as gif:
        assert gif.format == "GIF"
        assert gif.n_frames == 3
        assert gif.info["loop"] == 0
        # 122 px grids are upscaled 3x to reach 320 px, plus the caption band.
        assert gif.size == (366, 366 + 28)
        shades = []
        for frame in range(3):
            gif.seek(frame)
            shades.append(gif.convert("L").getpixel((183, 200)))
    assert shades == [50, 150, 250]


def test_gif_keeps_the_gaps_of_a_training_grid(tmp_path: Path) -> None:
    # Training writes 2 x 2 grids of 28 px digits with 2 px white gaps (62 px, as
    # pipeline.training.train does through images.tile); the GIF upscales 6x to reach 320 px.
    grid = tile(np.zeros((4, 28, 28), np.uint8), cols=2, pad=2, fill=255)
    Image.fromarray(grid).save(tmp_path / "step_0000001.png")
    with Image.open(training_gif(tmp_path, tmp_path / "t.gif")) as gif:
        assert gif.size == (372, 372 + 28)
        frame = gif.convert("L")
        assert frame.getpixel((6 * 31, 28 + 6 * 10)) == 255  # the gap between columns
        assert frame.getpixel((6 * 10, 28 + 6 * 10)) == 0  # inside the first digit


def test_gif_without_grids_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no step_\*\.png"):
        training_gif(tmp_path, tmp_path / "training.gif")
