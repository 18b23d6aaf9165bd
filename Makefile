# Two commands do all set-up on a fresh machine (Python 3.11 + make):
#   make repro   # create .venv from uv.lock, run the whole DVC pipeline
#   make test    # create .venv from uv.lock, run the test suite (slow tests included)
SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.9
VENV := .venv
UV := .uv/bin/uv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export UV_PROJECT_ENVIRONMENT := $(VENV)
export TF_CPP_MIN_LOG_LEVEL ?= 2
PRESET ?= default

.PHONY: setup repro test lint exp compare report lock clean train-multiworker

setup: $(VENV)/.synced

$(UV):
	$(PYTHON) -m venv .uv
	.uv/bin/pip install --quiet "uv==$(UV_VERSION)"

# Pinned: everything comes from uv.lock; `--frozen` refuses to re-resolve.
$(VENV)/.synced: uv.lock pyproject.toml | $(UV)
	$(UV) sync --frozen --all-extras --group dev --python $(PYTHON)
	touch $@

repro: setup
	dvc repro

test: setup
	ruff check .
	ruff format --check .
	pytest

# One preset = one ordinary DVC experiment (listed by `dvc exp show` and in MLflow):
#   make exp PRESET=seed001            # run now
#   make exp PRESET=seed001 QUEUE=1    # queue it; then `dvc queue start`
#   make exp PRESET=seed002 SET='train.epochs=300 model.d_dropout=0.3'   # preset + changes
exp: setup
	args="$$(python -m pipeline.presets exp-args $(PRESET) $(SET))" && \
	eval dvc exp run $(if $(QUEUE),--queue) -n "$(PRESET)-$$(date +%Y%m%d-%H%M%S)" $$args

# The train stage on WORKERS workers on this machine (loopback, MultiWorkerMirroredStrategy),
# with dvc.yaml's train flags; needs train.strategy: multi_worker in params.yaml. Worker 0
# writes the outputs; `dvc commit train` then records them as the stage's (see README).
WORKERS ?= 2
train-multiworker: setup
	python -m pipeline.multiworker --workers $(WORKERS)

# Every experiment side by side: the params that tell presets apart, the final losses and
# every quality metric. `make compare ARGS=-A` adds experiments made on earlier commits.
COMPARE := ^(Experiment|preset|model\.activation|model\.d_dropout|loss\.kind|loss\.label_smoothing|train\.lr_g|train\.lr_d|train\.epochs|train\.steps|reports/train.json:train_seconds|d_loss|g_loss|fid|classifier_score|precision|recall|classes_present|conditional_accuracy)$$
compare: setup
	dvc exp show --no-pager --hide-queued --hide-failed --drop '.*' --keep '$(COMPARE)' --precision 3 $(ARGS)

# Where to look after `make repro`: the numbers, and every plot as one HTML page.
report: setup
	dvc metrics show
	dvc plots show --out reports/html
	@echo "HTML report:  $(CURDIR)/reports/html/index.html"
	@echo "PNG/GIF:      $(CURDIR)/reports/plots/"
	@echo "Compare runs: dvc exp show; dvc plots diff <exp> <exp>; mlflow ui --backend-store-uri sqlite:///mlflow.db"

lint: setup
	ruff check . && ruff format --check .

lock: $(UV)
	$(UV) lock

clean:
	rm -rf $(VENV) .uv .pytest_cache .ruff_cache

.PHONY: serve docker-check

# The generation service on 127.0.0.1:8000 (env MNIST_GAN_* for limits; see README).
MODEL ?= models/generator.onnx
serve: setup
	python -m pipeline.serve --model $(MODEL)

# Builds the serve image for real (Docker daemon, debootstrap base image), runs it, calls it
# on loopback and prints its size (fails at >= 150 MB). Needs root; see docker/check.sh.
docker-check: requirements/serve.txt
	bash docker/check.sh

# The serve image's pinned dependencies, exported from uv.lock.
requirements/serve.txt: uv.lock | $(UV)
	$(UV) export --frozen --extra serve --no-dev --no-hashes --no-emit-project -o $@
