"""Grey 8-bit PNG files from numpy arrays, with the standard library's zlib.

The service encodes a PNG per request, so its cost matters: writing the few chunks of a
grey image directly (each row unfiltered, zlib's run-length strategy) takes under a third of
Pillow's time on a 16-digit grid, for a smaller file, and keeps Pillow out of the serving
path. Any PNG reader opens it (the tests read it back with Pillow).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Run-length matches only (Z_RLE), as libpng may choose for image rows: on a 16-digit grid of
# these mostly-black digits, 0.7x the time of zlib's level 1 for 0.86x its bytes (3.4 against
# 4.0 kB; level 6 gave 3.6 kB in 2.8x the time). Without a match search the level barely
# matters.
LEVEL = 6
STRATEGY = zlib.Z_RLE


def _chunk(kind: bytes, data: bytes) -> bytes:
    """Length, type, data and the CRC of type + data (PNG spec, section 5.3)."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, zlib.MAX_WBITS, 8, STRATEGY)
    return compressor.compress(data) + compressor.flush()


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
        _chunk(b"IDAT", _deflate(rows.tobytes())),
        _chunk(b"IEND", b""),
    ))  # fmt: skip
