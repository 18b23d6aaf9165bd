"""A verified, resumable download of the four MNIST files from any faithful mirror.

Mirrors are tried in turn, ``$MNIST_MIRROR`` (a URL or a local folder) first. Against one
mirror, urllib3's ``Retry`` retries refused connections, timeouts and 5xx/429 answers with a
capped exponential back-off. urllib3 retries whole requests only, so a body cut short
mid-stream is resumed here, with HTTP ``Range`` from the partial file, under the same retry
budget. A download streams into ``partial_dir`` (outside ``data/``) and only a file whose
content verifies is renamed into place: ``data/`` never holds a partial or unverified file.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

import urllib3
from tqdm import tqdm
from urllib3.exceptions import HTTPError, MaxRetryError, ProtocolError, ReadTimeoutError
from urllib3.util import Retry

from pipeline.core.errors import UserError
from pipeline.data.mnist import FILES, IdxFile, verify_gz

log = logging.getLogger(__name__)

MIRROR_ENV = "MNIST_MIRROR"
CHUNK = 1 << 16
TRANSIENT_STATUSES = (429, 500, 502, 503, 504)
MAX_BACKOFF_S = 8  # between two tries of one mirror; also caps a server's Retry-After
OFFLINE_HINT = (
    f"Offline? Set {MIRROR_ENV}=<URL or folder holding the four .gz files>: it is tried first."
)


class DownloadError(UserError, RuntimeError):
    """No mirror served a file whose content verified."""


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


def _retry_policy(retries: int) -> Retry:
    """One budget of ``retries`` per file and mirror, shared by failed connections, timeouts,
    5xx/429 answers and bodies cut short (a redirect spends one too: urllib3 counts it against
    ``total``). Back-off between tries: 0, 1, 2, 4, 8, 8... seconds."""
    return Retry(
        total=retries,
        status_forcelist=TRANSIENT_STATUSES,
        backoff_factor=0.5,
        backoff_max=MAX_BACKOFF_S,
        retry_after_max=MAX_BACKOFF_S,  # a mirror's Retry-After must not stall the stage for hours
        raise_on_status=False,  # hand back the last 5xx answer: its status names the failure
    )


def _stream(response: urllib3.BaseHTTPResponse, part: Path, offset: int, retries: int) -> None:
    """Append (after a ``206``) or write (after a ``200``) the body of ``response`` to ``part``."""
    if response.status == 416:  # our partial is already complete (or bogus): verify decides
        return
    if response.status in TRANSIENT_STATUSES:  # Retry handed back the last of them
        raise DownloadError(f"HTTP {response.status} (after {retries + 1} attempts)")
    if response.status >= 400:  # 404 and the like: final for this mirror, no retries
        raise DownloadError(f"HTTP {response.status}")
    if offset and response.status != 206:  # the server ignored Range: start over
        offset = 0
    length = response.headers.get("Content-Length")
    total = int(length) + offset if length is not None else None
    with part.open("ab" if offset else "wb") as out, _progress(total, offset, part.name) as bar:
        # decode_content=False: a mirror that labels the .gz as gzip-encoded must not get it
        # unpacked; urllib3 raises ProtocolError when fewer bytes come than Content-Length says.
        for chunk in response.stream(CHUNK, decode_content=False):
            out.write(chunk)
            bar.update(len(chunk))


def _fetch_http(url: str, part: Path, timeout: float, retries: int) -> None:
    """Stream ``url`` into ``part``, resuming from the partial file after a body cut short."""
    headers = {"User-Agent": "mnist-gan-pipeline", "Accept-Encoding": "identity"}
    retry = _retry_policy(retries)
    with urllib3.PoolManager(headers=headers, timeout=timeout) as pool:
        # Bounded: every pass spends one of the retry budget, and increment() raises
        # MaxRetryError once it is gone.
        while True:
            offset = part.stat().st_size if part.exists() else 0
            ranged = {"Range": f"bytes={offset}-"} if offset else {}
            try:
                response = pool.request(
                    "GET", url, headers={**headers, **ranged}, retries=retry, preload_content=False
                )
                try:
                    _stream(response, part, offset, retries)
                    return
                except (ProtocolError, ReadTimeoutError) as exc:  # cut short or stalled mid-body
                    retry = (response.retries or retry).increment("GET", url, error=exc)
                    log.warning("%s: %s; resuming in %.1fs", url, exc, retry.get_backoff_time())
                finally:
                    response.release_conn()
            except MaxRetryError as exc:
                reason = exc.reason if exc.reason is not None else exc
                raise DownloadError(
                    f"{type(reason).__name__}: {reason} (after {retries + 1} attempts)"
                ) from exc
            retry.sleep()


def _fetch(mirror: str, spec: IdxFile, part: Path, timeout: float, retries: int) -> None:
    if _is_url(mirror):
        _fetch_http(_join(mirror, spec.gz_name), part, timeout, retries)
    else:
        shutil.copyfile(Path(mirror).expanduser() / spec.gz_name, part)


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
        except (DownloadError, HTTPError, OSError, ValueError) as exc:
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
        f"(expected SHA-256 of decompressed content {spec.sha256}). Mirrors tried:\n  {tried}\n"
        + OFFLINE_HINT
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
