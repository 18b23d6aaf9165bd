"""pipeline.training.export and the export stage: the ONNX contract, parity with TensorFlow, checks
that refuse a bad graph, and the model logged into the training's MLflow run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import keras
import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tensorflow as tf
import yaml
from mlflow.tracking import MlflowClient

from pipeline.core.params import Params
from pipeline.inference.generator import Generator
from pipeline.training.export import ExportError, check_export, export_model, float32_generator
from pipeline.training.models import build_generator, dtype_policy

REPO = Path(__file__).resolve().parent.parent
METADATA_KEYS = {
    "latent_dim",
    "noise",
    "num_classes",
    "preset",
    "mlflow_run_id",
    "params_hash",
    "export_date",
    "compute_dtype",
    "cpu_isa",
}


def _variant(params: Params, **model: object) -> Params:
    return params.model_copy(update={"model": params.model.model_copy(update=model)})


def _dims(value: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


# What tests/conftest.py's onnx_generators fixture exported.
FIXTURE_VARIANTS = {
    "unconditional": {"conditional": False, "output": "sigmoid", "noise": "uniform"},
    "conditional": {"conditional": True, "output": "tanh", "noise": "normal"},
}


@pytest.mark.parametrize("name", list(FIXTURE_VARIANTS))
def test_onnx_contract(name: str, onnx_generators: dict[str, Path], smoke_params: Params) -> None:
    params = _variant(smoke_params, **FIXTURE_VARIANTS[name])
    model = onnx.load(onnx_generators[name])
    onnx.checker.check_model(model, full_check=True)
    inputs = {value.name: value for value in model.graph.input}
    assert set(inputs) == ({"z", "label"} if params.model.conditional else {"z"})
    assert inputs["z"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert _dims(inputs["z"]) == ["N", params.model.latent_dim]  # dynamic batch
    if params.model.conditional:
        assert inputs["label"].type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert _dims(inputs["label"]) == ["N"]
    (output,) = model.graph.output
    assert output.name == "image"
    assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert _dims(output) == ["N", 28, 28, 1]
    assert [op.version for op in model.opset_import if op.domain in ("", "ai.onnx")] == [17]

    metadata = {prop.key: prop.value for prop in model.metadata_props}
    assert set(metadata) == METADATA_KEYS
    assert metadata["latent_dim"] == str(params.model.latent_dim)
    assert metadata["noise"] == params.model.noise
    assert metadata["num_classes"] == ("10" if params.model.conditional else "0")
    assert metadata["preset"] == "smoke"
    assert metadata["mlflow_run_id"] == "test-run"
    assert metadata["params_hash"] == params.digest("model", "loss", "train")
    assert metadata["export_date"].startswith("20")
    # where it was trained: from the run file; a model exported without one says so
    assert metadata["compute_dtype"] == metadata["cpu_isa"] == "unknown"


def test_no_elementwise_op_over_a_trailing_dimension_of_one(
    onnx_generators: dict[str, Path],
) -> None:
    """onnxruntime broadcasts over a trailing dimension of 1 one element at a time: the
    tanh output's scaling to [0, 1] on [N, 28, 28, 1] once took two thirds of the
    generator's run time."""
    model = onnx.shape_inference.infer_shapes(onnx.load(onnx_generators["conditional"]))
    shapes = {value.name: _dims(value) for value in model.graph.value_info}
    elementwise = [node for node in model.graph.node if node.op_type in {"Add", "Mul"}]
    assert len(elementwise) >= 2  # at least the scaling's add and multiply
    for node in elementwise:
        for name in node.input:
            assert shapes.get(name, [0])[-1:] != [1], (node.op_type, name, shapes.get(name))


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("output", ["tanh", "sigmoid"])
def test_parity_with_tensorflow(
    tmp_path: Path, smoke_params: Params, conditional: bool, output: str
) -> None:
    params = _variant(smoke_params, conditional=conditional, output=output)
    keras.utils.set_random_seed(1)
    generator = build_generator(params.model)
    path = tmp_path / "generator.onnx"
    report = export_model(generator, params, path)
    assert 0 <= report["parity_max_abs_diff"] <= params.export.parity_tol

    # Independently of the exporter's own check: raw onnxruntime with random labels.
    rng = np.random.default_rng(7)
    z = rng.standard_normal((33, params.model.latent_dim), dtype=np.float32)
    labels = rng.integers(0, 10, 33)
    feeds = {"z": z, "label": labels} if conditional else {"z": z}
    (onnx_image,) = ort.InferenceSession(path).run(["image"], feeds)
    tf_image = keras.ops.convert_to_numpy(
        generator([z, labels.astype(np.int32)] if conditional else z)
    )
    expected = (tf_image + 1) / 2 if output == "tanh" else tf_image
    np.testing.assert_allclose(onnx_image, expected, atol=params.export.parity_tol)
    assert onnx_image.min() >= 0 and onnx_image.max() <= 1


def test_a_generator_trained_in_bfloat16_exports_in_float32(
    tmp_path: Path, smoke_params: Params
) -> None:
    """train.mixed_precision on a CPU trains in bfloat16; the ONNX graph stays float32."""
    keras.utils.set_random_seed(2)
    with dtype_policy("mixed_bfloat16"):
        trained = build_generator(smoke_params.model)
    trained.save(tmp_path / "generator.keras")
    generator = float32_generator(tmp_path / "generator.keras", smoke_params.model)
    assert {layer.compute_dtype for layer in generator.layers} == {"float32"}
    z = np.random.default_rng(3).standard_normal((8, smoke_params.model.latent_dim))
    labels = np.arange(8) % 10
    ours, theirs = (
        keras.ops.convert_to_numpy(net([z.astype(np.float32), labels]))
        for net in (generator, trained)
    )
    np.testing.assert_allclose(ours, theirs, atol=0.05)  # bfloat16 keeps ~3 significant digits
    report = export_model(generator, smoke_params, tmp_path / "generator.onnx")
    assert report["parity_max_abs_diff"] <= smoke_params.export.parity_tol
    (image,) = onnx.load(tmp_path / "generator.onnx").graph.output
    assert image.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_check_refuses_a_graph_that_disagrees_with_tensorflow(
    onnx_generators: dict[str, Path], smoke_params: Params
) -> None:
    params = _variant(smoke_params, conditional=False, output="sigmoid", noise="uniform")
    keras.utils.set_random_seed(123)  # other weights than the exported ones
    with pytest.raises(ExportError, match="disagree: max abs diff"):
        check_export(onnx_generators["unconditional"], build_generator(params.model), params)


@pytest.mark.parametrize(
    ("noise", "problem"),
    [
        # TF's stateless RNG has no ONNX counterpart: the checker refuses the graph.
        (lambda t: t + keras.random.normal(keras.ops.shape(t)), "not valid ONNX"),
        # Converts (to RandomNormalLike) but draws other numbers than TensorFlow: parity fails.
        (lambda t: t + tf.random.normal(tf.shape(t)), "disagree: max abs diff"),
    ],
    ids=["unsupported-op", "parity"],
)
def test_failed_export_writes_nothing(
    tmp_path: Path, smoke_params: Params, noise: Callable, problem: str
) -> None:
    """Graphs that cannot match TensorFlow (fresh random noise inside the net) fail a check,
    and neither the model nor a temp file is left behind."""
    params = _variant(smoke_params, conditional=False)
    z = keras.Input((params.model.latent_dim,), name="z")
    x = keras.layers.Lambda(noise)(keras.layers.Dense(784)(z))
    image = keras.layers.Reshape((28, 28, 1))(keras.layers.Activation("tanh")(x))
    out = tmp_path / "models" / "generator.onnx"
    out.parent.mkdir()
    out.write_bytes(b"previous model")
    with pytest.raises(ExportError, match=problem):
        export_model(keras.Model(z, image), params, out)
    assert out.read_bytes() == b"previous model"
    assert sorted(path.name for path in out.parent.iterdir()) == ["generator.onnx"]


@pytest.mark.slow
def test_export_and_generate_stages_log_into_the_training_run(
    tmp_path: Path, raw_params: dict, smoke_params: Params
) -> None:
    """The real stage commands on a saved Keras generator and a real (SQLite) MLflow store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.set_terminated(run_id)
    models = tmp_path / "models"
    models.mkdir()
    run_file = models / "mlflow_run.json"
    run_file.write_text(
        json.dumps({"run_id": run_id, "experiment_id": experiment, "tracking_uri": uri})
    )
    keras.utils.set_random_seed(0)
    build_generator(smoke_params.model).save(models / "generator.keras")
    raw = smoke_params.model_dump(mode="json")
    raw["export"]["registered_model"] = "mnist-generator-test"
    raw["generate"]["digit"] = 7
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))

    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    stage = [sys.executable, "-m", "stages.export", "--params", "params.yaml"]
    export = subprocess.run(stage, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert export.returncode == 0, export.stderr
    # A quiet start on CPU (pipeline.core.stage), and a model MLflow has nothing to infer for.
    if not list(Path("/dev").glob("nvidia[0-9]*")):
        assert "cuInit" not in export.stderr, export.stderr
    assert "oneDNN custom operations" not in export.stderr, export.stderr
    assert "uv is not available" not in export.stderr, export.stderr
    assert "pip version" not in export.stderr, export.stderr
    stage = [sys.executable, "-m", "stages.generate", "--params", "params.yaml"]
    subprocess.run(stage, cwd=tmp_path, env=env, check=True)

    report = json.loads((tmp_path / "reports" / "export.json").read_text())
    assert report["parity_max_abs_diff"] <= smoke_params.export.parity_tol
    assert report["opset"] == 17
    exported = Generator(models / "generator.onnx")
    assert exported.metadata["mlflow_run_id"] == run_id
    assert exported.metadata["params_hash"] == smoke_params.digest("model", "loss", "train")
    assert (tmp_path / "reports" / "generated.png").stat().st_size > 0

    run = client.get_run(run_id)
    assert run.data.metrics["export_parity_max_abs_diff"] == report["parity_max_abs_diff"]
    mlflow.set_tracking_uri(uri)
    (logged,) = mlflow.search_logged_models(
        experiment_ids=[experiment],
        filter_string=f"source_run_id = '{run_id}'",
        output_format="list",
    )
    requirements = mlflow.pyfunc.get_model_dependencies(logged.model_uri)
    assert Path(requirements).read_text().split() == [
        f"{name}=={metadata.version(name)}" for name in ("mlflow", "onnx", "onnxruntime", "numpy")
    ]
    pyfunc = mlflow.pyfunc.load_model(logged.model_uri)
    assert {spec.name for spec in pyfunc.metadata.get_input_schema().inputs} == {"z", "label"}
    z = exported.sample_noise(3, seed=0)
    prediction = pyfunc.predict({"z": z, "label": np.full(3, 7, dtype=np.int64)})
    np.testing.assert_allclose(
        np.asarray(prediction["image"]).reshape(3, 28, 28), exported.generate(3, z=z, digit=7)
    )
    (version,) = client.search_model_versions("name = 'mnist-generator-test'")
    assert version.run_id == run_id
