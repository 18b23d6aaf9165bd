"""make promote / make rollback for real: runs with logged ONNX generators (logged by the
export stage's own code) in a real SQLite MLflow store, promoted and rolled back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline.core.errors import UserError
from pipeline.inference.generator import Generator
from pipeline.tracking import runs
from pipeline.tracking.registry import CHAMPION, PREVIOUS, champion, promote, rollback

from helpers import REPO, evaluated_run

pytestmark = pytest.mark.slow

NAME, EXPERIMENT, YARDSTICK = "mnist-generator", "mnist-gan", "0b951ba4a044" + "0" * 52


def _evaluated_run(store: runs.Store, name: str, fid: float, model: Path, yardstick: str) -> str:
    return evaluated_run(store, EXPERIMENT, name, fid, model, yardstick)


def _aliases(client: MlflowClient) -> dict[str, str]:
    found = {alias: champion(client, NAME, alias) for alias in (CHAMPION, PREVIOUS)}
    return {alias: str(v.version) for alias, v in found.items() if v is not None}


def test_promote_and_roll_back(tmp_path: Path, onnx_generators: dict[str, Path]) -> None:
    store = runs.Store(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    model = onnx_generators["conditional"]
    ids = {
        name: _evaluated_run(store, name, fid, model, YARDSTICK)
        for name, fid in (("exp-a", 2.0), ("exp-b", 1.5), ("exp-c", 3.0))
    }
    other = _evaluated_run(store, "exp-other", 1.0, model, "f" * 64)
    client = MlflowClient(store.uri)

    assert "version 1" in promote(store, NAME, EXPERIMENT, "exp-a")
    assert _aliases(client) == {CHAMPION: "1"}
    assert "previous: version 1" in promote(store, NAME, EXPERIMENT, ids["exp-b"])  # by run id
    assert _aliases(client) == {CHAMPION: "2", PREVIOUS: "1"}
    tags = client.get_model_version(NAME, "2").tags
    assert tags["fid"] == "1.5" and tags["yardstick"] == YARDSTICK and tags["preset"] == "smoke"
    assert tags["params_digest"]  # from the export: which settings made the weights

    with pytest.raises(UserError, match=r"FID 3 is worse than the champion's \(1.5, version 2\)"):
        promote(store, NAME, EXPERIMENT, "exp-c")
    with pytest.raises(UserError, match=r"under yardstick ffffffffffff.*not comparable"):
        promote(store, NAME, EXPERIMENT, other)
    assert _aliases(client) == {CHAMPION: "2", PREVIOUS: "1"}  # refusals change nothing

    promote(store, NAME, EXPERIMENT, "exp-c", force=True)
    assert _aliases(client) == {CHAMPION: "3", PREVIOUS: "2"}
    assert "version 2 is the champion again" in rollback(store, NAME)
    assert _aliases(client) == {CHAMPION: "2", PREVIOUS: "3"}
    promote(store, NAME, EXPERIMENT, "exp-b")  # already version 2: no new version
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 3

    # What a deployment loads: the champion's ONNX file, one self-contained file.
    with runs.fluent_uri(store.uri):  # models:/ URIs resolve through MLflow's own registry URI
        served = mlflow.artifacts.download_artifacts(f"models:/{NAME}@{CHAMPION}")
    assert not [path.name for path in Path(served).iterdir() if path.suffix == ".data"]
    alone = tmp_path / "alone" / "generator.onnx"  # model.onnx copied without its folder
    alone.parent.mkdir()
    shutil.copy(Path(served) / "model.onnx", alone)
    images = Generator(alone).generate(3, seed=0)
    np.testing.assert_array_equal(images, Generator(model).generate(3, seed=0))

    with pytest.raises(UserError, match="EXP: got 'nope'; allowed: the name of a finished run"):
        promote(store, NAME, EXPERIMENT, "nope")


def test_the_command_line_says_what_is_wrong_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    for args, expected in (
        (["promote", "nope"], "EXP: got 'nope'"),
        (["rollback"], "no 'previous' version to roll back to"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.tracking.registry", *args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 1, done.stderr
        errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and expected in errors[0], done.stderr
