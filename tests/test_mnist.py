"""The IDX reader: the real MNIST files, and every malformed header refused with its reason."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.mnist import FILES, IdxFormatError, load_split, parse_idx


def test_reads_real_mnist(mnist_dir: Path) -> None:
    images, labels = load_split(mnist_dir, "train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and set(np.unique(labels)) == set(range(10))
    test_images, _ = load_split(mnist_dir, "test")
    assert test_images.shape == (10000, 28, 28)


def idx_bytes(magic: int, dims: list[int], payload: bytes) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    return header + payload


def test_parses_a_small_valid_file() -> None:
    array = parse_idx(idx_bytes(0x0803, [2, 2, 3], bytes(range(12))))
    assert array.shape == (2, 2, 3) and array[1, 1, 2] == 11


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x00\x00", "too short"),
        (idx_bytes(0x0D03, [1, 1, 1], b"\x00"), "bad IDX magic"),  # float data, not uint8
        (idx_bytes(0x0800, [], b"\x00" * 4), "header of 0 dimensions"),
        (idx_bytes(0x0803, [2], b""), "3 dimensions truncated at 8 bytes"),
        (idx_bytes(0x0802, [2, 2], b"\x00"), "shape (2, 2)"),  # header promises more bytes
        (idx_bytes(0x0802, [1, 1], b"\x00\x00"), "but 2 bytes follow"),  # trailing garbage
    ],
)
def test_refuses_malformed_headers(raw: bytes, message: str) -> None:
    with pytest.raises(IdxFormatError, match=re.escape(message)):
        parse_idx(raw)


def test_refuses_a_valid_file_of_the_wrong_kind() -> None:
    labels = idx_bytes(0x0801, [3], b"\x01\x02\x03")
    with pytest.raises(IdxFormatError, match="expected magic 2051"):
        parse_idx(labels, FILES[0])
