"""The DVC remote fills up halfway through a push, for real: a folder remote on a small tmpfs
the test mounts (root only; skips saying why elsewhere). `dvc push` and `dvc exp push` fail
with DVC's own message and leave no object under its final name half-written; once the store
has space again the same commands complete, and a fresh clone pulls every output whole.

A repo of its own with one cheap stage (six 256 KiB files from a seeded RNG): what is under
test is DVC's transfer, not the pipeline, and this keeps it to seconds."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from helpers import GIT, Dvc, fill, small_disk

pytestmark = pytest.mark.slow
PARTS, PART_BYTES = 6, 256 * 1024
MAKE = f"""import pathlib, random, yaml
rng = random.Random(yaml.safe_load(open("params.yaml"))["seed"])
out = pathlib.Path("out")
out.mkdir(exist_ok=True)
for part in range({PARTS}):
    (out / f"part{{part}}.bin").write_bytes(rng.randbytes({PART_BYTES}))
"""
DVC_YAML = """stages:
  make:
    cmd: python make.py
    deps: [make.py]
    params: [seed]
    outs: [out]
"""


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _git(repo: Path, *args: str) -> None:
    subprocess.run([*GIT, *args], cwd=repo, check=True, capture_output=True, timeout=60)


def _objects_are_whole(remote: Path) -> int:
    """Every object under its final name in the remote hashes to that name (DVC's own
    ``.tmp`` files from a cut transfer are hidden, and never trusted); how many there are."""
    objects = [p for p in (remote / "files" / "md5").rglob("*") if p.is_file()]
    final = [p for p in objects if not p.name.startswith(".")]
    for path in final:
        name = path.parent.name + path.name.removesuffix(".dir")  # a folder's listing: .dir
        assert hashlib.md5(path.read_bytes()).hexdigest() == name, path
    return len(final)


def test_push_to_a_full_remote_fails_then_completes_and_a_clone_pulls_it_whole(
    tmp_path: Path, dvc: Dvc
) -> None:
    """The remote's disk has room for two or three of the six objects: `dvc push` fails with
    DVC's ENOSPC message; with the tmpfs grown (`mount -o remount,size=`) it completes. The
    same for `dvc exp push` of an experiment (its git ref goes first, the cache then fails).
    A fresh `git clone` then pulls the outputs and the experiment, equal byte for byte."""
    origin, source = tmp_path / "origin.git", tmp_path / "source"
    _git(tmp_path, "init", "-q", "--bare", "-b", "main", str(origin))
    _git(tmp_path, "init", "-q", "-b", "main", str(source))
    dvc(source, "init", "-q")
    (source / "make.py").write_text(MAKE)
    (source / "params.yaml").write_text("seed: 1\n")
    (source / "dvc.yaml").write_text(DVC_YAML)
    with small_disk(tmp_path / "disk", "4m") as disk:
        remote = disk / "remote"
        dvc(source, "remote", "add", "-d", "store", str(remote))
        dvc(source, "repro", "-q")
        _git(source, "add", "-A")
        _git(source, "commit", "-qm", "seed 1")
        _git(source, "remote", "add", "origin", str(origin))
        _git(source, "push", "-q", "origin", "main")
        main = _digests(source / "out")

        fill(disk, leave=700 * 1024)  # two 256 KiB objects fit, not six
        push = dvc(source, "push", check=False)
        assert push.returncode == 1, push.stdout + push.stderr
        assert "[Errno 28] No space left on device" in push.stderr, push.stderr
        assert "ERROR: failed to push data to the cloud - " in push.stderr, push.stderr
        assert _objects_are_whole(remote) < PARTS
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True, timeout=30)
        assert "files pushed" in dvc(source, "push").stdout
        assert _objects_are_whole(remote) == PARTS + 1  # and out/'s listing

        dvc(source, "exp", "run", "-q", "-S", "seed=2", "-n", "other")
        other = _digests(source / "out")
        assert other.keys() == main.keys() and not set(other.values()) & set(main.values())
        extra = fill(disk, leave=700 * 1024, name="ballast-2")
        exp_push = dvc(source, "exp", "push", "origin", "other", check=False)
        assert exp_push.returncode != 0, exp_push.stdout + exp_push.stderr
        assert "[Errno 28] No space left on device" in exp_push.stderr, exp_push.stderr
        assert "ERROR: failed to push cache: " in exp_push.stderr, exp_push.stderr
        extra.unlink()
        assert "files uploaded" in dvc(source, "exp", "push", "origin", "other").stdout
        assert _objects_are_whole(remote) == 2 * (PARTS + 1)

        clone = tmp_path / "clone"
        _git(tmp_path, "clone", "-q", "-b", "main", str(origin), str(clone))
        dvc(clone, "pull", "-q")
        assert _digests(clone / "out") == main
        dvc(clone, "exp", "pull", "-q", "origin", "other")
        dvc(clone, "exp", "apply", "-q", "other")
        assert _digests(clone / "out") == other
