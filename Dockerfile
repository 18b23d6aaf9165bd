# Two images from one file; plain `docker build` (Docker >= 20.10, with or without BuildKit:
# the file uses no BuildKit-only syntax):
#   serve: the HTTP generation service, onnxruntime only (no TensorFlow), non-root, < 150 MB
#     docker build --target serve -t mnist-gan-serve .
#     docker run --rm -p 127.0.0.1:8000:8000 mnist-gan-serve
#   train: TensorFlow (GPU by default), DVC and MLflow; runs `dvc repro` on a mounted repo
#     docker build --target train -t mnist-gan-train .            # --build-arg DEVICE=cpu
#     docker run --rm --gpus all -u "$(id -u):$(id -g)" -v "$PWD:/repo" mnist-gan-train
# BASE_IMAGE: any Debian-like image with python3 >= 3.11 and its venv module; where no
# registry is reachable, docker/base-image.sh builds one with debootstrap.
# Behind a TLS-intercepting proxy, put its CA certificate in docker/ca/ (see the README there).
ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- serve
FROM ${BASE_IMAGE} AS serve-build
# Exact pins exported from uv.lock (make requirements/serve.txt); --no-deps: the file is the
# whole closure, so nothing unpinned sneaks in.
COPY docker/ca/ /tmp/ca/
COPY requirements/serve.txt /tmp/serve.txt
RUN if ls /tmp/ca/*.crt >/dev/null 2>&1; then \
        cat /etc/ssl/certs/ca-certificates.crt /tmp/ca/*.crt > /tmp/pip-ca.pem \
        && export PIP_CERT=/tmp/pip-ca.pem; fi \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir \
        --disable-pip-version-check --no-deps --only-binary=:all: -r /tmp/serve.txt
# binutils: strip, for the extension modules' debug symbols.
RUN apt-get update \
    && apt-get install -y --no-install-recommends binutils=2.* \
    && rm -rf /var/lib/apt/lists/*
# The image's whole filesystem in /rootfs: interpreter, trimmed stdlib and venv, the shared
# libraries they load (see the script for what is dropped and why).
COPY docker/serve_root.py /tmp/serve_root.py
RUN python3 /tmp/serve_root.py /opt/venv /rootfs
# The whole package (serve never imports the training modules, whose libraries are not
# installed here) and the model, baked in: mount another one over /models/generator.onnx to
# swap it. Readable by the service's user whatever the host's modes (exports are 0600).
COPY pipeline/ /app/pipeline/
ARG MODEL=models/generator.onnx
COPY ${MODEL} /models/generator.onnx
RUN chmod -R a+rX,go-w /app \
    && chmod 0444 /models/generator.onnx

# Distroless-style: no shell, no package manager; Python and what it loads.
FROM scratch AS serve
COPY --from=serve-build /rootfs/ /
COPY --from=serve-build /app/ /app/
COPY --from=serve-build /models/ /models/
WORKDIR /app
ENV PATH=/opt/venv/bin \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MNIST_GAN_MODEL=/models/generator.onnx \
    MNIST_GAN_HOST=0.0.0.0 \
    MNIST_GAN_PORT=8000
# A fixed numeric id, so Kubernetes' runAsNonRoot can check it and mounts can grant it access.
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('MNIST_GAN_PORT', '8000') + '/healthz', timeout=2)"]
CMD ["python", "-m", "pipeline.serve"]

# ---------------------------------------------------------------- train
FROM ${BASE_IMAGE} AS train
# gpu: tensorflow[and-cuda] brings CUDA and cuDNN as pip wheels (the host needs only the
# NVIDIA driver and container toolkit); cpu: plain tensorflow.
ARG DEVICE=gpu
ARG UV_VERSION=0.13.9
# git: DVC needs it; the repo is mounted and owned by the host user, hence safe.directory.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git=1:2.* \
    && rm -rf /var/lib/apt/lists/* \
    && git config --system --add safe.directory '*'
ENV UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1
COPY docker/ca/ /tmp/ca/
COPY pyproject.toml uv.lock /opt/project/
WORKDIR /opt/project
RUN if ls /tmp/ca/*.crt >/dev/null 2>&1; then \
        cat /etc/ssl/certs/ca-certificates.crt /tmp/ca/*.crt > /tmp/pip-ca.pem \
        && export PIP_CERT=/tmp/pip-ca.pem SSL_CERT_FILE=/tmp/pip-ca.pem; fi \
    && python3 -m venv /opt/uv \
    && /opt/uv/bin/pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}" \
    && /opt/uv/bin/uv sync --frozen --no-cache --no-install-project --no-dev --extra train \
    && if [ "$DEVICE" = gpu ]; then \
        tf="$(/opt/venv/bin/python -c 'import importlib.metadata as m; print(m.version("tensorflow"))')" \
        && /opt/uv/bin/uv pip install --no-cache --python /opt/venv/bin/python \
            "tensorflow[and-cuda]==${tf}"; fi \
    && rm -rf /opt/uv /tmp/pip-ca.pem
# Runs as whatever user `docker run -u` names, so HOME must be writable by anyone.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    TF_CPP_MIN_LOG_LEVEL=2
WORKDIR /repo
ENTRYPOINT ["dvc"]
CMD ["repro"]
