"""Generate digits from the exported ONNX generator: onnxruntime and numpy only.

    python -m pipeline.inference.generate --model models/generator.onnx --n 64 --out grid.png
    python -m pipeline.inference.generate --n 10 --digit 7 --out sevens.npy   # float32 [10, 28, 28]

Starts in well under a second because it never imports TensorFlow. Bad input exits with
status 2 and one line naming the field, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from pathlib import Path
from typing import NoReturn

import numpy as np

from pipeline.core.files import atomic_path
from pipeline.core.images import GRID_PAD
from pipeline.inference.generator import (
    MAX_SCALE,
    Generator,
    InputError,
    ModelError,
    encode_png,
)

log = logging.getLogger(__name__)

SUFFIXES = (".png", ".npy")


def write_samples(
    model: Path,
    out: Path,
    n: int,
    *,
    seed: int | None = None,
    digit: int | None = None,
    cols: int | None = None,
    scale: int = 1,
) -> np.ndarray:
    """Generate ``n`` images and write them to ``out``: a PNG grid (white gaps between the
    digits, as in the training and evaluation grids; each pixel ``scale`` x ``scale``), or
    the float32 [n, 28, 28] array for ``.npy``. Written to a temp file and renamed, so ``out`` is
    either the old file or the complete new one."""
    if out.suffix not in SUFFIXES:
        raise InputError("out", str(out), f"a path ending in {' or '.join(SUFFIXES)}")
    if not 1 <= scale <= MAX_SCALE:  # before loading the model: bad input costs nothing
        raise InputError("scale", scale, f"an integer 1..{MAX_SCALE}")
    generator = Generator(model)
    images = generator.generate(n, seed=seed, digit=digit)
    if out.suffix == ".png":
        data = encode_png(images, cols or generator.columns(n, digit), pad=GRID_PAD, scale=scale)
    else:
        buffer = io.BytesIO()
        np.save(buffer, images)
        data = buffer.getvalue()
    with atomic_path(out) as temp:
        temp.write_bytes(data)
    log.info("wrote %d images to %s", n, out)
    return images


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse prints the whole usage block by default
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _OneLineParser(
        prog="python -m pipeline.inference.generate",
        description="Generate MNIST digits from an exported ONNX generator.",
    )
    parser.add_argument("--model", type=Path, default=Path("models/generator.onnx"))
    parser.add_argument("--n", type=int, default=64, help="number of images (1..1024)")
    parser.add_argument("--seed", type=int, default=None, help="noise seed; omit for random")
    parser.add_argument("--digit", type=int, default=None, help="0..9, conditional models only")
    parser.add_argument("--cols", type=int, default=None, help="grid columns (PNG only)")
    parser.add_argument(
        "--scale", type=int, default=1, help=f"screen pixels per pixel, 1..{MAX_SCALE} (PNG only)"
    )
    parser.add_argument("--out", type=Path, required=True, help="grid.png or images.npy")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        write_samples(
            args.model, args.out, args.n, seed=args.seed, digit=args.digit, cols=args.cols,
            scale=args.scale,
        )  # fmt: skip
    except (InputError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
