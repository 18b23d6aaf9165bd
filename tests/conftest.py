"""Shared fixtures: the real MNIST files (from ../shared/mnist, served over loopback HTTP so
the real download path runs) and a shrunken config that tests feed to the same code users
run. Plain helpers live in helpers.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.core.params import Params, apply_overrides, parse_params
from pipeline.data.mnist import FILES
from pipeline.experiments.presets import load_preset

from helpers import (
    GIT,
    REPO,
    SHARED_MNIST,
    Dvc,
    MirrorServer,
    SmokePipeline,
    copy_repo,
    free_port,
    run_dvc,
    serve_mirror,
)


@pytest.fixture(autouse=True)
def _no_ambient_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    """$MNIST_MIRROR (set by .ci/run and offline users) would bypass the loopback mirrors the
    tests serve; tests that want it set it themselves."""
    monkeypatch.delenv("MNIST_MIRROR", raising=False)


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri() -> Iterator[None]:
    """``mlflow.set_tracking_uri`` also sets ``$MLFLOW_TRACKING_URI``: a test that points
    MLflow at a server (gone by its end, say) must not send the next test's stages there."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if os.environ.get("MLFLOW_TRACKING_URI") != before:
        import mlflow

        mlflow.set_tracking_uri(before)  # type: ignore[arg-type]  # None: its default again
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def shared_mnist() -> Path:
    if not all((SHARED_MNIST / spec.gz_name).is_file() for spec in FILES):
        pytest.fail(f"MNIST test data missing: expected the four .gz files in {SHARED_MNIST}")
    return SHARED_MNIST


@pytest.fixture
def mirror(shared_mnist: Path) -> Iterator[MirrorServer]:
    """A loopback HTTP mirror of ../shared/mnist; set ``mirror.faults`` to inject failures."""
    with serve_mirror(shared_mnist) as server:
        yield server


@pytest.fixture
def mirror_factory(shared_mnist: Path) -> Iterator[Callable[[Path], MirrorServer]]:
    with contextlib.ExitStack() as stack:
        yield lambda root=shared_mnist: stack.enter_context(serve_mirror(root))


@pytest.fixture(scope="session")
def mnist_dir(shared_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data/ folder holding the four verified files, as the download stage leaves it."""
    data = tmp_path_factory.mktemp("data")
    for spec in FILES:
        shutil.copy(shared_mnist / spec.gz_name, data / spec.gz_name)
    return data


@pytest.fixture(scope="session")
def raw_params() -> dict[str, Any]:
    with (REPO / "params.yaml").open() as handle:
        return yaml.safe_load(handle)


@pytest.fixture(scope="session")
def smoke_params(raw_params: dict[str, Any]) -> Params:
    """params.yaml with the smoke preset applied: 1 epoch on 512 images, tiny nets, CPU."""
    return parse_params(apply_overrides(raw_params, load_preset("smoke")))


def pytest_configure(config: pytest.Config) -> None:
    """Fix TensorFlow's thread pools at the plan of the tests' in-process trainings before
    any test module is even imported (one may start TensorFlow at import): a stage's fresh
    process uses that plan too, so references trained here match it, and ``train`` refuses
    where the pools differ. Not in xdist's controller, which runs no test."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return
    from pipeline.core.cpu import cores
    from pipeline.training.distribute import set_thread_pools

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    set_thread_pools(parse_params(apply_overrides(raw, load_preset("smoke"))).train, cores())


@pytest.fixture
def dvc() -> Dvc:
    return run_dvc


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """A fresh git + DVC copy of this repo's tracked sources, for end-to-end `dvc` runs."""
    return copy_repo(tmp_path / "repo")


@pytest.fixture(scope="session")
def smoke_pipeline(
    raw_params: dict[str, Any], shared_mnist: Path, tmp_path_factory: pytest.TempPathFactory
) -> SmokePipeline:
    """The pipeline up to evaluate (download, train, export, evaluate), run ONCE per
    session through real DVC: the costly part of the end-to-end tests, shared by them. Tests
    read it; one that changes a tracked file commits it or puts it back."""
    root = tmp_path_factory.mktemp("smoke_pipeline")
    repo = copy_repo(root / "repo")
    smoke = apply_overrides(raw_params, load_preset("smoke"))
    (repo / "params.yaml").write_text(yaml.safe_dump(smoke, sort_keys=False))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {"MNIST_MIRROR": str(shared_mnist), "MLFLOW_TRACKING_URI": uri}
    run_dvc(repo, "repro", "evaluate", env=env)
    subprocess.run([*GIT, "add", "params.yaml", "dvc.lock"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-qm", "smoke run"], cwd=repo, check=True)
    return SmokePipeline(repo, env, uri)


@pytest.fixture(scope="session")
def onnx_generators(smoke_params: Params, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Small exported ONNX generators (untrained smoke-preset nets), as the export stage
    writes them: {"unconditional": Path, "conditional": Path}. The unconditional one uses
    sigmoid output and uniform noise, the conditional one tanh and normal noise, so both
    output scalings and noise kinds are covered. Imports TensorFlow (once per session)."""
    import keras

    from pipeline.training.export import export_model
    from pipeline.training.models import build_generator

    out = tmp_path_factory.mktemp("onnx")
    variants = {
        "unconditional": {"conditional": False, "output": "sigmoid", "noise": "uniform"},
        "conditional": {"conditional": True, "output": "tanh", "noise": "normal"},
    }
    paths = {}
    for name, update in variants.items():
        model = smoke_params.model.model_copy(update=update)
        params = smoke_params.model_copy(update={"model": model})
        keras.utils.set_random_seed(0)
        paths[name] = out / f"{name}.onnx"
        export_model(build_generator(model), params, paths[name], run_id="test-run")
    return paths


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite MLflow store in the test's folder, as the stages' environment names it
    (their subprocesses resolve it from there); in-process calls pass ``Store(uri, tmp_path)``."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # mlartifacts/ lands in tmp, not the repo
    return uri


@pytest.fixture(scope="session")
def server() -> Iterator[Any]:
    """PostgreSQL + MLflow server (pipeline/tracking/server.py's TrackingServer) for the
    whole session, state in a fresh folder. Tests using it share an xdist_group so that one
    worker starts it once."""
    from pipeline.tracking.server import PG_BIN, TrackingServer

    if not (PG_BIN / "initdb").is_file():
        installed = subprocess.run(
            ["bash", str(REPO / "scripts" / "install_postgres.sh")],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if installed.returncode:
            pytest.skip(f"PostgreSQL 15 cannot be installed here: {installed.stderr.strip()}")
    # Under /tmp, not pytest's tmp_path: the postgres user must reach it, and pytest's base
    # folder is private to root.
    state = Path(tempfile.mkdtemp(prefix="mnist-gan-tracking-"))
    state.chmod(0o755)
    team = TrackingServer(state, port=free_port(), workers=1)
    try:
        team.start()
        yield team
    finally:
        team.stop()
        shutil.rmtree(state, ignore_errors=True)
