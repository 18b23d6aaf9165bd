"""pipeline.core.stage: a stage started from a plain shell runs in the project's environment (or
says in one line what to run), and TensorFlow's start-up noise is filtered, not its errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data.mnist import FILES

REPO = Path(__file__).resolve().parent.parent


def _plain_shell(tmp_path: Path) -> dict[str, str]:
    """A shell whose `python` is a bare venv (no numpy, pydantic, ...), with the project's
    `dvc` called by its path, as a dvc installed with pipx would be."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", bare], check=True)
    return {
        "PATH": f"{bare / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": os.environ.get("HOME", str(tmp_path)),
    }


@pytest.mark.slow
def test_dvc_repro_from_a_plain_shell_runs_the_stage_in_the_project_environment(
    repo_copy: Path, shared_mnist: Path, tmp_path: Path
) -> None:
    env = {**_plain_shell(tmp_path), "MNIST_MIRROR": str(shared_mnist)}
    dvc = [str(REPO / ".venv" / "bin" / "dvc"), "repro", "download"]

    # Not set up: one line that says what to run, before the stage does any work.
    failed = subprocess.run(dvc, cwd=repo_copy, env=env, capture_output=True, text=True)
    assert failed.returncode != 0
    (error,) = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert "not the project's environment" in error and "make setup" in error, error
    assert "Traceback" not in failed.stderr

    # Set up (`make setup` made .venv): the stage restarts under it and succeeds.
    (repo_copy / ".venv").symlink_to(REPO / ".venv")
    done = subprocess.run(dvc, cwd=repo_copy, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert all((repo_copy / "data" / spec.gz_name).is_file() for spec in FILES)


def test_tensorflow_startup_noise_is_dropped_and_real_errors_kept() -> None:
    """The filter on fd 2, fed the lines TensorFlow 2.21 writes on a CPU machine."""
    lines = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1 port.cc:153] oneDNN custom operations are on. You may see slightly",
        "I0000 00:00:1 cpu_feature_guard.cc:227] This TensorFlow binary is optimized",
        "To enable the following instructions: AVX2 FMA, in other operations, rebuild",
        "E0000 00:00:1 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error (303)",
        "E0000 00:00:1 some_kernel.cc:1] a real error",
        "W0000 00:00:1 some_op.cc:1] a real warning",
    ]
    code = (
        "import os, sys; from pipeline.core.stage import quiet_tensorflow_startup as q; q(); "
        f"os.write(2, {chr(10).join(lines)!r}.encode() + b'\\n'); "
        "sys.stderr.write('50%\\r100%\\n'); print('out')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"out\n"
    kept = [
        "E0000 00:00:1 some_kernel.cc:1] a real error",
        "W0000 00:00:1 some_op.cc:1] a real warning",
    ]
    if list(Path("/dev").glob("nvidia[0-9]*")):  # with a GPU, a failed cuInit is an error
        kept.insert(0, lines[4])
    assert result.stderr.decode() == "".join(f"{line}\n" for line in kept) + "50%\r100%\n"
