"""The pictures of an evaluation: PNG figures (Matplotlib's object API on the Agg canvas, so
no pyplot global state and no display needed) and a GIF of training (Pillow).

Every figure has a fixed size in pixels (``FIGSIZE`` x ``DPI``), so DVC and MLflow show
runs side by side at the same scale.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

from pipeline.core.files import atomic_path
from pipeline.core.images import NUM_CLASSES, tile

DPI = 100
FIGSIZE = {
    "training_curves": (10, 4),
    "samples": (6, 6.4),
    "digits": (6.4, 6.4),
    "class_histogram": (7, 4),
}
EMPTY_CELL = 0.35  # grey: neither ink (white) nor background (black)
GIF_MIN_WIDTH = 320  # small grids (4 x 4 of 28 px) are upscaled to at least this
GIF_CAPTION_HEIGHT = 28
STEP_FILE = re.compile(r"step_(\d+)\.png")


def _save(figure: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=DPI)
    return path


def read_history(path: Path) -> dict[str, np.ndarray]:
    """train_history.csv as columns, averaged per epoch (one point per epoch whether the
    trainer logged each step or each epoch)."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{path}: no rows; expected the columns epoch,step,d_loss,g_loss,...")
    columns = {name: np.array([float(row[name]) for row in rows]) for name in rows[0]}
    epochs = np.unique(columns["epoch"])
    return {
        name: np.array([values[columns["epoch"] == epoch].mean() for epoch in epochs])
        for name, values in columns.items()
    }


def plot_training_curves(history: dict[str, np.ndarray], path: Path) -> Path:
    """Losses and discriminator outputs per epoch."""
    figure = Figure(figsize=FIGSIZE["training_curves"], layout="constrained")
    losses, outputs = figure.subplots(1, 2)
    epoch = history["epoch"]
    style = {"marker": "o" if len(epoch) < 20 else None, "linewidth": 1.8}
    losses.plot(epoch, history["d_loss"], label="discriminator", color="tab:red", **style)
    losses.plot(epoch, history["g_loss"], label="generator", color="tab:blue", **style)
    losses.set(title="Losses", xlabel="epoch", ylabel="loss (mean over the epoch)")
    outputs.plot(epoch, history["d_real"], label="D(x), real", color="tab:green", **style)
    outputs.plot(epoch, history["d_fake"], label="D(G(z)), generated", color="tab:purple", **style)
    # At the GAN's equilibrium D cannot tell them apart and says 0.5 to both.
    outputs.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="equilibrium (0.5)")
    outputs.set(
        title="Discriminator outputs",
        xlabel="epoch",
        ylabel="mean probability 'real'",
        ylim=(-0.02, 1.02),
    )
    for axes in (losses, outputs):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend(framealpha=0.9)
    figure.suptitle("Training, per epoch", fontweight="bold")
    return _save(figure, path)


def mosaic(images: np.ndarray, cols: int, pad: int = 2) -> np.ndarray:
    """[N, 28, 28] in [0, 1] -> one white canvas, ``cols`` per row, ``pad`` pixels between."""
    return tile(np.asarray(images, np.float32), cols, pad=pad, fill=1.0)


def _show(axes, canvas: np.ndarray) -> None:
    # White ink on black, as MNIST is stored; nearest keeps the pixels honest when scaled.
    axes.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes.set_xticks([])
    axes.set_yticks([])


def plot_samples(images: np.ndarray, path: Path, title: str) -> Path:
    """The first 64 images as an 8 x 8 grid."""
    figure = Figure(figsize=FIGSIZE["samples"], layout="constrained")
    axes = figure.subplots()
    _show(axes, mosaic(images[:64], cols=8))
    axes.set_title(title)
    return _save(figure, path)


def plot_digits(
    images: np.ndarray, labels: np.ndarray, path: Path, title: str, per_digit: int = 10
) -> Path:
    """A row per digit: the first ``per_digit`` images with that label. Rows of digits the
    generator rarely makes leave grey empty cells and their count beside the row: the
    point of the figure is to make a missing mode obvious."""
    height = images.shape[1]
    cells = np.full((NUM_CLASSES * per_digit, *images.shape[1:3]), EMPTY_CELL, np.float32)
    found = []
    for digit in range(NUM_CLASSES):
        chosen = images[labels == digit][:per_digit]
        cells[digit * per_digit : digit * per_digit + len(chosen)] = chosen
        found.append(len(chosen))
    figure = Figure(figsize=FIGSIZE["digits"], layout="constrained")
    axes = figure.subplots()
    _show(axes, mosaic(cells, cols=per_digit))
    centres = [2 + digit * (height + 2) + height / 2 for digit in range(NUM_CLASSES)]
    axes.set_yticks(
        centres, [f"{d}" if n == per_digit else f"{d} ({n})" for d, n in enumerate(found)]
    )
    axes.tick_params(axis="y", length=0, labelsize=11)
    axes.set_ylabel(f"digit (count when fewer than {per_digit})")
    axes.set_title(title)
    return _save(figure, path)


def plot_class_histogram(generated: np.ndarray, real: np.ndarray, path: Path, title: str) -> Path:
    """Share of each digit among generated samples, beside the real test set's."""
    figure = Figure(figsize=FIGSIZE["class_histogram"], layout="constrained")
    axes = figure.subplots()
    digits = np.arange(len(generated))
    axes.bar(digits - 0.2, generated, width=0.4, label="generated", color="tab:blue")
    axes.bar(digits + 0.2, real, width=0.4, label="real test set", color="tab:grey")
    axes.axhline(1 / len(generated), color="black", linestyle="--", linewidth=1, label="uniform")
    axes.set(
        title=title,
        xlabel="digit (as the classifier labels it)",
        ylabel="share of images",
        xticks=digits,
    )
    axes.set_ylim(0, max(generated.max(), real.max()) * 1.2)  # headroom for the legend
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="upper center", ncols=3, framealpha=0.9)
    return _save(figure, path)


def step_files(samples_dir: Path) -> list[tuple[int, Path]]:
    """The fixed-noise grids training wrote, ``(step, path)`` in step order."""
    found = [(STEP_FILE.fullmatch(p.name), p) for p in samples_dir.glob("step_*.png")]
    return sorted((int(match.group(1)), path) for match, path in found if match)


def training_gif(
    samples_dir: Path, path: Path, epoch_of_step: dict[int, float] | None = None
) -> Path:
    """An animated GIF of the fixed-noise grids, captioned with the step (and epoch)."""
    steps = step_files(samples_dir)
    if not steps:
        raise ValueError(f"{samples_dir}: no step_*.png sample grids to animate")
    font = ImageFont.load_default(size=16)
    frames = []
    for step, source in steps:
        with Image.open(source) as image:
            scale = max(1, -(-GIF_MIN_WIDTH // image.width))
            size = (image.width * scale, image.height * scale)
            grid = image.convert("L").resize(size, Image.Resampling.NEAREST)
        frame = Image.new("L", (grid.width, grid.height + GIF_CAPTION_HEIGHT), color=255)
        frame.paste(grid, (0, GIF_CAPTION_HEIGHT))
        caption = f"step {step:,}"
        if epoch_of_step and step in epoch_of_step:
            caption = f"epoch {epoch_of_step[step]:g}  ·  {caption}"
        ImageDraw.Draw(frame).text((8, 5), caption, fill=0, font=font)
        frames.append(frame)
    # A beat on each frame, and a long pause on the last so the result can be seen.
    durations = [300] * (len(frames) - 1) + [2000]
    with atomic_path(path) as tmp:
        frames[0].save(tmp, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return path
