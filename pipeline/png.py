"""Grey 8-bit PNG files from numpy arrays, with the standard library's zlib.

The service encodes a PNG per request, so its cost matters: writing the few chunks of a
grey image directly (each row unfiltered, zlib at level 1) takes about a third of Pillow's
time on a 16-digit grid, for a file within a few percent of the size, and keeps Pillow out
of the serving path. Any PNG reader opens it (the tests read it back with Pillow).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# zlib level 1: the least CPU per request; levels 6 and 9 save under a tenth of the bytes of
# these mostly-black grids, at 3x and 50x the time.
LEVEL = 1


def _chunk(kind: bytes, data: bytes) -> bytes:
    """Length, type, data and the CRC of type + data (PNG spec, section 5.3)."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_gray(pixels: np.ndarray) -> bytes:
    """uint8 [height, width] -> the bytes of a grey 8-bit PNG of it."""
    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise ValueError(f"pixels: got {pixels.dtype} {list(pixels.shape)}; allowed: uint8 [h, w]")
    height, width = pixels.shape
    rows = np.zeros((height, width + 1), np.uint8)  # each row: filter type 0 (none), then its bytes
    rows[:, 1:] = pixels
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey, no interlace
    return b"".join((
        SIGNATURE,
        _chunk(b"IHDR", header),
        _chunk(b"IDAT", zlib.compress(rows.tobytes(), LEVEL)),
        _chunk(b"IEND", b""),
    ))  # fmt: skip
