"""`python -m pipeline.inference.generate` end to end, in a subprocess, on exported smoke models."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.images import GRID_PAD
from pipeline.inference.generator import Generator, make_grid

REPO = Path(__file__).resolve().parent.parent


def generate(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.inference.generate", *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_png_grid(tmp_path: Path, onnx_generators: dict[str, Path]) -> None:
    model = onnx_generators["conditional"]
    out = tmp_path / "out" / "grid.png"
    result = generate("--model", model, "--n", 12, "--seed", 0, "--digit", 7, "--out", out)
    assert result.returncode == 0, result.stderr
    expected = Generator(model).generate(12, seed=0, digit=7)
    grid = np.asarray(Image.open(io.BytesIO(out.read_bytes())))
    np.testing.assert_array_equal(grid, make_grid(expected, pad=GRID_PAD))
    # white gaps between and around the digits, as in the training and evaluation grids
    assert grid.shape == (3 * 28 + 4 * GRID_PAD, 4 * 28 + 5 * GRID_PAD)
    assert (grid[:GRID_PAD] == 255).all() and (
        grid[:, 28 + GRID_PAD : 28 + 2 * GRID_PAD] == 255
    ).all()
    assert [path.name for path in out.parent.iterdir()] == ["grid.png"]  # no temp file left

    big = tmp_path / "big.png"
    result = generate(
        "--model", model, "--n", 12, "--seed", 0, "--digit", 7, "--scale", 3, "--out", big
    )
    assert result.returncode == 0, result.stderr
    scaled = np.asarray(Image.open(big))
    assert scaled.shape == (3 * grid.shape[0], 3 * grid.shape[1])
    np.testing.assert_array_equal(scaled[::3, ::3], grid)  # each pixel a 3 x 3 block
    np.testing.assert_array_equal(scaled[2::3, 1::3], grid)


def test_npy_array_and_one_digit_per_column(tmp_path: Path, onnx_generators: dict) -> None:
    model = onnx_generators["conditional"]
    out = tmp_path / "images.npy"
    assert generate("--model", model, "--n", 20, "--seed", 4, "--out", out).returncode == 0
    images = np.load(out)
    assert images.dtype == np.float32 and images.shape == (20, 28, 28)
    np.testing.assert_array_equal(images, Generator(model).generate(20, seed=4))
    # Without --digit a conditional grid has 10 columns: one digit per column.
    png = tmp_path / "grid.png"
    assert generate("--model", model, "--n", 20, "--seed", 4, "--out", png).returncode == 0
    assert Image.open(png).size == (10 * 28 + 11 * GRID_PAD, 2 * 28 + 3 * GRID_PAD)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--n", "0"], "n: got 0; allowed: an integer from 1 to 1024"),
        (["--n", "5000"], "n: got 5000; allowed: an integer from 1 to 1024"),
        (["--n", "many"], "argument --n: invalid int value: 'many'"),
        (["--seed", "-3"], "seed: got -3; allowed: an integer >= 0"),
        (["--scale", "9"], "scale: got 9; allowed: an integer 1..8"),
        (["--digit", "3"], "digit: got 3; allowed: none: this model is unconditional"),
        (["--out", "{tmp}/grid.jpg"], "out: got '{tmp}/grid.jpg'; allowed: a path ending in .png"),
        (["--model", "{tmp}/missing.onnx"], "model file {tmp}/missing.onnx not found"),
        (["--model", "{tmp}/garbage.onnx"], "is not a loadable ONNX model"),
    ],
    ids=[
        "n-zero",
        "n-too-big",
        "n-not-int",
        "seed",
        "scale",
        "digit-unconditional",
        "out",
        "missing",
        "garbage",
    ],
)
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, onnx_generators: dict, args: list[str], expected: str
) -> None:
    (tmp_path / "garbage.onnx").write_bytes(b"not onnx at all")
    defaults = {"--model": str(onnx_generators["unconditional"]), "--out": f"{tmp_path}/x.png"}
    given = [arg.format(tmp=tmp_path) for arg in args]
    for flag, value in defaults.items():
        if flag not in given:
            given += [flag, value]
    result = generate(*given)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert expected.format(tmp=tmp_path) in lines[0]
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("name", ["conditional", "unconditional"])
def test_a_seed_draws_the_same_digits_in_the_cli_and_the_service(
    tmp_path: Path, onnx_generators: dict[str, Path], name: str
) -> None:
    """One sampler (pipeline.core.images.sample_latents): `--seed 3` here is `?seed=3` there."""
    from fastapi.testclient import TestClient

    from pipeline.serve.app import Settings, create_app

    model, out = onnx_generators[name], tmp_path / "three.npy"
    assert generate("--model", model, "--n", 6, "--seed", 3, "--out", out).returncode == 0
    with TestClient(create_app(Settings(model=model))) as client:
        query = {"n": 6, "seed": 3, "format": "json", "dtype": "float32"}
        served = client.get("/generate", params=query).json()["images"]
    np.testing.assert_allclose(np.load(out), np.asarray(served, np.float32), rtol=0, atol=1e-6)
