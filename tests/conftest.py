"""Shared fixtures: the real MNIST files (from ../shared/mnist, served over loopback HTTP so
the real download path runs) and a shrunken config that tests feed to the same code users
run."""

from __future__ import annotations

import contextlib
import http.server
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.mnist import FILES
from pipeline.params import Params, apply_overrides, parse_params
from pipeline.presets import load_preset

REPO = Path(__file__).resolve().parent.parent
SHARED_MNIST = REPO.parent / "shared" / "mnist"

# A fault is (status, body_transform, delay_s); the server pops one per request to a path,
# then serves normally.
Fault = tuple[int, Callable[[bytes], bytes] | None, float]


class MirrorHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        server: MirrorServer = self.server  # type: ignore[assignment]
        name = self.path.rsplit("/", 1)[-1]
        server.requests.append((self.path, self.headers.get("Range")))
        faults = server.faults.get(name, [])
        status, transform, delay = faults.pop(0) if faults else (200, None, 0.0)
        path = server.root / name
        if status != 200 or not path.is_file():
            self.send_response(status if status != 200 else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = path.read_bytes()
        claimed = len(body)
        if transform is not None:
            body = transform(body)
        start = 0
        ranged = self.headers.get("Range")
        if ranged and server.honour_range:
            start = int(ranged.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{claimed - 1}/{claimed}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(claimed - start))
        self.end_headers()
        if delay:
            time.sleep(delay)
        with contextlib.suppress(ConnectionError):
            self.wfile.write(body[start:])
            self.wfile.flush()
        self.close_connection = True


class MirrorServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), MirrorHandler)
        self.root = root
        self.faults: dict[str, list[Fault]] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.honour_range = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/mnist/"


@pytest.fixture(autouse=True)
def _no_ambient_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    """$MNIST_MIRROR (set by .ci/run and offline users) would bypass the loopback mirrors the
    tests serve; tests that want it set it themselves."""
    monkeypatch.delenv("MNIST_MIRROR", raising=False)


@pytest.fixture(scope="session")
def shared_mnist() -> Path:
    if not all((SHARED_MNIST / spec.gz_name).is_file() for spec in FILES):
        pytest.fail(f"MNIST test data missing: expected the four .gz files in {SHARED_MNIST}")
    return SHARED_MNIST


@contextlib.contextmanager
def serve_mirror(root: Path) -> Iterator[MirrorServer]:
    server = MirrorServer(root)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def mirror(shared_mnist: Path) -> Iterator[MirrorServer]:
    """A loopback HTTP mirror of ../shared/mnist; set ``mirror.faults`` to inject failures."""
    with serve_mirror(shared_mnist) as server:
        yield server


@pytest.fixture
def mirror_factory(shared_mnist: Path) -> Iterator[Callable[[Path], MirrorServer]]:
    with contextlib.ExitStack() as stack:
        yield lambda root=shared_mnist: stack.enter_context(serve_mirror(root))


@pytest.fixture(scope="session")
def mnist_dir(shared_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data/ folder holding the four verified files, as the download stage leaves it."""
    data = tmp_path_factory.mktemp("data")
    for spec in FILES:
        shutil.copy(shared_mnist / spec.gz_name, data / spec.gz_name)
    return data


@pytest.fixture(scope="session")
def raw_params() -> dict[str, Any]:
    with (REPO / "params.yaml").open() as handle:
        return yaml.safe_load(handle)


@pytest.fixture(scope="session")
def smoke_params(raw_params: dict[str, Any]) -> Params:
    """params.yaml with the smoke preset applied: 1 epoch on 512 images, tiny nets, CPU."""
    return parse_params(apply_overrides(raw_params, load_preset("smoke")))


@pytest.fixture(scope="session", autouse=True)
def _training_thread_pools(smoke_params: Params) -> None:
    """Fix TensorFlow's thread pools at the plan of the tests' in-process trainings before
    any test starts TensorFlow: a stage's fresh process uses that plan too, so references
    trained here match it, and ``train`` refuses where a test left other pools."""
    from pipeline.cpu import cores
    from pipeline.distribute import set_thread_pools

    set_thread_pools(smoke_params.train, cores())


def stage_paths(stage: str, root: Path) -> dict[str, Path]:
    """The ``--flag path`` pairs of ``stage``'s cmd in dvc.yaml (the one map of files), the
    paths moved under ``root``: tests lay files out exactly as the pipeline does."""
    cmd = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    words = shlex.split(cmd)
    flags = {words[i]: words[i + 1] for i in range(len(words) - 1) if words[i].startswith("--")}
    return {flag[2:].replace("-", "_"): root / path for flag, path in flags.items()}


def stage_args(stage: str, root: Path, **replace: Path) -> list[str]:
    """``stage``'s cmd flags as a list, paths under ``root``, some ``replace``d."""
    paths = {**stage_paths(stage, root), **replace}
    return [
        word for name, path in paths.items() for word in (f"--{name.replace('_', '-')}", str(path))
    ]


def train_outputs(root: Path) -> Any:
    """pipeline.train.Outputs laid out as dvc.yaml lays them out, under ``root``."""
    from pipeline.train import Outputs

    paths = stage_paths("train", root)
    return Outputs(**{name: paths[name] for name in Outputs.__dataclass_fields__})


Dvc = Callable[..., subprocess.CompletedProcess[str]]


def run_dvc(
    repo: Path, *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """This venv's `dvc` in ``repo``, with ``env`` over ours; ``check`` asserts it succeeded.
    Bounded in time, like every request loop in the tests."""
    full_env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **(env or {}),
    }
    result = subprocess.run(
        ["dvc", *args], cwd=repo, env=full_env, capture_output=True, text=True, timeout=600
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture
def dvc() -> Dvc:
    return run_dvc


GIT = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci"]


def copy_repo(dest: Path) -> Path:
    """A fresh git + DVC repo at ``dest`` holding this repo's tracked sources, committed."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for name in files:
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    subprocess.run([*GIT, "init", "-q"], cwd=dest, check=True)
    subprocess.run([*GIT, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*GIT, "commit", "-qm", "copy"], cwd=dest, check=True)
    return dest


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """A fresh git + DVC copy of this repo's tracked sources, for end-to-end `dvc` runs."""
    return copy_repo(tmp_path / "repo")


@dataclass(frozen=True)
class SmokePipeline:
    repo: Path  # a repo copy on the smoke preset, `dvc repro evaluate` done, dvc.lock committed
    env: dict[str, str]  # what every `dvc` call in it needs: the mirror, its MLflow store
    tracking_uri: str


@pytest.fixture(scope="session")
def smoke_pipeline(
    raw_params: dict[str, Any], shared_mnist: Path, tmp_path_factory: pytest.TempPathFactory
) -> SmokePipeline:
    """The pipeline up to evaluate (download, train, export, evaluate), run ONCE per
    session through real DVC: the costly part of the end-to-end tests, shared by them. Tests
    read it; one that changes a tracked file commits it or puts it back."""
    root = tmp_path_factory.mktemp("smoke_pipeline")
    repo = copy_repo(root / "repo")
    smoke = apply_overrides(raw_params, load_preset("smoke"))
    (repo / "params.yaml").write_text(yaml.safe_dump(smoke, sort_keys=False))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {"MNIST_MIRROR": str(shared_mnist), "MLFLOW_TRACKING_URI": uri}
    run_dvc(repo, "repro", "evaluate", env=env)
    subprocess.run([*GIT, "add", "params.yaml", "dvc.lock"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-qm", "smoke run"], cwd=repo, check=True)
    return SmokePipeline(repo, env, uri)


@pytest.fixture(scope="session")
def onnx_generators(smoke_params: Params, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Small exported ONNX generators (untrained smoke-preset nets), as the export stage
    writes them: {"unconditional": Path, "conditional": Path}. The unconditional one uses
    sigmoid output and uniform noise, the conditional one tanh and normal noise, so both
    output scalings and noise kinds are covered. Imports TensorFlow (once per session)."""
    import keras

    from pipeline.export import export_model
    from pipeline.models import build_generator

    out = tmp_path_factory.mktemp("onnx")
    variants = {
        "unconditional": {"conditional": False, "output": "sigmoid", "noise": "uniform"},
        "conditional": {"conditional": True, "output": "tanh", "noise": "normal"},
    }
    paths = {}
    for name, update in variants.items():
        model = smoke_params.model.model_copy(update=update)
        params = smoke_params.model_copy(update={"model": model})
        keras.utils.set_random_seed(0)
        paths[name] = out / f"{name}.onnx"
        export_model(build_generator(model), params, paths[name], run_id="test-run")
    return paths
