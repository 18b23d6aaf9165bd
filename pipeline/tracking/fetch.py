"""A registry version as one deployable ONNX file: ``models:/NAME@ALIAS`` (or
``models:/NAME/VERSION``) resolved, its ``model.onnx`` downloaded and written with the
version's identity added to its metadata, so the file itself says what it is.

    python -m pipeline.tracking.fetch models:/mnist-generator@champion --out serve/generator.onnx

The service runs this in a subprocess (``MNIST_GAN_MODEL_URI``: at start, on SIGHUP, every
``MNIST_GAN_RELOAD_S``) so that the serving process never imports MLflow; the serve image is
built from its output (docs/serving.md). Prints one JSON line: the :data:`REGISTRY_KEY` record
(name, version, alias, run_id, metrics), plus ``"unchanged": true`` and no download when
an ``--unless-version`` names the version the alias points at.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.core import stage
from pipeline.core.errors import UserError
from pipeline.core.files import atomic_path
from pipeline.inference.provenance import ALLOWED_URI, REGISTRY_KEY, parse_uri
from pipeline.tracking.registry import HEADLINE
from pipeline.tracking.runs import Store, fluent_uri, resolve_store


def resolve(client: MlflowClient, uri: str) -> tuple[ModelVersion, str | None]:
    """The version ``uri`` points at now, and the alias it was reached by."""
    name, alias, version = parse_uri(uri)
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias), alias
        return client.get_model_version(name, str(version)), None
    except MlflowException as error:
        where = client.tracking_uri
        raise UserError(f"{uri}: not in the registry at {where}: {error.message}") from None


def record(version: ModelVersion, alias: str | None) -> dict[str, Any]:
    """What the service reports under ``registry`` in /metadata."""
    tags = version.tags or {}
    metrics = {key: float(tags[key]) for key in HEADLINE if key in tags}
    return {
        "name": version.name,
        "version": str(version.version),
        "alias": alias,
        "run_id": version.run_id,
        "metrics": metrics,
    }


def fetch(store: Store, uri: str, out: Path, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Write ``uri``'s ONNX generator to ``out`` (atomically) with its registry record in the
    metadata; returns the record. Skips the download when its version is in ``skip``."""
    import onnx  # the train extra's; only this step needs it

    client = MlflowClient(store.uri)
    version, alias = resolve(client, uri)
    found = record(version, alias)
    if found["version"] in skip:
        return {**found, "unchanged": True}
    with tempfile.TemporaryDirectory() as tmp, fluent_uri(store.uri):
        import mlflow

        versioned = f"models:/{version.name}/{version.version}"
        folder = Path(mlflow.artifacts.download_artifacts(versioned, dst_path=tmp))
        files = sorted(folder.rglob("*.onnx"))
        if len(files) != 1:
            raise UserError(f"{uri}: version {found['version']} holds {len(files)} ONNX files")
        model = onnx.load(str(files[0]))  # self-contained: export logs no external data
    props = {prop.key: prop.value for prop in model.metadata_props}
    props[REGISTRY_KEY] = json.dumps(found, sort_keys=True)
    onnx.helper.set_model_props(model, props)
    with atomic_path(out) as tmp_out:
        onnx.save(model, str(tmp_out))
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("uri", help=ALLOWED_URI)
    parser.add_argument("--out", type=Path, required=True, help="the ONNX file to write")
    parser.add_argument(
        "--unless-version", action="append", default=[], help="no download for this version"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stderr: one line
    found = fetch(resolve_store(), args.uri, args.out, frozenset(args.unless_version))
    print(json.dumps(found, sort_keys=True))


if __name__ == "__main__":
    stage.run(main)
