# Two images from one file (BuildKit; Docker >= 20.10 or buildx):
#   serve: the HTTP generation service, onnxruntime only (no TensorFlow), non-root
#     docker build --target serve -t mnist-gan-serve .
#     docker run --rm -p 127.0.0.1:8000:8000 mnist-gan-serve
#   train: TensorFlow (GPU by default), DVC and MLflow; runs `dvc repro` on a mounted repo
#     docker build --target train -t mnist-gan-train .            # --build-arg DEVICE=cpu
#     docker run --rm --gpus all -u "$(id -u):$(id -g)" -v "$PWD:/repo" mnist-gan-train
# BASE_IMAGE: any Debian-like image with python3 >= 3.11 and its venv module; where no
# registry is reachable, docker/base-image.sh builds one with debootstrap.
# Behind a TLS-intercepting proxy, hand pip the CA bundle as a build secret:
#   docker build --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt ...
ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- serve
FROM ${BASE_IMAGE} AS serve-deps
# Exact pins exported from uv.lock (make requirements/serve.txt); --no-deps: the file is the
# whole closure, so nothing unpinned sneaks in. Then drop what serving never imports (pip,
# setuptools, test suites, onnxruntime's model-conversion tools): ~35 MB.
COPY requirements/serve.txt /tmp/serve.txt
RUN --mount=type=secret,id=pip_cert,required=false \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps \
        --only-binary=:all: -r /tmp/serve.txt \
    && /opt/venv/bin/pip uninstall --yes --disable-pip-version-check pip setuptools \
    && find /opt/venv -depth -type d -name tests -exec rm -rf {} + \
    && rm -rf /opt/venv/lib/python3*/site-packages/onnxruntime/transformers \
        /opt/venv/lib/python3*/site-packages/onnxruntime/quantization \
        /opt/venv/lib/python3*/site-packages/onnxruntime/tools \
        /opt/venv/lib/python3*/site-packages/onnxruntime/datasets

FROM ${BASE_IMAGE} AS serve
# A fixed numeric id, so Kubernetes' runAsNonRoot can check it and mounts can grant it access.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home app
COPY --from=serve-deps /opt/venv /opt/venv
WORKDIR /app
# Only the params-free inference path: no TensorFlow, DVC or MLflow in this image.
COPY pipeline/__init__.py pipeline/files.py pipeline/images.py pipeline/inference.py pipeline/page.py \
    pipeline/serve.py pipeline/serve_api.py pipeline/serve_logging.py pipeline/serve_middleware.py \
    pipeline/serve_settings.py pipeline/
# The digits page at / (a few KB; the static site's WebAssembly runtime is not in the image).
COPY pipeline/web/index.html pipeline/web/app.js pipeline/web/latents.js pipeline/web/style.css pipeline/web/
# The model is baked in; mount another one over /models/generator.onnx to swap it.
ARG MODEL=models/generator.onnx
# World-readable whatever the host's mode (exports are written 0600 via a temp file).
COPY --chmod=0444 ${MODEL} /models/generator.onnx
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MNIST_GAN_MODEL=/models/generator.onnx \
    MNIST_GAN_HOST=0.0.0.0 \
    MNIST_GAN_PORT=8000
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
COPY pyproject.toml uv.lock /opt/project/
WORKDIR /opt/project
RUN --mount=type=secret,id=pip_cert,required=false \
    if [ -f /run/secrets/pip_cert ]; then \
        export PIP_CERT=/run/secrets/pip_cert SSL_CERT_FILE=/run/secrets/pip_cert; fi \
    && python3 -m venv /opt/uv \
    && /opt/uv/bin/pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}" \
    && /opt/uv/bin/uv sync --frozen --no-cache --no-install-project --no-dev --extra train \
    && if [ "$DEVICE" = gpu ]; then \
        tf="$(/opt/venv/bin/python -c 'import importlib.metadata as m; print(m.version("tensorflow"))')" \
        && /opt/uv/bin/uv pip install --no-cache --python /opt/venv/bin/python \
            "tensorflow[and-cuda]==${tf}"; fi \
    && rm -rf /opt/uv
# Runs as whatever user `docker run -u` names, so HOME must be writable by anyone.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    TF_CPP_MIN_LOG_LEVEL=2
WORKDIR /repo
ENTRYPOINT ["dvc"]
CMD ["repro"]
