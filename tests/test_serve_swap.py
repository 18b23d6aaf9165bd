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
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pipeline.inference.generator import Generator
from pipeline.tracking import runs
from pipeline.tracking.registry import promote, rollback

from helpers import REPO, Outcome, evaluated_run, free_port, load_client, wait_ready

pytestmark = pytest.mark.slow

NAME, EXPERIMENT, YARDSTICK = "mnist-generator", "mnist-gan", "ab" * 32


def variant(model: Path, out: Path, shift: float = 0.05) -> Path:
    """``model`` with other weights and the same contract: another training's generator."""
    proto = onnx.load(str(model))
    weights = max(proto.graph.initializer, key=lambda tensor: int(np.prod(tensor.dims)))
    changed = numpy_helper.to_array(weights) + np.float32(shift)
    weights.CopyFrom(numpy_helper.from_array(changed.astype(np.float32), weights.name))
    onnx.save(proto, str(out))
    return out


def pixels(url: str, seed: int = 7) -> np.ndarray:
    answer = httpx.get(
        f"{url}/generate", params={"n": 4, "seed": seed, "format": "json", "dtype": "float32"}
    )
    assert answer.status_code == 200, answer.text
    return np.asarray(answer.json()["images"], np.float32)


def wait_for(check: Callable[[], bool], what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.2)


class Service:
    """The service as a process (one worker, batching on), its log kept in a file."""

    def __init__(self, tmp: Path, env: dict[str, str], *args: str) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = tmp / f"serve-{self.url.rsplit(':', 1)[1]}.log"
        command = [sys.executable, "-m", "pipeline.serve", "--port", self.url.rsplit(":")[-1]]
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [*command, *args], cwd=REPO, env={**os.environ, **env}, stdout=out,
                stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip

    def metadata(self) -> dict[str, Any]:
        answer = httpx.get(f"{self.url}/metadata", timeout=5)
        assert answer.status_code == 200, answer.text
        found: dict[str, Any] = answer.json()
        return found

    def version(self) -> str | None:
        registry = self.metadata()["registry"]
        return registry["version"] if registry else None

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


class Load:
    """32 clients on keep-alive connections against the service (helpers.load_client)."""

    def __init__(self) -> None:
        self.halt, self.outcomes, self.clients = threading.Event(), list[Outcome](), []

    def start(self, url: str, count: int = 32) -> list[Outcome]:
        params = {"n": 8, "format": "json"}
        for _ in range(count):
            # 10 ms apart: every connection stays busy, and the swaps' own work gets CPU too
            args = (f"{url}/generate", self.halt, self.outcomes, params, 0.01)
            client = threading.Thread(target=load_client, args=args, daemon=True)
            client.start()
            self.clients.append(client)
        return self.outcomes

    def stop(self) -> list[int | str]:
        """Stop and join the clients; every result."""
        self.halt.set()
        for client in self.clients:
            client.join(timeout=30)
        return [outcome.result for outcome in self.outcomes]


@pytest.fixture
def load() -> Iterator[Load]:
    running = Load()
    yield running
    running.stop()


def test_alias_swap_and_rollback_under_load_drop_nothing(
    tmp_path: Path, onnx_generators: dict[str, Path], load: Load
) -> None:
    """The service serves the champion by alias and reports it in /metadata; promote + SIGHUP
    and rollback + SIGHUP swap the model under 32 busy connections with zero failed requests;
    a version that breaks the contract is refused in one log line and the old one serves on."""
    store = runs.Store(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    first = onnx_generators["conditional"]
    second = variant(first, tmp_path / "second.onnx")
    ids = {
        name: evaluated_run(store, EXPERIMENT, name, fid, model, YARDSTICK)
        for name, fid, model in (
            ("exp-a", 2.0, first),
            ("exp-b", 1.5, second),
            ("exp-c", 1.0, onnx_generators["unconditional"]),  # another contract
        )
    }
    promote(store, NAME, EXPERIMENT, "exp-a")
    env = {
        "MLFLOW_TRACKING_URI": store.uri,
        "MNIST_GAN_MODEL_URI": f"models:/{NAME}@champion",
        "MNIST_GAN_BATCHING": "true",
    }
    service = Service(tmp_path, env)
    try:
        wait_ready(service.url, service.process, timeout=120)
        registry = service.metadata()["registry"]
        assert registry == {
            "name": NAME, "version": "1", "alias": "champion", "run_id": ids["exp-a"],
            "metrics": {"fid": 2.0},
        }  # fmt: skip
        expected = {path: Generator(path).generate(4, seed=7) for path in (first, second)}
        np.testing.assert_allclose(pixels(service.url), expected[first], atol=1e-6)
        outcomes = load.start(service.url)
        wait_for(lambda: len(outcomes) > 64, "load started")

        promote(store, NAME, EXPERIMENT, "exp-b")
        service.process.send_signal(signal.SIGHUP)
        wait_for(lambda: service.version() == "2", "swap to version 2")
        np.testing.assert_allclose(pixels(service.url), expected[second], atol=1e-6)
        before = len(outcomes)
        wait_for(lambda: len(outcomes) > before + 64, "load after the swap")

        rollback(store, NAME)
        service.process.send_signal(signal.SIGHUP)
        wait_for(lambda: service.version() == "1", "rollback to version 1")
        np.testing.assert_allclose(pixels(service.url), expected[first], atol=1e-6)

        promote(store, NAME, EXPERIMENT, "exp-c", force=True)  # version 3: unconditional
        service.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "refused" in service.text(), "the refusal")
        assert service.version() == "1"
        before = len(outcomes)
        wait_for(lambda: len(outcomes) > before + 64, "load after the refusal")
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
        wait_for(lambda: len(outcomes) > 64, "load started")
        shutil.copy(second, tmp_path / "next.onnx")
        (tmp_path / "next.onnx").replace(served)
        wait_for(lambda: np.allclose(pixels(service.url), expected, atol=1e-6), "the new file")
        (tmp_path / "broken.onnx").write_bytes(served.read_bytes()[:1000])
        (tmp_path / "broken.onnx").replace(served)
        wait_for(lambda: "refused" in service.text(), "the refusal")
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
    z = np.random.default_rng(0).standard_normal((4, 100)).astype(np.float32)
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
