"""Export the trained Keras generator to ONNX, the one file deployments need.

tf2onnx's ``from_keras`` does not understand Keras 3, so the generator is wrapped in a
``tf.function`` with named ``tf.TensorSpec`` inputs (batch dimension left dynamic) and
converted with ``from_function``. The wrapper also does what every consumer would
otherwise have to know about training: it casts the int64 ``label`` to the int32 the
Keras model takes and maps the tanh/sigmoid output to [0, 1]. The result is checked
(onnx checker, onnxruntime vs TensorFlow parity, batches of 1 and 257) BEFORE it replaces
``models/generator.onnx``, so a bad export never reaches users.
"""

from __future__ import annotations

import json
import logging
import platform
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import onnx
import tensorflow as tf
import tf2onnx

from pipeline.core.errors import UserError
from pipeline.core.files import atomic_path, write_json
from pipeline.core.images import NUM_CLASSES, SHAPE, SIDE, cycle_labels, to_unit
from pipeline.core.params import ModelParams, Params
from pipeline.inference.generator import TRAINED_ON, Generator, ModelError
from pipeline.tracking.runs import open_run, source_tags
from pipeline.training.models import build_generator, dtype_policy

log = logging.getLogger(__name__)

PARITY_BATCH = 64
PARITY_SEED = 0
BATCH_SIZES_CHECKED = (1, 257)  # one image, and a batch that is no power of two
# What the logged MLflow model needs to run (pyfunc: MLflow's ONNX flavour on onnxruntime),
# pinned to the versions installed from uv.lock. Listed, not inferred: MLflow's inference
# reads the whole training environment (TensorFlow included) and warns about uv and pip.
MODEL_PACKAGES = ("mlflow", "onnx", "onnxruntime", "numpy")


class ExportError(UserError):
    """The exported graph failed a check; nothing was written."""


def to_onnx(generator: keras.Model, model: ModelParams, opset: int) -> onnx.ModelProto:
    """The generator as an ONNX graph with the deployment contract's inputs and output."""
    signature = [tf.TensorSpec([None, model.latent_dim], tf.float32, name="z")]
    if model.conditional:
        signature.append(tf.TensorSpec([None], tf.int64, name="label"))

    @tf.function(input_signature=signature)
    def serve(z: tf.Tensor, label: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
        inputs = [z, tf.cast(label, tf.int32)] if model.conditional else z
        image = generator(inputs, training=False)  # [N, 28, 28, 1]
        # Scaled while flat: onnxruntime broadcasts a scalar over a trailing dimension of 1
        # one element at a time (measured: [N, 28, 28, 1] + 1.0 took 70x as long as over
        # [N, 784], and made two thirds of the whole generator's run time).
        unit = to_unit(tf.reshape(image, [-1, SIDE * SIDE]), model.output)
        # A dict return names the graph output: `image`, not `Identity:0`.
        return {"image": tf.reshape(unit, [-1, *SHAPE])}

    onnx_model, _ = tf2onnx.convert.from_function(serve, input_signature=signature, opset=opset)
    # tf2onnx names the dynamic batch dimension `unk__N`; `N` reads better in Netron et al.
    for value in [*onnx_model.graph.input, *onnx_model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    return onnx_model


def metadata(
    params: Params, run_id: str, trained_on: dict[str, str] | None = None
) -> dict[str, str]:
    """The model's metadata_props: its contract (pipeline.inference.generator) and where it
    came from; ``trained_on``: the run file's compute_dtype and cpu_isa."""
    trained_on = trained_on or {}
    return {
        "latent_dim": str(params.model.latent_dim),
        "noise": params.model.noise,
        "num_classes": str(NUM_CLASSES if params.model.conditional else 0),
        "preset": params.preset,
        "mlflow_run_id": run_id,
        # Which model/loss/train settings produced the weights (Params.digest).
        "params_hash": params.digest("model", "loss", "train"),
        "export_date": datetime.now(UTC).isoformat(timespec="seconds"),
        **{key: trained_on.get(key, "unknown") for key in TRAINED_ON},
    }


def reference_images(generator: keras.Model, model: ModelParams, z: np.ndarray) -> np.ndarray:
    """What TensorFlow says the exported graph must output for ``z``, in [0, 1]: the same
    digits 0..9 in turn that :meth:`Generator.generate` feeds a conditional model."""
    labels = cycle_labels(len(z)).astype(np.int32)
    image = generator([z, labels] if model.conditional else z, training=False)
    return to_unit(keras.ops.convert_to_numpy(image).reshape(len(z), SIDE, SIDE), model.output)


def check_export(path: Path, generator: keras.Model, params: Params) -> dict[str, float]:
    """Load ``path`` the way users do and compare it with TensorFlow; raise ExportError."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported graph is not valid ONNX: {exc}") from exc
    try:
        exported = Generator(path, max_n=max(BATCH_SIZES_CHECKED))
    except ModelError as exc:
        raise ExportError(str(exc)) from exc
    z = exported.sample_noise(PARITY_BATCH, PARITY_SEED)
    expected = reference_images(generator, params.model, z)
    diff = float(np.abs(exported.generate(PARITY_BATCH, z=z) - expected).max())
    parity_tol = params.export.parity_tol
    if not diff <= parity_tol:
        raise ExportError(
            f"onnxruntime and TensorFlow disagree: max abs diff {diff:.3g} > "
            f"export.parity_tol {parity_tol:g}"
        )
    for n in BATCH_SIZES_CHECKED:
        if not np.isfinite(exported.generate(n, seed=n)).all():
            raise ExportError(f"a batch of {n} images gave non-finite values")
    return {
        "parity_max_abs_diff": diff,
        "parity_tol": parity_tol,
        "onnx_kib": round(path.stat().st_size / 1024, 1),
    }


def export_model(
    generator: keras.Model,
    params: Params,
    out: Path,
    run_id: str = "",
    trained_on: dict[str, str] | None = None,
) -> dict:
    """Convert, check and atomically write ``out``; returns the check results."""
    onnx_model = to_onnx(generator, params.model, params.export.opset)
    onnx.helper.set_model_props(onnx_model, metadata(params, run_id, trained_on))
    with atomic_path(out) as temp:  # only a model that passed every check lands at `out`
        onnx.save(onnx_model, temp)
        report = check_export(temp, generator, params)
    log.info("exported %s (opset %d): %s", out, params.export.opset, report)
    return {"opset": params.export.opset, **report}


def model_environment() -> dict[str, Any]:
    """The logged model's conda.yaml; its pip list is also requirements.txt. Given whole,
    MLflow infers nothing and looks up no pip version."""
    pinned = [f"{name}=={version(name)}" for name in MODEL_PACKAGES]
    return {
        "name": "mlflow-env",
        "channels": ["conda-forge"],
        "dependencies": [f"python={platform.python_version()}", "pip", {"pip": pinned}],
    }


def log_to_mlflow(
    onnx_path: Path, run_file: Path, registered_model: str | None, metrics: dict[str, float]
) -> str:
    """Log the ONNX model (signature and input example included) and the export checks into
    the training's run; returns the model URI."""
    generator = Generator(onnx_path)
    example = {"z": generator.sample_noise(2, seed=0)}
    if generator.conditional:
        example["label"] = np.array([0, 1], dtype=np.int64)
    output = {"image": generator.generate(2, z=example["z"])[..., None]}
    signature = mlflow.models.infer_signature(example, output)
    with open_run(run_file):
        mlflow.log_metrics({f"export_{key}": value for key, value in metrics.items()})
        # which model/loss/train settings made the weights: a promoted version carries it
        mlflow.set_tag("params_digest", generator.metadata["params_hash"])
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)),
            name="generator",
            signature=signature,
            input_example=example,
            registered_model_name=registered_model,
            onnx_execution_providers=["CPUExecutionProvider"],
            # one self-contained file, as models/generator.onnx: MLflow's default moves the
            # weights into a separate .data file that a copy of model.onnx alone lacks
            save_as_external_data=False,
            conda_env=model_environment(),
            tags=source_tags(),
        )
    log.info("logged %s to MLflow as %s", onnx_path, info.model_uri)
    return info.model_uri


def float32_generator(keras_path: Path, model: ModelParams) -> keras.Model:
    """The saved generator's weights in a float32 net: one trained under mixed precision
    computes in bfloat16 or float16, and the deployed graph keeps float32 throughout."""
    trained = keras.models.load_model(keras_path, compile=False)
    with dtype_policy("float32"):
        generator = build_generator(model)
    generator.set_weights(trained.get_weights())
    return generator


def export_generator(
    keras_path: Path, out: Path, report_path: Path, params: Params, run_file: Path
) -> dict[str, Any]:
    """The export stage: models/generator.keras -> checked models/generator.onnx, the check
    results in ``report_path`` (DVC metrics), and the model in the training's MLflow run."""
    run = json.loads(run_file.read_text())
    generator = float32_generator(keras_path, params.model)
    report = export_model(generator, params, out, run["run_id"], run)
    log_to_mlflow(out, run_file, params.export.registered_model, report)
    write_json(report_path, report)
    return report
