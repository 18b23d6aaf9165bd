"""The built serve image (the one `make docker-check` tags), where a Docker daemon runs: under
its size budget, non-root, no shell, no TensorFlow, and answering with the same PNG and JSON
bytes as this checkout's own service, for the model baked into it. Skipped, with the reason,
where no daemon is reachable or the image was never built (that takes minutes: `make
docker-check`). It checks the image as last built: rerun `make docker-check` after changing
what goes in."""

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipeline.serve.app import Settings, create_app

REPO = Path(__file__).resolve().parent.parent
CHECK = REPO / "docker" / "check.sh"
IMAGE = re.search(r'IMAGE="\$\{IMAGE:-([^}]+)\}"', CHECK.read_text())[1]  # type: ignore[index]
MAX_MB = int(re.search(r'MAX_MB="\$\{MAX_MB:-(\d+)\}"', CHECK.read_text())[1])  # type: ignore[index]


def docker(*args: str, timeout: float = 60) -> str:
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()  # `docker exec` errors go to stdout
        raise RuntimeError(f"docker {' '.join(args)}: {output}")
    return result.stdout.strip()


@pytest.fixture(scope="module")
def image() -> dict:
    if shutil.which("docker") is None:
        pytest.skip("no docker client installed (make docker-check installs docker.io, as root)")
    try:
        docker("info", timeout=20)
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        last_line = str(error).strip().splitlines()[-1]  # `docker info` prints the client first
        pytest.skip(
            f"no Docker daemon reachable (make docker-check starts one, as root): {last_line}"
        )
    try:
        (config,) = json.loads(docker("image", "inspect", IMAGE))
    except RuntimeError:
        pytest.skip(f"image {IMAGE} not built: run `make docker-check` (builds it, minutes)")
    return config


@pytest.fixture(scope="module")
def container(image: dict) -> Iterator[str]:
    """The image running as `docker run` starts it, published on a free loopback port."""
    name = docker("run", "-d", "-p", "127.0.0.1::8000", IMAGE)
    try:
        host, port = docker("port", name, "8000/tcp").splitlines()[0].rsplit(":", 1)
        url = f"http://{host}:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    pytest.fail(f"{IMAGE} not ready within 30 s:\n{docker('logs', name)}")
                time.sleep(0.2)
        yield name + " " + url
    finally:
        docker("rm", "-f", name)


def test_size_is_within_budget(image: dict) -> None:
    assert image["Size"] < MAX_MB * 1_000_000, f"{image['Size'] / 1e6:.1f} MB >= {MAX_MB} MB"


def test_runs_as_non_root_with_a_healthcheck(image: dict) -> None:
    config = image["Config"]
    assert config["User"] == "10001:10001"
    assert config["Healthcheck"]["Test"][0] == "CMD"  # exec form: no shell in the image


def test_has_no_shell_nor_tensorflow(container: str) -> None:
    name = container.split()[0]
    with pytest.raises(RuntimeError, match=r"executable file not found|no such file"):
        docker("exec", name, "sh", "-c", "true")
    found = docker(
        "exec",
        name,
        "python",
        "-c",
        "import importlib.util as u; "
        "print(*[m for m in ('tensorflow', 'keras', 'dvc', 'mlflow') if u.find_spec(m)])",
    )
    assert found == ""
    assert docker("exec", name, "python", "-c", "import os; print(os.getuid())") == "10001"


def test_answers_match_this_checkout(container: str, tmp_path: Path) -> None:
    """Same request, same bytes: the image's trimmed numpy, onnxruntime and Pillow behave as
    the checkout's environment does (PNG encoding included), and /metadata says what the
    image holds (a baked registry version: its name, version, alias, run)."""
    name, url = container.split()
    docker("cp", f"{name}:/models/generator.onnx", str(tmp_path / "generator.onnx"))
    with TestClient(create_app(Settings(model=tmp_path / "generator.onnx"))) as local:
        for query in ("generate?n=16&seed=1", "generate?n=3&seed=7&format=json", "metadata"):
            with urllib.request.urlopen(f"{url}/{query}", timeout=10) as response:
                served = response.read()
            assert served == local.get(f"/{query}").content, query
