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

.PHONY: setup repro test lint exp compare sweep ui shell report lock clean push pull yardstick train-multiworker promote rollback

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
	mypy
	mkdocs build --strict --site-dir site
	pytest -n 2 --dist loadgroup  # two workers: much of the suite waits on servers and DVC

# One preset = one ordinary DVC experiment (listed by `dvc exp show` and in MLflow). It runs in
# a temp copy (`dvc exp run --temp`), as queued ones do: the workspace's outputs, and so what
# `make serve`, `make web` and the serve image ship, stay the committed pipeline's.
#   make exp PRESET=seed001            # run now; `dvc exp apply NAME` brings its outputs here
#   make exp PRESET=seed001 QUEUE=1    # queue it; then `dvc queue start`
#     (both run the download stage first, as make sweep does: temp and queued runs
#     started with `-j 2` would otherwise each commit the same data into the DVC cache at once)
#   make exp PRESET=seed002 SET='train.epochs=300 model.d_dropout=0.3'   # preset + changes
exp: setup
	args="$$(python -m pipeline.experiments.presets exp-args $(PRESET) $(SET))" && \
	name="$(PRESET)-$$(date +%Y%m%d-%H%M%S)" && dvc repro download && \
	eval dvc exp run $(if $(QUEUE),--queue,--temp) -n "$$name" $$args && \
	echo "$$name: $(if $(QUEUE),queued,done; the workspace is unchanged (make compare lists it; dvc exp apply $$name brings it here))"

# The train stage on WORKERS workers on this machine (loopback, MultiWorkerMirroredStrategy),
# with dvc.yaml's train flags; needs train.strategy: multi_worker in params.yaml. Worker 0
# writes the outputs; `dvc commit train` then records them as the stage's (docs/team.md).
WORKERS ?= 2
train-multiworker: setup
	python -m pipeline.training.multiworker --workers $(WORKERS)

# Experiments side by side, fit to the terminal: the params that differ between them, then
# fid (with the yardstick that measured it: FIDs under different yardsticks are not
# comparable), recall, precision and training seconds (pipeline/experiments/compare.py reads
# `dvc exp show --json`).
#   make compare            # WIDE=1: every differing param and every metric
#   make compare ARGS=-A    # experiments made on earlier commits too
compare: setup
	python -m pipeline.experiments.compare $(if $(WIDE),--wide) $(ARGS)

# A grid of queued experiments named after their values, then run JOBS at a time:
#   make sweep PRESET=default SET='train.lr_g=1e-4,4e-4 seed=1,2'   # 4 runs: default-lr_g-1e-4-seed-1, ...
JOBS ?= 2
sweep: setup
	python -m pipeline.experiments.sweep $(PRESET) $(SET)
	dvc queue start -j $(JOBS)
	@echo "progress: dvc queue status; then make compare, make ui"

# The MLflow UI on 127.0.0.1:$(PORT); prints the links to this project's runs (and the last sweep).
PORT ?= 5000
ui: setup
	python -m pipeline.experiments.ui --port $(PORT)

# A bash inside the project's environment: every README command works there as typed;
# `exit` leaves it. The same as `source .venv/bin/activate` (after ~/.bashrc, which may put
# other Pythons first on PATH).
shell: setup
	@echo "project environment: $(CURDIR)/$(VENV) (exit to leave)"
	@bash --rcfile <(echo '[ -f ~/.bashrc ] && . ~/.bashrc; . "$(CURDIR)/$(VENV)/bin/activate"') -i

# Where to look after `make repro`: the numbers, and every plot as one HTML page.
report: setup
	dvc metrics show
	dvc plots show --out reports/html
	@echo "HTML report:  $(CURDIR)/reports/html/index.html"
	@echo "PNG/GIF:      $(CURDIR)/reports/plots/"
	@echo "Compare runs: make compare; dvc plots diff <exp> <exp>; make ui"

# Rebuild the evaluation classifier from pipeline/evaluation/classifier.py and re-pin its SHA-256 in
# pipeline/evaluation/yardstick.py (commit both). Nothing else trains it: evaluate uses the pinned file.
yardstick: setup
	dvc repro download
	python -m pipeline.evaluation.classifier --data data

# Share the pipeline's outputs through the DVC remote (.dvc/config: a folder beside the
# clone unless overridden; docs/team.md). REMOTE=name picks another remote.
#   make push               # after `make repro` + committing dvc.lock: upload what it points to
#   make pull               # in another clone: download it; `dvc status` is then clean
push: setup
	dvc push $(if $(REMOTE),--remote $(REMOTE))

pull: setup
	dvc pull $(if $(REMOTE),--remote $(REMOTE))

# The registry path from a comparison to what ships (pipeline/tracking/registry.py): EXP's
# ONNX generator becomes the alias `champion` of the registered model, the one before it
# `previous`; a worse FID or another yardstick is refused unless FORCE=1 (the FID rule only).
#   make promote EXP=default-seed-2      # a DVC experiment's name, or an MLflow run id
#   make rollback                        # champion <-> previous
promote: setup
	python -m pipeline.tracking.registry promote $(EXP) $(if $(FORCE),--force)

rollback: setup
	python -m pipeline.tracking.registry rollback

lint: setup
	ruff check . && ruff format --check . && mypy

lock: $(UV)
	$(UV) lock

clean:
	rm -rf $(VENV) .uv .pytest_cache .ruff_cache

.PHONY: serve fetch docker-check web docs

# The documentation site (docs/, mkdocs.yml) into site/; --strict: a broken link fails it.
docs: setup
	mkdocs build --strict --site-dir site

# The generation service on 127.0.0.1:8000 (env MNIST_GAN_* for limits; docs/serving.md).
#   make serve                                          # models/generator.onnx (MODEL=...)
#   make serve MODEL_URI=models:/mnist-generator@champion   # a registry version: kill -HUP
#     swaps in what the alias points at then (RELOAD_S=60: checks every minute)
# A workspace model trained with other params than the committed ones gets a warning first.
MODEL ?= models/generator.onnx
serve: setup
	$(if $(MODEL_URI),,python -m pipeline.inference.provenance $(MODEL) &&) \
	python -m pipeline.serve $(if $(MODEL_URI),--model-uri $(MODEL_URI),--model $(MODEL)) \
	    $(if $(RELOAD_S),--reload-s $(RELOAD_S))

# A registry version as one ONNX file that records which version it is (for make web MODEL=,
# the serve image's MODEL build arg, or any other host).
#   make fetch [MODEL_URI=models:/mnist-generator@champion] [OUT=models/champion.onnx]
MODEL_URI_FETCH := $(or $(MODEL_URI),models:/mnist-generator@champion)
OUT ?= models/champion.onnx
fetch: setup
	python -m pipeline.tracking.fetch $(MODEL_URI_FETCH) --out $(OUT)

# The digits page as a static site that runs the model in the browser (onnxruntime-web,
# WebAssembly): the page, $(MODEL), its metadata and the runtime, for any static host.
#   make web [MODEL=path/to/generator.onnx] [WEB=folder]; then python -m http.server --bind 127.0.0.1 -d web 8080
WEB ?= web
ORT_WEB := node_modules/onnxruntime-web/dist/ort.wasm.min.mjs
web: setup $(ORT_WEB)
	python -m pipeline.inference.provenance $(MODEL)
	python -m pipeline.serve.page --model $(MODEL) --out $(WEB)

# Pinned by package-lock.json; installed only when missing or when the lock changed.
$(ORT_WEB): package-lock.json
	npm ci --ignore-scripts --no-audit --no-fund
	touch $@

# Builds the serve image for real (Docker daemon, debootstrap base image), runs it, calls it
# on loopback and prints its size (fails at >= 150 MB). Needs root; see docker/check.sh.
#   make docker-check MODEL=models/champion.onnx    # bakes a registry version (make fetch)
docker-check: requirements/serve.txt
	$(if $(filter command line,$(origin MODEL)),MODEL=$(MODEL)) bash docker/check.sh

# The serve image's pinned dependencies, exported from uv.lock.
requirements/serve.txt: uv.lock | $(UV)
	$(UV) export --frozen --extra serve --no-dev --no-hashes --no-emit-project -o $@

.PHONY: tracking-server tracking-server-stop team-server object-store team-remote

# A team MLflow server: PostgreSQL (unix socket under TRACKING_STATE, no TCP, no password) and
# `mlflow server` on 127.0.0.1:TRACKING_PORT with artifacts it serves itself. Runs in the
# foreground (Ctrl-C stops it); it prints the MLFLOW_TRACKING_URI to export. Data persists.
TRACKING_STATE ?= $(CURDIR)/.tracking
TRACKING_PORT ?= 5000
tracking-server: setup
	bash scripts/install_postgres.sh
	python -m pipeline.tracking.server run --state $(TRACKING_STATE) --port $(TRACKING_PORT)

tracking-server-stop: setup
	python -m pipeline.tracking.server stop --state $(TRACKING_STATE)

# A team across machines (docs/team.md, "A team across machines"): the tracking server with
# accounts, HTTPS only, on TRACKING_HOST (the address teammates reach), artifacts in the
# object store; secrets from the environment: MLFLOW_AUTH_ADMIN_PASSWORD[_FILE],
# MLFLOW_FLASK_SERVER_SECRET_KEY[_FILE], AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY[_FILE].
# The certificate: TRACKING_CERT / TRACKING_KEY, else one made in $(TRACKING_STATE)/tls.
#   make object-store &  make team-server       # on the server host
#   make team-remote S3=https://HOST:9000 CERT=cert.pem   # on a teammate's clone (DVC)
TRACKING_HOST ?= 127.0.0.1
TEAM_PORT ?= 5443
OBJECT_STORE ?= $(CURDIR)/.objects
OBJECT_STORE_PORT ?= 9000
team-server: setup
	bash scripts/install_postgres.sh
	python -m pipeline.tracking.team run --state $(TRACKING_STATE) --host $(TRACKING_HOST) \
		--port $(TEAM_PORT) --s3 https://$(TRACKING_HOST):$(OBJECT_STORE_PORT)

object-store: setup
	python -m pipeline.tracking.object_store --folder $(OBJECT_STORE) --host $(TRACKING_HOST) \
		--port $(OBJECT_STORE_PORT) --cert-dir $(TRACKING_STATE)/tls

team-remote: setup
	python -m pipeline.tracking.team_remote $(S3) $(if $(CERT),--cert $(CERT))
