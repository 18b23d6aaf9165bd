"""`dvc repro` of the download stage in a fresh copy of the repo, against a loopback mirror."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from pipeline.data.mnist import FILES, verify_gz

from helpers import Dvc, MirrorServer

pytestmark = pytest.mark.slow


def test_repro_downloads_verified_files_then_is_up_to_date(
    repo_copy: Path, mirror: MirrorServer, dvc: Dvc
) -> None:
    dvc(repo_copy, "repro", "download", env={"MNIST_MIRROR": mirror.url})
    for spec in FILES:
        assert verify_gz(repo_copy / "data" / spec.gz_name, spec) is None
    second = dvc(repo_copy, "repro", "download", env={"MNIST_MIRROR": mirror.url})
    assert "didn't change" in second.stdout or "up to date" in second.stdout
    assert len(mirror.requests) == 4


def test_a_corrupt_mirror_fails_clearly_and_leaves_data_clean(
    repo_copy: Path, tmp_path: Path, shared_mnist: Path, dvc: Dvc
) -> None:
    corrupt = tmp_path / "corrupt-mirror"
    corrupt.mkdir()
    for spec in FILES:
        raw = gzip.decompress((shared_mnist / spec.gz_name).read_bytes())
        (corrupt / spec.gz_name).write_bytes(gzip.compress(raw[:-1] + bytes([raw[-1] ^ 1])))
    # Only the corrupt local mirror: the configured public ones are unreachable offline anyway,
    # so point them at a closed loopback port to keep the test fast and network-free.
    params = repo_copy / "params.yaml"
    text = params.read_text()
    text = text.replace(
        "https://storage.googleapis.com/cvdf-datasets/mnist/", "http://127.0.0.1:9/"
    )
    text = text.replace("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://127.0.0.1:9/b/")
    params.write_text(text.replace("retries: 4", "retries: 0"))
    result = dvc(repo_copy, "repro", "download", env={"MNIST_MIRROR": str(corrupt)}, check=False)
    assert result.returncode != 0
    output = result.stderr + result.stdout
    assert f"{FILES[0].gz_name}: no mirror served a verified copy" in output
    assert FILES[0].sha256 in output
    assert f"{corrupt}: SHA-256 of decompressed content is" in output
    assert "http://127.0.0.1:9/" in output
    data = repo_copy / "data"
    assert not data.exists() or not any(data.iterdir())
    partial = repo_copy / ".cache" / "downloads"
    assert not partial.exists() or not any(partial.iterdir())
