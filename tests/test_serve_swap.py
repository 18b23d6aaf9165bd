"""Serving by registry alias and swapping the model while serving, for real: a SQLite MLflow
store with promoted versions, the service as a uvicorn process resolving
``models:/mnist-generator@champion`` (pipeline/serve/models.py, pipeline/tracking/fetch.py),
SIGHUP and the periodic reload under 32 busy connections."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from service import Load, Service, pixels, variant

from pipeline.inference.generator import Generator
from pipeline.tracking import runs
from pipeline.tracking.registry import promote, rollback

from helpers import evaluated_run, free_port, wait_for, wait_ready

pytestmark = pytest.mark.slow

NAME, EXPERIMENT, YARDSTICK = "mnist-generator", "mnist-gan", "ab" * 32


@pytest.fixture
def load() -> Iterator[Load]:
    running = Load()
    yield running
    running.stop()


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("server", marks=pytest.mark.xdist_group("tracking_server")),
    ]
)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> runs.Store:
    """The embedded SQLite store, or the team's tracking server (PostgreSQL)."""
    if request.param == "sqlite":
        return runs.Store(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    server = request.getfixturevalue("server")
    return runs.Store(server.uri, tmp_path)


def test_alias_swap_and_rollback_under_load_drop_nothing(
    store: runs.Store, tmp_path: Path, onnx_generators: dict[str, Path], load: Load
) -> None:
    """The service serves the champion by alias and reports it in /metadata; promote + SIGHUP
    and rollback + SIGHUP swap the model under 32 busy connections with zero failed requests;
    a version that breaks the contract is refused in one log line and the old one serves on.
    On the embedded store and on the team server alike."""
    first = onnx_generators["conditional"]
    second = variant(first, tmp_path / "second.onnx")
    name = f"{NAME}-{uuid.uuid4().hex[:8]}"  # its own: the server outlives this test
    experiment = f"swap-{name}"  # not mnist-gan: other tests count the runs there
    ids = {
        run: evaluated_run(store, experiment, run, fid, model, YARDSTICK)
        for run, fid, model in (
            ("exp-a", 2.0, first),
            ("exp-b", 1.5, second),
            ("exp-c", 1.0, onnx_generators["unconditional"]),  # another contract
        )
    }
    promote(store, name, experiment, ids["exp-a"])
    env = {
        "MLFLOW_TRACKING_URI": store.uri,
        "MNIST_GAN_MODEL_URI": f"models:/{name}@champion",
        "MNIST_GAN_BATCHING": "true",
    }
    service = Service(tmp_path, env)
    try:
        wait_ready(service.url, service.process, timeout=120)
        registry = service.metadata()["registry"]
        assert registry == {
            "name": name, "version": "1", "alias": "champion", "run_id": ids["exp-a"],
            "metrics": {"fid": 2.0},
        }  # fmt: skip
        expected = {path: Generator(path).generate(4, seed=7) for path in (first, second)}
        np.testing.assert_allclose(pixels(service.url), expected[first], atol=1e-6)
        outcomes = load.start(service.url)
        wait_for(lambda: len(outcomes) > 64, 90, "load started")

        promote(store, name, experiment, ids["exp-b"])
        service.process.send_signal(signal.SIGHUP)
        wait_for(lambda: service.version() == "2", 90, "swap to version 2")
        np.testing.assert_allclose(pixels(service.url), expected[second], atol=1e-6)
        before = len(outcomes)
        wait_for(lambda: len(outcomes) > before + 64, 90, "load after the swap")

        rollback(store, name)
        service.process.send_signal(signal.SIGHUP)
        wait_for(lambda: service.version() == "1", 90, "rollback to version 1")
        np.testing.assert_allclose(pixels(service.url), expected[first], atol=1e-6)

        promote(store, name, experiment, ids["exp-c"], force=True)  # version 3: unconditional
        service.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "refused" in service.text(), 90, "the refusal")
        assert service.version() == "1"
        before = len(outcomes)
        wait_for(lambda: len(outcomes) > before + 64, 90, "load after the refusal")
        statuses = load.stop()
    finally:
        service.stop()
    assert len(statuses) > 200 and set(statuses) == {200}, sorted(set(map(str, statuses)))
    refusals = [line for line in service.text().splitlines() if "refused" in line]
    assert len(refusals) == 1 and "still serving" in refusals[0], refusals
    assert "latent width and classes" in refusals[0]
    assert "Traceback" not in service.text()
    print(f"{len(statuses)} requests during two swaps and a refusal, all 200")


def test_a_file_is_reloaded_on_a_timer_and_a_broken_one_refused(
    tmp_path: Path, onnx_generators: dict[str, Path], load: Load
) -> None:
    """MNIST_GAN_RELOAD_S with a file path: a new file (renamed into place) serves within a
    few seconds, under load and with no failed request; a corrupt file is refused and the
    model before it serves on; /metadata has no registry record for a plain file."""
    served = tmp_path / "generator.onnx"
    first = onnx_generators["conditional"]
    shutil.copy(first, served)
    second = variant(first, tmp_path / "second.onnx")
    service = Service(tmp_path, {"MNIST_GAN_RELOAD_S": "0.5"}, "--model", str(served))
    try:
        wait_ready(service.url, service.process)
        assert service.metadata()["registry"] is None
        expected = Generator(second).generate(4, seed=7)
        outcomes = load.start(service.url)
        wait_for(lambda: len(outcomes) > 64, 90, "load started")
        shutil.copy(second, tmp_path / "next.onnx")
        (tmp_path / "next.onnx").replace(served)
        wait_for(lambda: np.allclose(pixels(service.url), expected, atol=1e-6), 90, "new file")
        (tmp_path / "broken.onnx").write_bytes(served.read_bytes()[:1000])
        (tmp_path / "broken.onnx").replace(served)
        wait_for(lambda: "refused" in service.text(), 90, "the refusal")
        np.testing.assert_allclose(pixels(service.url), expected, atol=1e-6)
        statuses = load.stop()
    finally:
        service.stop()
    assert set(statuses) == {200}, set(statuses)
    refusals = [line for line in service.text().splitlines() if "refused" in line]
    assert len(refusals) == 1 and "not a loadable ONNX model" in refusals[0], refusals


def test_mlflow_serving_draws_the_same_pixels_as_the_service(
    tmp_path: Path, onnx_generators: dict[str, Path]
) -> None:
    """The champion through MLflow's own serving (`mlflow models serve --env-manager local`,
    /invocations) and through mlflow.pyfunc draws, for the same latents and labels, the
    service's pixels within 1e-5: the registered model is the deployed one."""
    import mlflow

    store = runs.Store(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    evaluated_run(store, EXPERIMENT, "exp-a", 2.0, onnx_generators["conditional"], YARDSTICK)
    promote(store, NAME, EXPERIMENT, "exp-a")
    uri = f"models:/{NAME}@champion"
    latent = Generator(onnx_generators["conditional"]).latent_dim
    z = np.random.default_rng(0).standard_normal((4, latent)).astype(np.float32)
    labels = np.arange(4, dtype=np.int64)  # the service's digits 0..9 in turn

    port = free_port()
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # its uvicorn
    mlflow_serve = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager",
         "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": store.uri, "PATH": path},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    service = Service(tmp_path, {"MLFLOW_TRACKING_URI": store.uri, "MNIST_GAN_MODEL_URI": uri})
    try:
        wait_ready(service.url, service.process, timeout=120)
        ours = httpx.post(
            f"{service.url}/generate",
            json={"z": z.tolist(), "format": "json", "dtype": "float32"},
        ).json()["images"]
        deadline = time.monotonic() + 120
        while True:
            try:
                answer = httpx.post(
                    f"http://127.0.0.1:{port}/invocations",
                    json={"inputs": {"z": z.tolist(), "label": labels.tolist()}},
                    timeout=30,
                )
                break
            except httpx.TransportError:
                assert mlflow_serve.poll() is None, "mlflow models serve exited"
                assert time.monotonic() < deadline, "mlflow models serve did not start"
                time.sleep(0.5)
    finally:
        service.stop()
        mlflow_serve.terminate()
        mlflow_serve.wait(timeout=30)
    assert answer.status_code == 200, answer.text
    theirs = np.asarray(answer.json()["predictions"]["image"], np.float32).reshape(4, 28, 28)
    np.testing.assert_allclose(np.clip(theirs, 0, 1), np.asarray(ours), atol=1e-5)
    with runs.fluent_uri(store.uri):
        pyfunc = mlflow.pyfunc.load_model(uri).predict({"z": z, "label": labels})
    np.testing.assert_allclose(
        np.clip(pyfunc["image"].reshape(4, 28, 28), 0, 1), np.asarray(ours), atol=1e-5
    )
