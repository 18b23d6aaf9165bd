"""The generation service: every endpoint in-process (FastAPI's TestClient, real
onnxruntime on small exported generators), then a real uvicorn process on 127.0.0.1 for
what only a real server shows: limits under concurrency, the access log, SIGTERM, and that
TensorFlow never enters the process."""

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pipeline.inference.generator import Generator, encode_png
from pipeline.serve.app import Settings, create_app

from helpers import free_port

REPO = Path(__file__).resolve().parent.parent


def field_errors(response: httpx.Response) -> list[list]:
    """The ``loc`` of each error in a 422 body: (where, field, ...)."""
    assert response.status_code == 422, response.text
    return [error["loc"] for error in response.json()["detail"]]


@pytest.fixture(scope="module")
def client(onnx_generators: dict[str, Path]) -> Iterator[TestClient]:
    app = create_app(Settings(model=onnx_generators["conditional"], max_n=64))
    with TestClient(app) as test_client:  # `with` runs the lifespan: loads the model
        yield test_client


@pytest.fixture(scope="module")
def unconditional(onnx_generators: dict[str, Path]) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(model=onnx_generators["unconditional"]))) as test_client:
        yield test_client


# --------------------------------------------------------------------------- endpoints


def test_health_ready_and_metadata_describe_the_loaded_model(
    client: TestClient, onnx_generators: dict[str, Path]
) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"ready": True, "reason": None}
    meta = client.get("/metadata").json()
    generator = Generator(onnx_generators["conditional"])
    assert meta["latent_dim"] == generator.latent_dim
    assert (meta["noise"], meta["num_classes"], meta["conditional"]) == ("normal", 10, True)
    assert meta["max_n"] == 64
    assert meta["metadata"] == generator.metadata
    assert meta["metadata"]["mlflow_run_id"] == "test-run"


def test_png_grid_is_the_generators_grid(
    client: TestClient, onnx_generators: dict[str, Path]
) -> None:
    response = client.get("/generate", params={"n": 12, "seed": 3})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "3"
    grid = np.asarray(Image.open(io.BytesIO(response.content)))
    # Conditional and no digit asked: the digits cycle 0..9, ten columns show one each.
    assert grid.shape == (2 * 28, 10 * 28)
    images = Generator(onnx_generators["conditional"]).generate(12, seed=3)
    expected = np.asarray(Image.open(io.BytesIO(encode_png(images, cols=10))))
    np.testing.assert_array_equal(grid, expected)


def test_json_pixels_in_both_dtypes(client: TestClient, onnx_generators: dict[str, Path]) -> None:
    query = {"n": 3, "seed": 11, "digit": 7, "format": "json"}
    as_bytes = client.get("/generate", params=query).json()
    as_floats = client.get("/generate", params={**query, "dtype": "float32"}).json()
    assert as_bytes["shape"] == as_floats["shape"] == [3, 28, 28]
    assert (as_bytes["seed"], as_bytes["digit"], as_bytes["dtype"]) == (11, 7, "uint8")
    pixels = np.array(as_bytes["images"])
    floats = np.array(as_floats["images"])
    assert pixels.dtype.kind == "i"
    assert pixels.min() >= 0 and pixels.max() <= 255
    assert floats.min() >= 0.0 and floats.max() <= 1.0
    expected = Generator(onnx_generators["conditional"]).generate(3, seed=11, digit=7)
    np.testing.assert_allclose(floats, expected, atol=1e-6)
    np.testing.assert_array_equal(pixels, np.rint(expected * 255))


def test_seeded_requests_repeat_and_unseeded_report_a_replayable_seed(client: TestClient) -> None:
    query = {"n": 2, "format": "json"}
    first, second = (client.get("/generate", params={**query, "seed": 5}).json() for _ in "ab")
    assert first == second
    other = client.get("/generate", params={**query, "seed": 6}).json()
    assert other["images"] != first["images"]
    free = [client.get("/generate", params=query).json() for _ in range(2)]
    assert free[0]["seed"] != free[1]["seed"]
    assert free[0]["images"] != free[1]["images"]
    replay = client.get("/generate", params={**query, "seed": free[0]["seed"]}).json()
    assert replay["images"] == free[0]["images"]


def test_post_takes_the_same_fields_and_an_explicit_z(
    client: TestClient, onnx_generators: dict[str, Path]
) -> None:
    query = {"n": 4, "seed": 9, "digit": 2, "format": "json", "dtype": "float32"}
    from_get = client.get("/generate", params=query).json()
    assert client.post("/generate", json=query).json() == from_get
    # The noise a seed stands for, sent explicitly, gives the same images.
    generator = Generator(onnx_generators["conditional"])
    z = generator.sample_noise(4, seed=9).tolist()
    explicit = client.post("/generate", json={**query, "seed": None, "z": z}).json()
    np.testing.assert_allclose(explicit["images"], from_get["images"], atol=1e-6)
    png = client.post("/generate", json={"n": 4, "seed": 9})
    assert png.headers["content-type"] == "image/png"
    assert png.content == client.get("/generate", params={"n": 4, "seed": 9}).content


def test_unconditional_model(unconditional: TestClient) -> None:
    body = unconditional.get("/generate", params={"n": 5, "seed": 1, "format": "json"}).json()
    assert body["shape"] == [5, 28, 28]
    assert unconditional.get("/metadata").json()["num_classes"] == 0
    response = unconditional.get("/generate", params={"digit": 3})
    assert field_errors(response) == [["query", "digit"]]
    assert "unconditional" in response.json()["detail"][0]["msg"]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"n": 65}, "n"),  # over max_n
        ({"n": 0}, "n"),
        ({"n": "many"}, "n"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"digit": 10}, "digit"),
        ({"format": "bmp"}, "format"),
        ({"dtype": "float64"}, "dtype"),
    ],
)
def test_bad_query_is_a_422_naming_the_field(client: TestClient, query: dict, field: str) -> None:
    response = client.get("/generate", params=query)
    assert field_errors(response) == [["query", field]]
    assert response.json()["detail"][0]["msg"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (lambda d: {"n": 65}, "n"),
        (lambda d: {"z": [[0.0] * d], "n": 2}, "n"),  # n disagrees with len(z)
        (lambda d: {"z": [[0.0] * (d - 1)]}, "z"),  # wrong latent width
        (lambda d: {"z": [[0.0] * d, [0.0] * (d - 1)]}, "z"),  # ragged
        (lambda d: {"z": [[1e6] * d]}, "z"),  # far outside any trained noise
        (lambda d: {"z": []}, "z"),
        (lambda d: {"model": "/etc/passwd"}, "model"),  # unknown fields: refused
        (lambda d: {"format": 1}, "format"),
        (lambda d: {"seed": True}, "seed"),  # JSON types as declared
        (lambda d: {"n": "3"}, "n"),
    ],
)
def test_bad_body_is_a_422_naming_the_field(client: TestClient, body, field: str) -> None:
    latent_dim = client.get("/metadata").json()["latent_dim"]
    response = client.post("/generate", json=body(latent_dim))
    assert field_errors(response)[0][:2] == ["body", field]


def test_non_json_bodies_are_422_not_500(client: TestClient) -> None:
    headers = {"content-type": "application/json"}
    for raw in (b"{not json", b'{"z": [[NaN]]}', b'{"n": 1e999}', b"[]", b""):
        response = client.post("/generate", content=raw, headers=headers)
        assert response.status_code == 422, (raw, response.text)
        assert response.json()["detail"][0]["loc"][0] == "body"


def test_body_over_the_limit_is_413(onnx_generators: dict[str, Path]) -> None:
    app = create_app(Settings(model=onnx_generators["conditional"], max_body_bytes=1024))
    big = json.dumps({"n": 1, "pad": "x" * 2048}).encode()
    with TestClient(app) as limited:
        declared = limited.post("/generate", content=big)
        # No Content-Length (chunked upload): counted while reading.
        chunked = limited.post("/generate", content=iter([big[:1000], big[1000:]]))
        assert limited.post("/generate", json={"n": 1}).status_code == 200
    for response in (declared, chunked):
        assert response.status_code == 413
        assert response.json()["detail"]


def test_openapi_schema_documents_the_api(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert set(paths) == {"/generate", "/metadata", "/healthz", "/readyz"}
    assert set(paths["/generate"]) == {"get", "post"}
    query = {p["name"]: p for p in paths["/generate"]["get"]["parameters"]}
    assert set(query) == {"n", "seed", "digit", "format", "dtype"}
    assert query["n"]["schema"]["maximum"] == 64
    responses = paths["/generate"]["get"]["responses"]
    assert {"200", "413", "422", "429", "503"} <= set(responses)
    assert {"application/json", "image/png"} == set(responses["200"]["content"])
    assert "503" in paths["/readyz"]["get"]["responses"]


# --------------------------------------------------------------------------- not ready


@pytest.mark.parametrize("problem", ["missing", "corrupt"])
def test_broken_model_starts_but_is_not_ready(
    tmp_path: Path, problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = tmp_path / "generator.onnx"
    if problem == "corrupt":
        model.write_bytes(b"\x08\x07 definitely not a protobuf" * 10)
    with TestClient(create_app(Settings(model=model))) as broken:
        assert broken.get("/healthz").status_code == 200
        ready = broken.get("/readyz")
        for path in ("/generate", "/metadata"):
            response = broken.get(path)
            assert response.status_code == 503, path
            assert "not ready" in response.json()["detail"]
        assert broken.post("/generate", json={"n": 1}).status_code == 503
    expected = "not found" if problem == "missing" else "not a loadable ONNX model"
    assert ready.status_code == 503
    assert ready.json()["ready"] is False and expected in ready.json()["reason"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(expected in message and str(model) in message for message in errors)


# --------------------------------------------------------------------------- real server


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path

    def records(self) -> list[dict]:
        """The JSON log lines so far (anything else the process printed is skipped)."""
        lines = self.log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def wait_for(self, **fields: object) -> dict:
        """The first log record with these fields; the access line is written just after
        the response is sent, so it may trail the client by a moment."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for record in self.records():
                if all(record.get(key) == value for key, value in fields.items()):
                    return record
            time.sleep(0.05)
        pytest.fail(f"no log record with {fields}:\n{self.log.read_text()[-3000:]}")


@contextlib.contextmanager
def running_server(model: Path, *, env_limits: dict | None = None) -> Iterator[Server]:
    """``python -m pipeline.serve`` on a free loopback port, up (``/healthz``) within 30 s;
    terminated (SIGTERM, then SIGKILL after 15 s) on exit."""
    port = free_port()
    env = {
        **os.environ,
        **{f"MNIST_GAN_{k.upper()}": str(v) for k, v in (env_limits or {}).items()},
    }
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "server.log"
        command = [
            sys.executable,
            "-m",
            "pipeline.serve",
            "--model",
            str(model),
            "--port",
            str(port),
        ]
        with log.open("w") as sink:
            process = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=sink)
        server = Server(process, f"http://127.0.0.1:{port}", log)
        try:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                        break
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"server did not come up:\n{log.read_text()[-3000:]}")
                time.sleep(0.05)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


@pytest.fixture(scope="module")
def live(onnx_generators: dict[str, Path]) -> Iterator[Server]:
    limits = {"max_n": 256, "max_concurrency": 1, "max_body_bytes": 4096}
    with running_server(onnx_generators["conditional"], env_limits=limits) as server:
        yield server


@pytest.mark.slow
def test_live_server_serves_without_tensorflow_on_loopback(live: Server) -> None:
    assert httpx.get(f"{live.url}/readyz").json()["ready"] is True
    body = httpx.get(f"{live.url}/generate", params={"n": 2, "seed": 1, "format": "json"}).json()
    assert body["shape"] == [2, 28, 28]
    # Neither the Python package nor its shared libraries are in the process.
    maps = Path(f"/proc/{live.process.pid}/maps").read_text()
    assert "tensorflow" not in maps and "libtensorflow" not in maps
    messages = [record["msg"] for record in live.records()]
    port = live.url.rsplit(":", 1)[1]
    assert any(f"http://127.0.0.1:{port}" in message for message in messages), messages
    access = live.wait_for(logger="pipeline.serve.access", query="n=2&seed=1&format=json")
    assert (access["method"], access["path"], access["status"]) == ("GET", "/generate", 200)
    assert access["bytes"] > 0 and access["ms"] >= 0 and access["client"].startswith("127.0.0.1:")


@pytest.mark.slow
def test_live_concurrency_limit_rejects_at_once(live: Server) -> None:
    async def burst() -> list[httpx.Response]:
        # Large requests run in worker threads, so several are in flight together.
        query = {"n": 256, "format": "json", "dtype": "float32"}
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as session:
            return await asyncio.gather(
                *(session.get("/generate", params=query) for _ in range(16))
            )

    responses = asyncio.run(burst())
    statuses = [response.status_code for response in responses]
    assert set(statuses) == {200, 429}, statuses
    rejected = next(response for response in responses if response.status_code == 429)
    assert rejected.headers["retry-after"] == "1"
    assert "MNIST_GAN_MAX_CONCURRENCY" in rejected.json()["detail"]
    # The slot is released afterwards: the next request is served.
    assert httpx.get(f"{live.url}/generate", params={"n": 1}).status_code == 200


@pytest.mark.slow
def test_live_body_limit(live: Server) -> None:
    big = json.dumps({"n": 1, "pad": "x" * 8192}).encode()
    declared = httpx.post(f"{live.url}/generate", content=big)
    chunked = httpx.post(f"{live.url}/generate", content=iter([big[:4000], big[4000:]]))
    assert (declared.status_code, chunked.status_code) == (413, 413)
    assert httpx.get(f"{live.url}/healthz").status_code == 200


@pytest.mark.slow
def test_missing_model_process_starts_and_logs_why(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "generator.onnx"
    with running_server(missing) as server:
        ready = httpx.get(f"{server.url}/readyz")
        assert ready.status_code == 503 and "not found" in ready.json()["reason"]
        assert httpx.get(f"{server.url}/generate").status_code == 503
        errors = [r for r in server.records() if r["level"] == "ERROR"]
        assert errors and str(missing) in errors[0]["msg"]


@pytest.mark.slow
def test_sigterm_shuts_down_gracefully(onnx_generators: dict[str, Path]) -> None:
    with running_server(onnx_generators["unconditional"]) as server:
        assert httpx.get(f"{server.url}/generate", params={"n": 1}).status_code == 200
        server.process.send_signal(signal.SIGTERM)
        # uvicorn finishes the in-flight requests and the lifespan, then re-raises the
        # signal, so a supervisor sees "terminated by SIGTERM" (Docker: exit code 143).
        assert server.process.wait(timeout=15) == -signal.SIGTERM
        messages = [record["msg"] for record in server.records()]
    assert "shutdown complete" in messages
    assert any(message.startswith("Finished server process") for message in messages)


def test_server_process_freezes_what_startup_built(onnx_generators: dict[str, Path]) -> None:
    """app_from_env (what each uvicorn worker runs) leaves startup's objects out of the
    garbage collector's scans: shorter pauses under load (docs/serving.md, HTTP service)."""
    code = (
        "import gc\n"
        "from pipeline.serve.app import app_from_env\n"
        "assert gc.get_freeze_count() == 0\n"
        "app_from_env()\n"
        "assert gc.get_freeze_count() > 10_000, gc.get_freeze_count()\n"
    )
    env = {**os.environ, "MNIST_GAN_MODEL": str(onnx_generators["conditional"])}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)
