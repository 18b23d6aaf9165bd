"""The verified, resumable download against real loopback HTTP mirrors: server errors,
truncated and stalled bodies, a server that ignores Range, 404s, flipped bytes, every mirror
failing."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from pipeline.data.download import DownloadError, download_file, download_mnist
from pipeline.data.mnist import FILES

from helpers import MirrorServer

LABELS = FILES[1]  # train labels: 28 KB, quick to serve many times


def flip_one_byte(body: bytes) -> bytes:
    middle = len(body) // 2
    return body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]


def fetch(spec, tmp_path: Path, mirrors: list[str], timeout: float = 5.0, retries: int = 2):
    return download_file(spec, tmp_path / "data", mirrors, tmp_path / "partial", timeout, retries)


def assert_nothing_partial(tmp_path: Path) -> None:
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())
    assert not (tmp_path / "partial").exists() or not any((tmp_path / "partial").iterdir())


def test_downloads_all_four_and_skips_them_next_time(tmp_path: Path, mirror: MirrorServer) -> None:
    paths = download_mnist(tmp_path / "data", [mirror.url], tmp_path / "partial", 5.0, 1)
    assert [p.name for p in paths] == [spec.gz_name for spec in FILES]
    assert len(mirror.requests) == 4
    download_mnist(tmp_path / "data", [mirror.url], tmp_path / "partial", 5.0, 1)
    assert len(mirror.requests) == 4  # present and verified: nothing fetched again
    assert not any((tmp_path / "partial").iterdir())


def test_retries_after_a_server_error(tmp_path: Path, mirror: MirrorServer) -> None:
    mirror.faults[LABELS.gz_name] = [(500, None, 0.0)]
    target = fetch(LABELS, tmp_path, [mirror.url])
    assert target.is_file() and len(mirror.requests) == 2


def test_resumes_a_truncated_body_with_range(tmp_path: Path, mirror: MirrorServer) -> None:
    mirror.faults[LABELS.gz_name] = [(200, lambda body: body[: len(body) // 3], 0.0)]
    target = fetch(LABELS, tmp_path, [mirror.url])
    assert target.is_file()
    (_, first_range), (_, second_range) = mirror.requests
    assert first_range is None
    assert second_range is not None and second_range.startswith("bytes=")
    assert int(second_range.removeprefix("bytes=").rstrip("-")) > 0


def test_bodies_cut_short_every_time_spend_the_retry_budget(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    """The Range-resume loop shares urllib3's retry budget: bounded, and each try resumes."""
    mirror.faults[LABELS.gz_name] = [(200, lambda body: body[:1000], 0.0)] * 10
    with pytest.raises(DownloadError, match=r"ProtocolError: .* \(after 3 attempts\)"):
        fetch(LABELS, tmp_path, [mirror.url], retries=2)
    assert len(mirror.requests) == 3
    assert [ranged for _, ranged in mirror.requests] == [None, "bytes=1000-", "bytes=1000-"]
    assert_nothing_partial(tmp_path)


def test_restarts_when_the_server_ignores_range(tmp_path: Path, mirror: MirrorServer) -> None:
    mirror.honour_range = False
    mirror.faults[LABELS.gz_name] = [(200, lambda body: body[:1000], 0.0)]
    assert fetch(LABELS, tmp_path, [mirror.url]).is_file()


def test_a_stalled_response_times_out_and_is_retried(tmp_path: Path, mirror: MirrorServer) -> None:
    mirror.faults[LABELS.gz_name] = [(200, None, 3.0)]
    target = fetch(LABELS, tmp_path, [mirror.url], timeout=0.5)
    assert target.is_file() and len(mirror.requests) == 2


def test_moves_on_from_a_404_to_the_next_mirror(
    tmp_path: Path, mirror_factory, shared_mnist: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    missing, good = mirror_factory(empty), mirror_factory(shared_mnist)
    assert fetch(LABELS, tmp_path, [missing.url, good.url]).is_file()
    assert len(missing.requests) == 1  # a 404 is final for that mirror: no retries
    assert len(good.requests) == 1


def test_a_flipped_byte_moves_on_to_the_next_mirror(tmp_path: Path, mirror_factory) -> None:
    bad, good = mirror_factory(), mirror_factory()
    bad.faults[LABELS.gz_name] = [(200, flip_one_byte, 0.0)]
    assert fetch(LABELS, tmp_path, [bad.url, good.url]).is_file()
    assert len(bad.requests) == 1 and len(good.requests) == 1


def test_recompressed_but_identical_content_is_accepted(tmp_path: Path, shared_mnist: Path) -> None:
    recompressed = tmp_path / "mirror"
    recompressed.mkdir()
    raw = gzip.decompress((shared_mnist / LABELS.gz_name).read_bytes())
    (recompressed / LABELS.gz_name).write_bytes(gzip.compress(raw, compresslevel=1))
    assert fetch(LABELS, tmp_path, [str(recompressed)]).is_file()


def test_when_every_mirror_fails_the_error_says_everything(
    tmp_path: Path, mirror_factory, shared_mnist: Path
) -> None:
    corrupt_dir = tmp_path / "corrupt"
    corrupt_dir.mkdir()
    body = (shared_mnist / LABELS.gz_name).read_bytes()
    (corrupt_dir / LABELS.gz_name).write_bytes(
        gzip.compress(gzip.decompress(body)[:-1] + b"\x07")  # valid gzip, one wrong label
    )
    corrupt = mirror_factory(corrupt_dir)
    flaky = mirror_factory()
    flaky.faults[LABELS.gz_name] = [(503, None, 0.0)] * 5
    with pytest.raises(DownloadError) as caught:
        fetch(LABELS, tmp_path, [corrupt.url, flaky.url, str(tmp_path / "nowhere")], retries=1)
    message = str(caught.value)
    assert LABELS.gz_name in message and LABELS.sha256 in message
    assert f"{corrupt.url}: SHA-256 of decompressed content is" in message
    assert f"{flaky.url}: HTTP 503 (after 2 attempts)" in message
    assert str(tmp_path / "nowhere") in message
    assert "Offline? Set MNIST_MIRROR=" in message  # issue #20: name the way out
    assert_nothing_partial(tmp_path)


def test_an_invalid_file_in_place_is_replaced(tmp_path: Path, mirror: MirrorServer) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / LABELS.gz_name).write_bytes(b"not gzip")
    assert fetch(LABELS, tmp_path, [mirror.url]).stat().st_size > 1000
    assert len(mirror.requests) == 1


def test_mnist_mirror_env_is_tried_first(
    tmp_path: Path, mirror: MirrorServer, shared_mnist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = tmp_path / "local"
    shutil.copytree(shared_mnist, local)
    monkeypatch.setenv("MNIST_MIRROR", str(local))
    download_mnist(tmp_path / "data", [mirror.url], tmp_path / "partial", 5.0, 1)
    assert mirror.requests == []  # the local folder served everything
