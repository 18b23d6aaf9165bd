"""What MNIST is: its four files (names, SHA-256 of the decompressed content, IDX header) and
how to read them into numpy arrays.

Files are checked by the SHA-256 of their *decompressed* IDX content, so a mirror that
re-compressed the same pixels is as good as the original. numpy only: the download stage
verifies through here without paying for TensorFlow.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


class IdxFormatError(ValueError):
    """The bytes are not the IDX file they claim to be."""


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
