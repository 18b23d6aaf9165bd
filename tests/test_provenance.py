"""What a model file says about where it came from: the warning `make serve`, `make web` and
`make docker-check` print before shipping a model trained with other params than the
committed ones, and the registry URI's one-line refusal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.errors import UserError
from pipeline.inference.provenance import parse_uri, shipping_warning

from helpers import REPO


def test_a_model_from_other_params_gets_one_warning_line(onnx_generators: dict[str, Path]) -> None:
    smoke = onnx_generators["conditional"]  # exported with the smoke preset's params
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.inference.provenance", str(smoke)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "trained with preset 'smoke'" in lines[0], done.stderr
    assert "not the committed params.yaml (preset 'default'" in lines[0]
    assert shipping_warning(REPO / "missing.onnx", REPO) is None  # the service says so


def test_registry_uris_are_checked_in_one_line() -> None:
    assert parse_uri("models:/mnist-generator@champion") == ("mnist-generator", "champion", None)
    assert parse_uri("models:/mnist-generator/3") == ("mnist-generator", None, "3")
    for bad in ("models:/x", "runs:/abc/model", "models:/a@b/c"):
        with pytest.raises(UserError, match=r"MNIST_GAN_MODEL_URI='.*' is invalid; allowed"):
            parse_uri(bad)
