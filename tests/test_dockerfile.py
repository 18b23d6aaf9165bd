"""The Dockerfile: hadolint-clean, buildable without BuildKit, and the serve image's promises
are in it (base as a build arg, distroless final stage, non-root, HEALTHCHECK without curl,
no TensorFlow). `make docker-check` builds and runs it for real; tests/test_docker_image.py
checks the built image."""

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
    assert re.search(r"^FROM scratch AS serve$", text, re.MULTILINE)
    assert re.search(r"^USER 10001", serve, re.MULTILINE)
    assert "HEALTHCHECK" in serve and "urllib.request" in serve and "curl" not in serve
    assert "MNIST_GAN_HOST=0.0.0.0" in serve and "/models/generator.onnx" in serve
    for heavy in ("tensorflow", "dvc", "mlflow"):
        assert heavy not in stages(text)["serve-build"].lower()
    # The whole package, so new serve modules and the web page's files need no edit here.
    assert "COPY pipeline/ /app/pipeline/" in stages(text)["serve-build"]
    requirements = (REPO / "requirements" / "serve.txt").read_text().lower()
    assert "onnxruntime==" in requirements and "fastapi==" in requirements
    assert not re.search(r"^(tensorflow|keras|dvc|mlflow)", requirements, re.MULTILINE)


def test_no_buildkit_only_syntax() -> None:
    """Debian's docker.io 20.10 builds without BuildKit unless told, and a newer client
    without buildx cannot use it: the docs' plain `docker build` must work on both."""
    text = (REPO / "Dockerfile").read_text()
    for syntax in ("--mount=", "--chmod=", "--link", "--checksum=", "# syntax=", "<<"):
        assert syntax not in text, syntax
    serving = (REPO / "docs" / "serving.md").read_text()
    start = serving.index("\n## Docker\n")
    end = serving.find("\n## ", start + 1)
    docker_section = serving[start : end if end != -1 else len(serving)]
    assert "docker build --target serve -t mnist-gan-serve ." in docker_section
    assert "--secret" not in docker_section and "docker/base-image.sh" in docker_section


def test_train_image_contract() -> None:
    train = stages((REPO / "Dockerfile").read_text())["train"]
    assert "tensorflow[and-cuda]" in train and "ARG DEVICE=gpu" in train
    assert 'ENTRYPOINT ["dvc"]' in train and 'CMD ["repro"]' in train


def test_build_context_is_an_allow_list() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in lines and "!pipeline/" in lines and "!models/*.onnx" in lines  # make fetch's too
    assert "!docker/serve_root.py" in lines and "**/__pycache__" in lines
