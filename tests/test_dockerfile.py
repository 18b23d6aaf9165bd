"""The Dockerfile: hadolint-clean, and the serve image's promises are in it (slim base as a
build arg, non-root, HEALTHCHECK without curl, no TensorFlow, loopback-only unless the
container opts in). `make docker-check` builds and runs it for real."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HADOLINT = REPO / ".venv" / "bin" / "hadolint"


def stages(text: str) -> dict[str, str]:
    parts = re.split(r"^FROM ", text, flags=re.MULTILINE)[1:]
    return {part.split()[2]: part for part in parts}  # "BASE AS name ..."


def test_hadolint_is_clean() -> None:
    result = subprocess.run(
        [str(HADOLINT), "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_serve_image_contract() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text
    serve = stages(text)["serve"]
    assert re.search(r"^USER 10001", serve, re.MULTILINE)
    assert "HEALTHCHECK" in serve and "urllib.request" in serve and "curl" not in serve
    assert "MNIST_GAN_HOST=0.0.0.0" in serve and "/models/generator.onnx" in serve
    for heavy in ("tensorflow", "dvc", "mlflow"):
        assert heavy not in stages(text)["serve-deps"].lower()
    requirements = (REPO / "requirements" / "serve.txt").read_text().lower()
    assert "onnxruntime==" in requirements and "fastapi==" in requirements
    assert not re.search(r"^(tensorflow|keras|dvc|mlflow)", requirements, re.MULTILINE)


def test_train_image_contract() -> None:
    train = stages((REPO / "Dockerfile").read_text())["train"]
    assert "tensorflow[and-cuda]" in train and "ARG DEVICE=gpu" in train
    assert 'ENTRYPOINT ["dvc"]' in train and 'CMD ["repro"]' in train


def test_build_context_is_an_allow_list() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in lines and "!pipeline/serve.py" in lines and "!models/generator.onnx" in lines
