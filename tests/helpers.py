"""What tests share besides fixtures: the loopback MNIST mirror, dvc.yaml's paths laid out
under a folder, real `dvc` and `git` runs, and a copy of this repo. Imported as
``from helpers import ...``; conftest.py holds the fixtures built on them."""

from __future__ import annotations

import contextlib
import http.server
import os
import shlex
import shutil
import socket
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

from pipeline.core.params import Params

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
    """pipeline.training.train.Outputs laid out as dvc.yaml lays them out, under ``root``."""
    from pipeline.training.train import Outputs

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


@dataclass(frozen=True)
class SmokePipeline:
    repo: Path  # a repo copy on the smoke preset, `dvc repro evaluate` done, dvc.lock committed
    env: dict[str, str]  # what every `dvc` call in it needs: the mirror, its MLflow store
    tracking_uri: str


def with_train(smoke: Params, **train: Any) -> Params:
    """``smoke`` with some ``train.*`` keys changed."""
    return smoke.model_copy(update={"train": smoke.train.model_copy(update=train)})


def free_port() -> int:
    """A loopback port nothing listens on now (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll ``predicate`` every half second; fail naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for {what}"
        time.sleep(0.5)


def tracking_env(uri: str, **extra: str) -> dict[str, str]:
    """The environment of a stage subprocess that logs into the tracking server at ``uri``."""
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": str(REPO),
        **extra,
    }


@dataclass
class TrainStage:
    """The real train stage running in a subprocess under ``root``, logging to ``uri``."""

    proc: subprocess.Popen[bytes]
    uri: str
    experiment: str
    root: Path

    def first_epoch_logged(self) -> bool:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        found = client.get_experiment_by_name(self.experiment)
        runs = client.search_runs([found.experiment_id]) if found else []
        return bool(runs and "d_loss" in runs[0].data.metrics)

    @property
    def output(self) -> str:
        return (self.root / "train.log").read_text()


@contextlib.contextmanager
def train_stage(
    uri: str, raw_params: dict[str, Any], data: Path, root: Path, epochs: int, wait_s: int
) -> Iterator[TrainStage]:
    """``stages.train`` on the smoke preset for ``epochs`` epochs, in a fresh experiment on
    the tracking server at ``uri``, waiting ``wait_s`` for an absent server at the end; killed
    if still running when the block ends."""
    from pipeline.core.params import apply_overrides
    from pipeline.experiments.presets import load_preset

    params = apply_overrides(raw_params, {**load_preset("smoke"), "train.epochs": epochs})
    params["mlflow"]["experiment"] = experiment = f"train-{time.time_ns()}"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    command = [sys.executable, "-m", "stages.train",
               *stage_args("train", root, params=root / "params.yaml", data=data)]  # fmt: skip
    env = tracking_env(uri, MNIST_GAN_TRACKING_WAIT_S=str(wait_s))
    with (root / "train.log").open("w") as log:
        proc = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield TrainStage(proc, uri, experiment, root)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


@contextlib.contextmanager
def small_disk(where: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted at ``where`` (root only; skips saying why if not)."""
    where.mkdir(parents=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command here: the fault tests need a real small filesystem")
    command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]
    mounted = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({mounted.stderr.strip()}): needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True, timeout=30)


def fill(disk: Path, leave: int, name: str = "ballast") -> Path:
    """A ballast file taking all but ``leave`` bytes of ``disk``."""
    ballast = disk / name
    with ballast.open("wb") as handle:
        handle.write(b"\1" * (shutil.disk_usage(disk).free - leave))
    return ballast


def evaluated_run(
    store: Any, experiment: str, name: str, fid: float, model: Path, yardstick: str
) -> str:
    """A training run as the pipeline leaves it in ``store`` (a runs.Store): its ONNX model
    logged by the export stage's own code, the evaluation's FID and yardstick tag."""
    import mlflow

    from pipeline.core.files import write_json
    from pipeline.tracking import runs
    from pipeline.training.export import log_to_mlflow

    with runs.start_run(store, experiment, name, {"preset": "smoke"}) as run:
        mlflow.log_metric("fid", fid)
        mlflow.set_tag("yardstick", yardstick)
    run_file = store.root / f"{name}.json"
    write_json(run_file, runs.run_info(run, store))
    log_to_mlflow(model, run_file, None, {"parity_max_abs_diff": 0.0})
    return str(run.info.run_id)


@dataclass
class Outcome:
    began: float  # time.monotonic() when the request was sent
    ended: float
    result: int | str  # the HTTP status, or the transport error's class name


def load_client(
    url: str,
    stop: threading.Event,
    outcomes: list[Outcome],
    params: dict[str, Any],
    pause: float = 0.0,
) -> None:
    """One client on one keep-alive connection: requests ``pause`` s apart (``seed`` counting
    up) until ``stop``, the server refuses it, 2000 requests or 120 s, whichever is first."""
    import httpx

    deadline = time.monotonic() + 120
    with httpx.Client(timeout=20, limits=httpx.Limits(max_connections=1)) as client:
        for seed in range(2000):
            if stop.is_set() or time.monotonic() > deadline:
                return
            began = time.monotonic()
            try:
                result: int | str = client.get(url, params={**params, "seed": seed}).status_code
            except httpx.TransportError as error:
                result = type(error).__name__
            outcomes.append(Outcome(began, time.monotonic(), result))
            if isinstance(result, str):
                return  # refused or closed: the server is going
            time.sleep(pause)


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 60) -> None:
    """Until ``url``/readyz answers 200; fails when the server exits or ``timeout`` passes."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        assert server.poll() is None, "the server exited"
        assert time.monotonic() < deadline, f"not ready within {timeout} s"
        time.sleep(0.1)
