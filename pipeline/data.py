"""MNIST: a verified, resumable download from any faithful mirror, the IDX reader, and the
``tf.data`` input pipeline.

Files are checked by the SHA-256 of their *decompressed* IDX content, so a mirror that
re-compressed the same pixels is as good as the original. A download streams into
``partial_dir`` (outside ``data/``), resumes there with HTTP ``Range`` after a dropped
connection, and only a fully verified file is renamed into place: ``data/`` never holds a
partial or unverified file.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from pipeline.images import from_unit
from pipeline.stage import UserError

if TYPE_CHECKING:  # TensorFlow is imported lazily: the download stage must not pay ~6 s for it.
    import tensorflow as tf

log = logging.getLogger(__name__)

MIRROR_ENV = "MNIST_MIRROR"
CHUNK = 1 << 16
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


@dataclass(frozen=True)
class IdxFile:
    name: str  # served as f"{name}.gz"
    sha256: str  # of the decompressed IDX bytes
    magic: int
    shape: tuple[int, ...]

    @property
    def gz_name(self) -> str:
        return f"{self.name}.gz"


FILES = (
    IdxFile(
        "train-images-idx3-ubyte",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        IMAGE_MAGIC,
        (60000, 28, 28),
    ),
    IdxFile(
        "train-labels-idx1-ubyte",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        LABEL_MAGIC,
        (60000,),
    ),
    IdxFile(
        "t10k-images-idx3-ubyte",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        IMAGE_MAGIC,
        (10000, 28, 28),
    ),
    IdxFile(
        "t10k-labels-idx1-ubyte",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        LABEL_MAGIC,
        (10000,),
    ),
)
SPLITS = {"train": (FILES[0], FILES[1]), "test": (FILES[2], FILES[3])}


class DownloadError(UserError, RuntimeError):
    """No mirror served a file whose content verified."""


class IdxFormatError(ValueError):
    """The bytes are not the IDX file they claim to be."""


class _TransientError(Exception):
    """A transient failure (connection, 5xx, truncated body): try the same mirror again."""


# --------------------------------------------------------------------------- IDX format


def parse_idx(raw: bytes, expected: IdxFile | None = None) -> np.ndarray:
    """Decode IDX bytes (uint8 data only, as MNIST uses), checking the header against the
    payload and, when given, against what ``expected`` describes."""
    if len(raw) < 8:
        raise IdxFormatError(f"IDX data too short for a header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic >> 8 != 0x08:  # high bytes 0, third byte 0x08 = unsigned byte data
        raise IdxFormatError(f"bad IDX magic {magic:#010x}: expected unsigned-byte data (0x08)")
    ndim = magic & 0xFF
    if ndim == 0:
        raise IdxFormatError(f"bad IDX magic {magic:#010x}: header of 0 dimensions")
    if len(raw) < 4 + 4 * ndim:
        raise IdxFormatError(f"IDX header of {ndim} dimensions truncated at {len(raw)} bytes")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(shape)):
        raise IdxFormatError(
            f"IDX header says shape {shape} ({int(np.prod(shape))} bytes) "
            f"but {len(raw) - offset} bytes follow it"
        )
    if expected is not None and (magic, shape) != (expected.magic, expected.shape):
        raise IdxFormatError(
            f"{expected.name}: header has magic {magic} and shape {shape}, "
            f"expected magic {expected.magic} and shape {expected.shape}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def read_idx_gz(path: Path, expected: IdxFile | None = None) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        return parse_idx(handle.read(), expected)


def load_split(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels uint8 [N])`` of ``"train"`` or ``"test"``."""
    if split not in SPLITS:
        raise ValueError(f"split: got {split!r}; allowed: {sorted(SPLITS)}")
    images_file, labels_file = SPLITS[split]
    images = read_idx_gz(Path(data_dir) / images_file.gz_name, images_file)
    labels = read_idx_gz(Path(data_dir) / labels_file.gz_name, labels_file)
    return images, labels


def verify_gz(path: Path, expected: IdxFile) -> str | None:
    """``None`` when the file decompresses to exactly the expected IDX content, else why not."""
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:  # bad gzip header, CRC error, truncated stream
        return f"not a valid gzip file ({exc})"
    digest = hashlib.sha256(raw).hexdigest()
    if digest != expected.sha256:
        return f"SHA-256 of decompressed content is {digest}, expected {expected.sha256}"
    try:
        parse_idx(raw, expected)
    except IdxFormatError as exc:
        return str(exc)
    return None


# --------------------------------------------------------------------------- download


def mirrors_to_try(configured: Iterable[str]) -> list[str]:
    """``$MNIST_MIRROR`` (a URL or a local folder) first, then the configured mirrors."""
    override = os.environ.get(MIRROR_ENV, "").strip()
    mirrors = [override] if override else []
    return mirrors + [str(mirror) for mirror in configured if str(mirror) != override]


def _is_url(mirror: str) -> bool:
    return mirror.startswith(("http://", "https://"))


def _join(mirror: str, name: str) -> str:
    return mirror.rstrip("/") + "/" + name


def _progress(total: int | None, initial: int, name: str) -> tqdm:
    # A bar on a terminal; silence in logs, CI and DVC's captured output.
    return tqdm(
        total=total,
        initial=initial,
        desc=name,
        unit="B",
        unit_scale=True,
        disable=not sys.stderr.isatty(),
        leave=False,
    )


def _fetch_http(url: str, part: Path, timeout: float) -> None:
    """Stream ``url`` into ``part``, resuming from its current size. Raises ``_TransientError``
    for failures worth another try, ``OSError``/``HTTPError`` for the rest."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "mnist-gan-pipeline", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if offset and response.status != 206:  # server ignored Range: start over
                offset = 0
            length = response.headers.get("Content-Length")
            expected = int(length) if length is not None else None
            received = 0
            with (
                part.open("ab" if offset else "wb") as out,
                _progress(expected and expected + offset, offset, part.name) as bar,
            ):
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        if exc.code == 416:  # our partial is already complete (or bogus): verify decides
            return
        if exc.code >= 500 or exc.code == 429:
            raise _TransientError(f"HTTP {exc.code}") from exc
        raise
    except (TimeoutError, urllib.error.URLError, http.client.HTTPException, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _TransientError(f"{type(exc).__name__}: {reason}") from exc
    if expected is not None and received < expected:
        raise _TransientError(f"truncated body: {received} of {expected} bytes")


def _fetch(mirror: str, spec: IdxFile, part: Path, timeout: float, retries: int) -> None:
    if not _is_url(mirror):
        shutil.copyfile(Path(mirror).expanduser() / spec.gz_name, part)
        return
    url = _join(mirror, spec.gz_name)
    for attempt in range(retries + 1):
        try:
            _fetch_http(url, part, timeout)
            return
        except _TransientError as exc:
            if attempt == retries:
                raise DownloadError(f"{exc} (after {retries + 1} attempts)") from exc
            delay = min(0.5 * 2**attempt, 8.0)
            log.warning("%s: %s; retrying in %.1fs", url, exc, delay)
            time.sleep(delay)


def download_file(
    spec: IdxFile,
    dest_dir: Path,
    mirrors: list[str],
    partial_dir: Path,
    timeout: float,
    retries: int,
) -> Path:
    """Put a verified ``spec`` under ``dest_dir``, trying each mirror in turn."""
    target = dest_dir / spec.gz_name
    if target.exists() and verify_gz(target, spec) is None:
        log.info("%s: present and verified", target)
        return target
    partial_dir.mkdir(parents=True, exist_ok=True)
    part = partial_dir / f"{spec.gz_name}.part"
    failures: list[str] = []
    for mirror in mirrors:
        try:
            _fetch(mirror, spec, part, timeout, retries)
        except (DownloadError, OSError, ValueError) as exc:
            failures.append(f"{mirror}: {exc}")
            part.unlink(missing_ok=True)  # never resume one mirror's bytes from another
            continue
        problem = verify_gz(part, spec)
        if problem is None:
            dest_dir.mkdir(parents=True, exist_ok=True)
            part.replace(target)  # atomic: data/ only ever sees verified files
            log.info("%s: verified from %s", target, mirror)
            return target
        failures.append(f"{mirror}: {problem}")
        part.unlink(missing_ok=True)
    tried = "\n  ".join(failures) or "(no mirrors configured)"
    raise DownloadError(
        f"{spec.gz_name}: no mirror served a verified copy "
        f"(expected SHA-256 of decompressed content {spec.sha256}). Mirrors tried:\n  {tried}"
    )


def download_mnist(
    dest_dir: Path,
    mirrors: Iterable[str],
    partial_dir: Path,
    timeout: float = 30.0,
    retries: int = 4,
) -> list[Path]:
    """Download and verify all four MNIST files into ``dest_dir``."""
    ordered = mirrors_to_try(mirrors)
    return [
        download_file(spec, Path(dest_dir), ordered, Path(partial_dir), timeout, retries)
        for spec in FILES
    ]


# --------------------------------------------------------------------------- tf.data


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    output: str,
    seed: int,
    limit: int | None = None,
    *,
    first_epoch: int = 0,
    epochs: int | None = 1,
    skip_batches: int = 0,
) -> tf.data.Dataset:
    """Shuffled, batched ``(image, label)`` pairs for ``epochs`` epochs (``None``: forever)
    from ``first_epoch``, minus the first ``skip_batches`` batches.

    Epoch ``e`` is ordered by a permutation drawn from ``(seed, e)`` alone, so a training
    resumed at any epoch and batch sees exactly the batches an uninterrupted run would.
    Full batches only, so every step sees the same shapes (one trace, no retracing). Images
    stay uint8 in memory and are scaled per batch: a quarter of the memory of float32.
    """
    import tensorflow as tf

    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    if len(images) < batch_size:
        raise ValueError(
            f"train.batch_size: got {batch_size}; must be at most the {len(images)} "
            "training images available (see data.limit)"
        )
    pixels, classes = tf.constant(images), tf.constant(labels.astype(np.int32))
    count = len(images)

    def epoch_batches(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.argsort(tf.random.stateless_uniform([count], tf.stack([seed, epoch])))
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size, drop_remainder=True)

    def gather(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        batch = tf.cast(tf.gather(pixels, index), tf.float32)[..., None] / 255.0
        return from_unit(batch, output), tf.gather(classes, index)

    last = tf.int64.max if epochs is None else first_epoch + epochs
    return (
        tf.data.Dataset.range(first_epoch, last)
        .flat_map(epoch_batches)
        .skip(skip_batches)
        .map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )
