#!/usr/bin/env bash
# `make docker-check`: build the serve image for real, run it, and call it over loopback.
#   1. a Docker daemon (Debian's docker.io; dockerd started in the background if needed),
#   2. a base image made locally with debootstrap (no registry needed), as BASE_IMAGE,
#   3. the model: models/generator.onnx, else an untrained smoke-preset generator exported
#      by the pipeline's own code (the image's plumbing is what is checked, not the digits),
#   4. docker build --target serve (docs/serving.md's command, no BuildKit needed), docker run,
#      GET /readyz and /generate, docker stop; the image's size must stay under MAX_MB.
# Env: BASE_IMAGE (skip debootstrap), IMAGE (tag), PORT (host port on 127.0.0.1), MAX_MB.
# Needs root (apt-get, dockerd, debootstrap).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${IMAGE:-mnist-gan-serve:check}"
PORT="${PORT:-18080}"
MAX_MB="${MAX_MB:-150}"  # the serve image's size budget (tests/test_docker_image.py too)
PYTHON="${PYTHON:-.venv/bin/python}"
log() { echo "[docker-check] $*" >&2; }

# 1. Docker. The Dockerfile needs no BuildKit, so any client builds it: Debian's docker.io
# 20.10 with its classic builder, newer ones with BuildKit or, without buildx, classic.
if ! command -v dockerd >/dev/null; then
    log "installing docker.io"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io
fi
DOCKER="${DOCKER:-docker}"
if ! "$DOCKER" info >/dev/null 2>&1; then
    log "starting dockerd (log: /tmp/dockerd.log)"
    nohup dockerd >/tmp/dockerd.log 2>&1 &
    for _ in $(seq 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 1; done
    "$DOCKER" info >/dev/null || { log "dockerd did not come up"; tail -20 /tmp/dockerd.log; exit 1; }
fi

# 2. Base image.
if [[ -z "${BASE_IMAGE:-}" ]]; then
    BASE_IMAGE=mnist-gan-base:bookworm
    docker/base-image.sh "$BASE_IMAGE"
fi

# 3. Model: MODEL (e.g. make fetch's models/champion.onnx), else the workspace's, else a stand-in.
model=${MODEL:-models/generator.onnx}
if [[ -n "${MODEL:-}" && ! -f "$model" ]]; then
    log "MODEL=$model: no such file (make fetch writes models/champion.onnx)"
    exit 2
fi
"$PYTHON" -m pipeline.inference.provenance "$model" || true
if [[ ! -f "$model" ]]; then
    model=.cache/docker-check/generator.onnx
    if [[ ! -f "$model" ]]; then
        log "no $model: exporting an untrained smoke-preset generator to $model"
        TF_CPP_MIN_LOG_LEVEL=2 "$PYTHON" - "$model" <<'PY'
import sys
from pathlib import Path

from pipeline.training.export import export_model
from pipeline.training.models import build_generator
from pipeline.core.params import apply_overrides, parse_params
from pipeline.experiments.presets import load_preset
import yaml

raw = yaml.safe_load(Path("params.yaml").read_text())
params = parse_params(apply_overrides(raw, load_preset("smoke")))
export_model(build_generator(params.model), params, Path(sys.argv[1]), run_id="docker-check")
PY
    fi
fi

# 4. Build, run, call, stop.
# A TLS-intercepting proxy's CA (as on this workplace) must reach pip inside the build:
# the host's local CAs go to docker/ca/ (git-ignored; only the build stage sees them).
shopt -s nullglob
for cert in /usr/local/share/ca-certificates/*.crt; do cp "$cert" docker/ca/; done
shopt -u nullglob
log "building $IMAGE from $BASE_IMAGE with model $model"
start=$(date +%s)
"$DOCKER" build --network host --target serve \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "MODEL=$model" -t "$IMAGE" .
log "built in $(( $(date +%s) - start )) s"

name="mnist-gan-check-$$"
trap '"$DOCKER" rm -f "$name" >/dev/null 2>&1 || true' EXIT
# Published on loopback only; inside, the image binds 0.0.0.0 (MNIST_GAN_HOST).
# --health-interval: run the image's HEALTHCHECK now rather than after its 30 s interval.
"$DOCKER" run -d --name "$name" --health-interval 1s -p "127.0.0.1:$PORT:8000" "$IMAGE" >/dev/null
url="http://127.0.0.1:$PORT"
"$PYTHON" - "$url" <<'PY'
import json
import sys
import time
import urllib.error
import urllib.request

url = sys.argv[1]
deadline = time.monotonic() + 30
while True:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            ready = json.load(response)
            break
    except (urllib.error.URLError, ConnectionError) as error:
        if time.monotonic() > deadline:
            sys.exit(f"/readyz not ready within 30 s: {error}")
        time.sleep(0.2)
print("readyz:", ready)
with urllib.request.urlopen(f"{url}/generate?n=4&seed=1&format=json", timeout=10) as response:
    body = json.load(response)
assert body["shape"] == [4, 28, 28] and body["seed"] == 1, body["shape"]
with urllib.request.urlopen(f"{url}/generate?n=16&seed=1", timeout=10) as response:
    png = response.read()
assert response.headers["Content-Type"] == "image/png" and png.startswith(b"\x89PNG"), png[:8]
print(f"generate: json {body['shape']}, png {len(png)} bytes")
with urllib.request.urlopen(f"{url}/", timeout=10) as response:  # the digits page
    page = response.read()
assert response.headers["Content-Type"].startswith("text/html") and b"app.js" in page, page[:80]
PY
# No shell or coreutils in the image: ask its Python.
user=$("$DOCKER" exec "$name" python -c 'import os; print(os.getuid())')
# TensorFlow must not be importable (nor DVC/MLflow): serve runs on onnxruntime alone.
heavy=$("$DOCKER" exec "$name" python -c 'import importlib.util as u
print(*[m for m in ("tensorflow", "keras", "dvc", "mlflow") if u.find_spec(m)])')
health=""
for _ in $(seq 20); do
    health=$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$name")
    [[ "$health" == starting ]] || break
    sleep 1
done
stop_start=$(date +%s%N)
"$DOCKER" stop -t 10 "$name" >/dev/null
stopped_ms=$(( ($(date +%s%N) - stop_start) / 1000000 ))
exit_code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$name")
"$DOCKER" logs "$name" 2>&1 | tail -3
size=$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE")
log "image $IMAGE: $(( size / 1000000 )) MB ($size bytes, budget $MAX_MB MB); runs as uid $user; health: $health"
log "stopped (SIGTERM) in ${stopped_ms} ms with exit code $exit_code; heavy packages: ${heavy:-none}"
# 0 or 143 (128 + SIGTERM): uvicorn shuts down gracefully, then re-raises the signal,
# which PID 1 ignores.
[[ "$user" != 0 && ( "$exit_code" == 0 || "$exit_code" == 143 ) && "$health" == healthy \
    && -z "$heavy" && "$size" -lt $(( MAX_MB * 1000000 )) ]] || { log "FAILED"; exit 1; }
log "OK"
