#!/usr/bin/env bash
# The GPU check, one shot, under 5 minutes: the default and dcgan presets' training with XLA
# and mixed precision each on and off, beside the plain per-batch loop, as one Markdown table
# (images/s, seconds per 60k-image epoch, peak GPU memory) for docs/benchmarks.md.
# Installs nothing: run it where `make repro` or `make test` set up .venv.
#   bash bench/gpu_check.sh [data dir, default: data, else ../shared/mnist]
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || python=python3
data=${1:-data}
[ -f "$data/train-images-idx3-ubyte.gz" ] || data=../shared/mnist
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
exec timeout 290 "$python" -m bench.train_throughput --gpu-check --nets default,dcgan \
    --epochs 2 --images "${GPU_CHECK_IMAGES:-30000}" --data "$data"
