"""The DVC remote every clone shares (.dvc/config): clone A pushes, a fresh `git clone` B
pulls and has nothing to rerun, experiments travel with `dvc exp push` / `dvc exp pull`, and a
missing or unreachable remote fails `dvc pull` with DVC's own message.

Clone A is the session's smoke pipeline run (conftest.smoke_pipeline), shared with the other
end-to-end tests: this file adds the cheap last stages (export, generate) and a resume check
that finds nothing left to train, but no training run of its own."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, Dvc, SmokePipeline

# xdist_group: on the worker that builds the shared smoke run (tests/conftest.py), not twice.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("smoke_pipeline")]

STAGES = ["download", "train", "export", "evaluate", "generate"]


def _digest(path: Path) -> str:
    """One hash of a file, or of a folder's names and contents."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    total = hashlib.sha256()
    for file in files:
        total.update(str(file.relative_to(path)).encode() if path.is_dir() else b"")
        total.update(hashlib.sha256(file.read_bytes()).digest())
    return total.hexdigest()


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True, timeout=60
    ).stdout


def test_a_fresh_clone_pulls_everything_and_reruns_nothing(
    smoke_pipeline: SmokePipeline, tmp_path: Path, dvc: Dvc
) -> None:
    clone_a, env_a = smoke_pipeline.repo, smoke_pipeline.env
    # A finishes the pipeline (generate: the cheap stage), commits the lock, pushes
    # to the committed default remote: a folder beside the clone, made by the first push.
    finish = dvc(clone_a, "repro", env=env_a).stdout
    assert "Running stage 'generate'" in finish and "Running stage 'train'" not in finish, finish
    _git(clone_a, "-c", "user.email=ci@example.com", "-c", "user.name=ci",
         "commit", "-qm", "the whole smoke run", "dvc.lock")  # fmt: skip
    remote = clone_a.parent / "mnist-gan-dvc-remote"
    assert dvc(clone_a, "remote", "list").stdout.split()[:2] == ["shared", str(remote)]
    dvc(clone_a, "push", env=env_a)
    assert (remote / "files" / "md5").is_dir()

    # B: a plain `git clone` of A (no DVC cache) beside it, so the committed relative url
    # names the same folder. Its own MLflow store, and no MNIST mirror: a stage that reran
    # would have to download, and would fail.
    clone_b = clone_a.parent / "clone-b"
    _git(tmp_path, "clone", "-q", str(clone_a), str(clone_b))
    env_b = {
        "MNIST_MIRROR": str(tmp_path / "no-mirror"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow-b.db'}",
    }
    assert not (clone_b / ".dvc" / "cache").exists() and not (clone_b / "models").exists()
    dvc(clone_b, "pull", env=env_b)
    for out in ["data", "models/checkpoints", "models/generator.onnx", "reports/plots"]:
        assert _digest(clone_b / out) == _digest(clone_a / out), out

    assert dvc(clone_b, "status", env=env_b).stdout.strip() == "Data and pipelines are up to date."
    repro = dvc(clone_b, "repro", env=env_b).stdout
    assert "Running stage" not in repro, repro
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in repro

    # An experiment made in B goes to A (the git remote `origin`) and the shared DVC remote;
    # B forgets it and its whole cache, then gets it back from there.
    run = dvc(clone_b, "exp", "run", "-n", "from-b", "-S", "generate.seed=1", env=env_b).stdout
    assert "Running stage 'generate'" in run and "Running stage 'train'" not in run, run
    generated = clone_b / "reports" / "generated.png"
    made = generated.read_bytes()
    assert made != (clone_a / "reports" / "generated.png").read_bytes()  # another seed
    dvc(clone_b, "exp", "push", "origin", "from-b", env=env_b)
    assert "from-b" in dvc(clone_a, "exp", "list", env=env_a).stdout

    dvc(clone_b, "exp", "remove", "from-b", env=env_b)
    shutil.rmtree(clone_b / ".dvc" / "cache")
    generated.unlink()
    dvc(clone_b, "exp", "pull", "origin", "from-b", env=env_b)
    dvc(clone_b, "exp", "apply", "from-b", env=env_b)
    assert generated.read_bytes() == made
    assert "seed: 1" in (clone_b / "params.yaml").read_text()

    # The pulled checkpoints are the real thing: a forced rerun of train resumes from them
    # (nothing left to train) instead of starting over.
    rerun = dvc(clone_b, "repro", "--force", "--single-item", "train", env=env_b)
    log = rerun.stdout + rerun.stderr
    assert "resuming from" in log and "starting fresh" not in log, log
    assert re.search(r"training (\d+) steps \(\d+ per epoch\) from step \1\b", log), log


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("where", ["missing", "unreachable"])
def test_pull_from_a_missing_or_unreachable_remote_fails_clearly(
    repo_copy: Path, dvc: Dvc, where: str
) -> None:
    """The committed dvc.lock names data that no remote here holds: the default folder does
    not exist yet (missing), or the remote is an HTTP server that is not there (unreachable,
    set the way a user overrides the url: `--local`)."""
    if where == "unreachable":
        url = f"http://127.0.0.1:{_closed_port()}/dvc"
        dvc(repo_copy, "remote", "modify", "--local", "shared", "url", url)
        assert (repo_copy / ".dvc" / "config.local").is_file()
    else:
        assert not (repo_copy.parent / "mnist-gan-dvc-remote").exists()
    result = dvc(repo_copy, "pull", check=False)
    assert result.returncode == 1
    assert "ERROR: failed to pull data from the cloud" in result.stderr, result.stderr
    assert "do not exist neither locally nor on remote" in result.stderr, result.stderr
    assert "Missing cache files:" in result.stderr
    outs = [repo_copy / name for name in ("data", "models", "reports")]
    assert not [path for out in outs for path in out.rglob("*") if path.is_file()]  # no output


def test_make_exp_leaves_the_workspace_alone(smoke_pipeline: SmokePipeline) -> None:
    """`make exp` runs in a temp copy (`dvc exp run --temp`): the workspace's params, lock and
    outputs (what `make serve` would ship) stay as they were, the experiment is listed by
    `make compare` beside the workspace's own row, and the command says how to apply it."""
    repo, env = smoke_pipeline.repo, {**os.environ, **smoke_pipeline.env}
    for tool in (".venv", ".uv"):  # this checkout's environment, as `make setup` left it
        if not (repo / tool).exists():
            (repo / tool).symlink_to(REPO / tool)
    before = {out: _digest(repo / out) for out in ("params.yaml", "dvc.lock", "models")}
    done = subprocess.run(
        ["make", "exp", "PRESET=smoke", "SET=generate.seed=2"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    name = re.search(r"^(smoke-\d{8}-\d{6}): done; the workspace is unchanged", done.stdout, re.M)
    assert name, done.stdout[-2000:]
    assert {out: _digest(repo / out) for out in before} == before
    assert _git(repo, "status", "--porcelain", "--untracked-files=no").strip() == ""
    table = subprocess.run(
        [sys.executable, "-m", "pipeline.experiments.compare"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    rows = [line.split()[0] for line in table.splitlines()[1:]]
    assert "workspace" in rows and name[1] in rows, table
