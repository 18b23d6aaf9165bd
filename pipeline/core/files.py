"""Writing outputs so that nothing is ever half-written: a temp file, then a rename. A full
disk stops the write with one line naming the path and the space left."""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.core.errors import UserError


class DiskFullError(UserError):
    """No space left on the device a file was being written to; nothing half-written stays."""


def _no_space(error: BaseException) -> bool:
    """ENOSPC from Python, or from TensorFlow's C++ writers (their message carries strerror)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(error) or "Disk quota exceeded" in str(error)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


@contextlib.contextmanager
def disk_space(path: Path) -> Iterator[None]:
    """Turn "no space left" while writing ``path`` into a one-line DiskFullError naming it
    and the free space there (the caller removes what it half-wrote)."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if not _no_space(error):
            raise
        folder = next((p for p in (path, *path.parents) if p.is_dir()), Path("/"))
        usage = shutil.disk_usage(folder)
        raise DiskFullError(
            f"no space left on device writing {path} ({_size(usage.free)} free of "
            f"{_size(usage.total)}): free some space there and rerun",
        ) from None


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp path to write ``path`` through. It sits beside ``path`` (same filesystem, so
    the rename is atomic) and keeps its suffix (Keras, numpy, matplotlib and Pillow pick the
    format from it). Renamed into place when the block succeeds, removed when it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".partial-{path.name}")
    try:
        with disk_space(path):
            yield tmp
            tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
