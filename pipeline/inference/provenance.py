"""Where a generator file came from, as its ONNX metadata says: the registry version it was
fetched as (written by :mod:`pipeline.tracking.fetch`, reported by the service's /metadata)
and whether it was trained with the committed params.

    python -m pipeline.inference.provenance models/generator.onnx   # make serve/web/docker-check

prints one warning line when the file was trained with other settings than the committed
``params.yaml`` (e.g. after ``dvc exp apply`` of a smoke run), so nothing ships by accident.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnxruntime as ort

from pipeline.core.errors import UserError

if TYPE_CHECKING:
    from pipeline.core.params import Params

REGISTRY_KEY = "registry"  # ONNX metadata: the registry record (JSON), see registry_record
MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))")
ALLOWED_URI = "models:/NAME@ALIAS or models:/NAME/VERSION (e.g. models:/mnist-generator@champion)"


def parse_uri(uri: str, field: str = "MNIST_GAN_MODEL_URI") -> tuple[str, str | None, str | None]:
    """(name, alias, version) of a registry URI; one line naming ``field`` otherwise."""
    match = MODEL_URI.fullmatch(uri)
    if match is None:
        raise UserError(f"{field}={uri!r} is invalid; allowed: {ALLOWED_URI}")
    return match["name"], match["alias"], match["version"]


def registry_record(metadata: dict[str, str]) -> dict[str, Any] | None:
    """name, version, alias, run_id and metrics of a file fetched from the registry."""
    text = metadata.get(REGISTRY_KEY)
    return json.loads(text) if text else None


def committed_params(root: Path) -> Params:
    """params.yaml as committed (HEAD), else as in the workspace (no git)."""
    import yaml

    from pipeline.core.params import load_params, parse_params  # the train extra's (omegaconf)

    shown = subprocess.run(
        ["git", "show", "HEAD:params.yaml"], cwd=root, capture_output=True, text=True
    )
    if shown.returncode != 0:
        return load_params(root / "params.yaml")
    return parse_params(yaml.safe_load(shown.stdout), "params.yaml (HEAD)")


def shipping_warning(model: Path, root: Path) -> str | None:
    """One line when ``model`` was not trained with the committed params, else None."""
    if not model.is_file():
        return None  # the service says so itself
    metadata = dict(ort.InferenceSession(str(model)).get_modelmeta().custom_metadata_map)
    if registry_record(metadata) is not None:
        return None  # a registry version: chosen on purpose
    params = committed_params(root)
    expected = params.digest("model", "loss", "train")
    if metadata.get("params_hash") == expected:
        return None
    return (
        f"warning: {model} was trained with preset {metadata.get('preset', '?')!r} (params "
        f"{metadata.get('params_hash', '?')}), not the committed params.yaml (preset "
        f"{params.preset!r}, params {expected}); `git checkout params.yaml && dvc checkout` "
        "restores the committed model, MODEL_URI=models:/mnist-generator@champion ships the "
        "champion"
    )


if __name__ == "__main__":
    warning = shipping_warning(Path(sys.argv[1]), Path.cwd())
    if warning:
        print(warning, file=sys.stderr)
