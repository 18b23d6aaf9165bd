"""pipeline.inference.generator: the ONNX-only generation library (no TensorFlow on this path)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from pipeline.core.params import Params
from pipeline.core.png import encode_gray
from pipeline.inference.generator import (
    Generator,
    InputError,
    ModelError,
    encode_png,
    make_grid,
    to_uint8,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def unconditional(onnx_generators: dict[str, Path]) -> Generator:
    return Generator(onnx_generators["unconditional"])


@pytest.fixture(scope="module")
def conditional(onnx_generators: dict[str, Path]) -> Generator:
    return Generator(onnx_generators["conditional"])


def test_contract_is_read_from_metadata(
    unconditional: Generator, conditional: Generator, smoke_params: Params
) -> None:
    latent = smoke_params.model.latent_dim
    assert (unconditional.latent_dim, unconditional.noise, unconditional.num_classes) == (
        latent,
        "uniform",
        0,
    )
    assert not unconditional.conditional
    assert (conditional.latent_dim, conditional.noise, conditional.num_classes) == (
        latent,
        "normal",
        10,
    )
    assert conditional.conditional
    assert conditional.metadata["preset"] == "smoke"


@pytest.mark.parametrize("name", ["unconditional", "conditional"])
def test_images_are_float32_in_unit_range(name: str, onnx_generators: dict[str, Path]) -> None:
    images = Generator(onnx_generators[name]).generate(7, seed=3)
    assert images.shape == (7, 28, 28)
    assert images.dtype == np.float32
    assert 0.0 <= images.min() < images.max() <= 1.0


def test_noise_matches_the_metadata(unconditional: Generator, conditional: Generator) -> None:
    uniform = unconditional.sample_noise(4096, seed=0)
    assert uniform.min() >= -1.0 and uniform.max() <= 1.0
    assert abs(uniform.std() - 1 / np.sqrt(3)) < 0.01  # std of U(-1, 1)
    normal = conditional.sample_noise(4096, seed=0)
    assert normal.min() < -2.5 and normal.max() > 2.5
    assert abs(normal.std() - 1.0) < 0.02


def test_seed_makes_noise_reproducible(conditional: Generator) -> None:
    same = conditional.generate(4, seed=11), conditional.generate(4, seed=11)
    np.testing.assert_array_equal(*same)
    assert not np.array_equal(conditional.generate(4, seed=11), conditional.generate(4, seed=12))
    # Unseeded calls draw fresh noise.
    assert not np.array_equal(conditional.generate(4), conditional.generate(4))


def test_user_z_replaces_sampled_noise(unconditional: Generator) -> None:
    z = unconditional.sample_noise(3, seed=5)
    np.testing.assert_array_equal(unconditional.generate(3, z=z), unconditional.generate(3, seed=5))
    np.testing.assert_array_equal(
        unconditional.generate(3, z=z.astype(np.float64)), unconditional.generate(3, seed=5)
    )


def test_conditional_labels(conditional: Generator) -> None:
    z = conditional.sample_noise(10, seed=0)
    cycled = conditional.generate(10, z=z)
    for digit in (0, 4, 9):
        alone = conditional.generate(1, z=z[digit : digit + 1], digit=digit)
        np.testing.assert_allclose(alone[0], cycled[digit], atol=1e-6)
    assert not np.allclose(
        conditional.generate(2, seed=0, digit=3), conditional.generate(2, seed=0, digit=8)
    )


@pytest.mark.parametrize(
    ("kwargs", "field", "allowed"),
    [
        ({"n": 0}, "n", "from 1 to 1024"),
        ({"n": 1025}, "n", "from 1 to 1024"),
        ({"n": 2.0}, "n", "from 1 to 1024"),
        ({"n": True}, "n", "from 1 to 1024"),
        ({"n": 2, "seed": -1}, "seed", ">= 0"),
        ({"n": 2, "digit": 10}, "digit", "from 0 to 9"),
        ({"n": 2, "digit": -1}, "digit", "from 0 to 9"),
        ({"n": 2, "digit": "7"}, "digit", "from 0 to 9"),
        # z as a function of the model's latent length n; {n} in the allowed text is n
        ({"n": 2, "z": lambda n: np.zeros((3, n), np.float32)}, "z", "shape [2, {n}]"),
        ({"n": 2, "z": lambda n: np.zeros((2, n - 1), np.float32)}, "z", "shape [2, {n}]"),
        ({"n": 2, "z": lambda n: np.zeros((2, n), np.int32)}, "z", "finite float"),
        ({"n": 2, "z": lambda n: np.full((2, n), np.nan, np.float32)}, "z", "finite float"),
        ({"n": 2, "z": lambda n: [[0.0] * n] * 2}, "z", "float array"),
    ],
)
def test_bad_input_names_field_value_and_allowed(
    conditional: Generator, kwargs: dict, field: str, allowed: str
) -> None:
    kwargs, allowed = dict(kwargs), allowed.format(n=conditional.latent_dim)
    if callable(kwargs.get("z")):
        kwargs["z"] = kwargs["z"](conditional.latent_dim)
    n = kwargs.pop("n")
    with pytest.raises(InputError) as caught:
        conditional.generate(n, **kwargs)
    error = caught.value
    assert error.field == field
    assert allowed in error.allowed
    assert str(error).startswith(f"{field}: got ")
    assert allowed in str(error)


def test_digit_is_refused_by_unconditional_models(unconditional: Generator) -> None:
    with pytest.raises(InputError, match="digit: got 3; allowed: none: this model is uncond"):
        unconditional.generate(2, digit=3)


def test_max_n_is_configurable(onnx_generators: dict[str, Path]) -> None:
    small = Generator(onnx_generators["unconditional"], max_n=4)
    assert small.generate(4, seed=0).shape == (4, 28, 28)
    with pytest.raises(InputError, match="from 1 to 4"):
        small.generate(5)


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        Generator(tmp_path / "nope.onnx")


def test_garbage_bytes(tmp_path: Path) -> None:
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\x00\xffthis is not a protobuf" * 50)
    with pytest.raises(ModelError, match="not a loadable ONNX model"):
        Generator(path)


def test_truncated_file(tmp_path: Path, onnx_generators: dict[str, Path]) -> None:
    data = onnx_generators["conditional"].read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="not a loadable ONNX model"):
        Generator(path)


def _identity_model(
    path: Path,
    metadata: dict[str, str],
    input_name: str = "z",
    input_shape: tuple = ("N", 100),
    output_shape: tuple = ("N", 28, 28, 1),
) -> Path:
    """A valid ONNX file that follows as much of the contract as the test wants."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", [input_name, "shape"], ["image"])],
        "g",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, list(output_shape))],
        initializer=[helper.make_tensor("shape", TensorProto.INT64, [4], [-1, 28, 28, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, metadata)
    onnx.save(model, path)
    return path


GOOD_METADATA = {"latent_dim": "784", "noise": "normal", "num_classes": "0"}


def test_hand_made_model_following_the_contract_loads(tmp_path: Path) -> None:
    path = _identity_model(tmp_path / "ok.onnx", GOOD_METADATA, input_shape=("N", 784))
    z = np.random.default_rng(0).random((2, 784), dtype=np.float32)
    np.testing.assert_array_equal(Generator(path).generate(2, z=z), z.reshape(2, 28, 28))


@pytest.mark.parametrize(
    ("metadata", "model_kwargs", "problem"),
    [
        ({}, {}, "metadata_props lack"),
        ({**GOOD_METADATA, "latent_dim": "many"}, {}, "must be integers"),
        ({**GOOD_METADATA, "noise": "pink"}, {}, "noise='pink'"),
        ({**GOOD_METADATA, "num_classes": "10"}, {}, "expected ['label', 'z']"),
        (GOOD_METADATA, {"input_name": "x"}, "inputs are ['x']"),
        (GOOD_METADATA, {"input_shape": ("N", 100)}, "expected float32 [N, 784]"),
        (GOOD_METADATA, {"output_shape": ("N", 784)}, "expected image float32 [N, 28, 28, 1]"),
    ],
)
def test_wrong_contract(tmp_path: Path, metadata: dict, model_kwargs: dict, problem: str) -> None:
    kwargs = {"input_shape": ("N", 784), **model_kwargs}
    path = _identity_model(tmp_path / "wrong.onnx", metadata, **kwargs)
    with pytest.raises(ModelError, match="breaks the generator contract") as caught:
        Generator(path)
    assert problem in str(caught.value)


def test_inference_path_never_imports_tensorflow() -> None:
    code = (
        "import sys, pipeline.inference.generator, pipeline.inference.generate\n"
        "import pipeline.serve.app\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'keras', 'tf2onnx', 'mlflow', 'PIL'))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_to_uint8_rounds_and_clips() -> None:
    values = np.array([-0.5, 0.0, 0.5, 1.0 / 255, 1.0, 1.5], dtype=np.float32)
    np.testing.assert_array_equal(to_uint8(values), [0, 0, 128, 1, 255, 255])
    assert to_uint8(values).dtype == np.uint8


def test_make_grid_places_images_row_by_row() -> None:
    images = np.stack([np.full((28, 28), value, np.uint8) for value in (10, 20, 30, 40, 50)])
    grid = make_grid(images, cols=2)
    assert grid.shape == (3 * 28, 2 * 28) and grid.dtype == np.uint8
    assert [grid[row * 28, col * 28] for row in range(3) for col in range(2)] == [
        10,
        20,
        30,
        40,
        50,
        0,  # empty cell
    ]
    assert make_grid(np.zeros((64, 28, 28), np.float32)).shape == (224, 224)
    with pytest.raises(InputError, match="cols"):
        make_grid(images, cols=0)


def test_encode_png_round_trips(conditional: Generator) -> None:
    images = conditional.generate(12, seed=0)
    decoded = np.asarray(Image.open(io.BytesIO(encode_png(images, cols=4))))
    np.testing.assert_array_equal(decoded, make_grid(images, cols=4))
    assert decoded.shape == (84, 112)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (56, 280)])
def test_png_writer_files_read_back_exactly(shape: tuple[int, int]) -> None:
    """Any PNG reader (Pillow here) gets the very pixels back, all 256 values included."""
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    pixels.flat[: min(256, pixels.size)] = np.arange(min(256, pixels.size))
    image = Image.open(io.BytesIO(encode_gray(pixels)))
    assert image.mode == "L" and image.size == shape[::-1]
    np.testing.assert_array_equal(np.asarray(image), pixels)


def test_png_writer_refuses_other_arrays_in_one_line() -> None:
    with pytest.raises(
        ValueError, match=r"^pixels: got float32 \[2, 2\]; allowed: uint8 \[h, w\]$"
    ):
        encode_gray(np.zeros((2, 2), np.float32))


def test_graph_that_fails_at_run_time(tmp_path: Path) -> None:
    """Metadata promises 10 classes, but the label embedding has only 5 rows."""
    nodes = [
        helper.make_node("Gather", ["table", "label"], ["code"]),
        helper.make_node("Add", ["z", "code"], ["sum"]),
        helper.make_node("Reshape", ["sum", "shape"], ["image"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 784]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
        ],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 28, 28, 1])],
        initializer=[
            helper.make_tensor("table", TensorProto.FLOAT, [5, 784], np.zeros(5 * 784)),
            helper.make_tensor("shape", TensorProto.INT64, [4], [-1, 28, 28, 1]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {**GOOD_METADATA, "num_classes": "10"})
    onnx.save(model, tmp_path / "five.onnx")
    generator = Generator(tmp_path / "five.onnx")
    assert generator.generate(2, seed=0, digit=4).shape == (2, 28, 28)
    with pytest.raises(ModelError, match="failed to run"):
        generator.generate(2, seed=0, digit=7)
