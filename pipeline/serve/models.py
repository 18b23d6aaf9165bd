"""Which generator the service runs, and swapping it while it serves.

The model comes from the operator only: a file (``MNIST_GAN_MODEL``) or a registry URI
(``MNIST_GAN_MODEL_URI``, e.g. ``models:/mnist-generator@champion``) that
:mod:`pipeline.tracking.fetch` resolves and downloads in a subprocess, so this process never
imports MLflow.

:meth:`ModelSlot.reload` (on SIGHUP, and every ``MNIST_GAN_RELOAD_S`` seconds when set) loads
the source again beside the running model. Only a model that passes the generator contract,
keeps the request schema's shape (latent width, classes) and draws finite pixels replaces it;
a refusal is one log line and the old model keeps serving. A request takes the current
:class:`Loaded` once, when it starts, so requests in flight finish on the model they started
on (its batcher drains them) and none sees a half-swapped state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
import numpy as np

from pipeline.inference.generator import Generator, ModelError
from pipeline.inference.provenance import registry_record
from pipeline.serve.batcher import Batcher
from pipeline.serve.settings import Settings

log = logging.getLogger("pipeline.serve")

FETCH_TIMEOUT_S = 300  # resolving the alias and downloading a few MB, MLflow import included


@dataclass(frozen=True)
class Loaded:
    """One loaded model and its own batcher; immutable, so a swap replaces it whole."""

    generator: Generator
    batcher: Batcher | None
    origin: str  # for logs: the file, or the URI and version
    stamp: str  # what a reload compares: the registry version, or the file's mtime and size

    @property
    def registry(self) -> dict[str, Any] | None:
        """name, version, alias, run_id and metrics of a model fetched from the registry."""
        return registry_record(self.generator.metadata)

    @property
    def contract(self) -> tuple[int, int]:
        """What the request schema was built on: the latent width and the classes."""
        return self.generator.latent_dim, self.generator.num_classes


def _file_stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_mtime_ns}-{stat.st_size}"


def _fetch(uri: str, out: Path, skip: set[str]) -> dict[str, Any]:
    """Run :mod:`pipeline.tracking.fetch` (no download when the URI's version is in
    ``skip``); its one-line error becomes a ModelError."""
    paths = [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    command = [sys.executable, "-m", "pipeline.tracking.fetch", uri, "--out", str(out)]
    for version in sorted(skip):
        command += ["--unless-version", version]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=FETCH_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise ModelError(f"{uri}: fetching took over {FETCH_TIMEOUT_S} s") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        reason = next((line for line in lines if " ERROR " in line), lines[-1])
        raise ModelError(f"{uri}: fetch failed: {reason.split(': ', 1)[-1]}")
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def _trial(generator: Generator) -> None:
    """A model that loads can still draw NaNs (a diverged run): refuse it before it serves."""
    images = generator.generate(2, seed=0)
    if not np.isfinite(images).all():
        raise ModelError(f"model file {generator.path} draws non-finite pixels")


class ModelSlot:
    """The service's current model (or why there is none) and how to replace it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.source = settings.model_uri or str(settings.model)
        self.current: Loaded | None = None
        self.reason: str | None = "not loaded yet"
        self._lock: asyncio.Lock | None = None
        self._trying: str | None = None  # the stamp being loaded
        self._refused: str | None = None  # the last stamp refused: the timer skips it

    @classmethod
    def start(cls, settings: Settings) -> ModelSlot:
        """Load the model now; on failure the slot holds the reason (the service starts
        anyway and answers 503 until a reload succeeds)."""
        slot = cls(settings)
        try:
            slot.current = slot._load(set())
            slot.reason = None
        except ModelError as error:
            slot.reason = str(error)
            log.error("model not loaded, serving 503 until a reload succeeds: %s", error)
            return slot
        assert slot.current is not None
        log.info(
            "model loaded",
            extra={"fields": {"model": slot.current.origin, **slot.current.generator.metadata}},
        )
        return slot

    def _load(self, skip: set[str]) -> Loaded | None:
        """The source loaded and checked, or None when its stamp is in ``skip``."""
        settings = self.settings
        with tempfile.TemporaryDirectory(prefix="mnist-gan-model-") as tmp:
            if settings.model_uri:
                path = Path(tmp) / "generator.onnx"
                found = _fetch(settings.model_uri, path, skip)
                if found.get("unchanged"):
                    return None
                stamp = self._trying = str(found["version"])
                origin = f"{settings.model_uri} (version {stamp})"
            else:
                path = settings.model
                stamp = self._trying = _file_stamp(path) if path.is_file() else "missing"
                if stamp in skip:
                    return None
                origin = str(path)
            generator = Generator(path, max_n=settings.max_n)  # read whole: tmp may go
            _trial(generator)
        batcher = None
        if settings.batching:
            batcher = Batcher(
                generator,
                max_batch=settings.max_batch,
                delay=settings.batch_delay_ms / 1000,
                max_wait=settings.queue_timeout_ms / 1000,
                parallel=settings.batch_parallel,
            )
        return Loaded(generator, batcher, origin, stamp)

    async def reload(self, why: str, retry: bool = True) -> bool:
        """Load the source again and swap it in when it changed and passes every check;
        one log line says what happened. True when the model was replaced. ``retry``: load
        a source refused before again (an operator's SIGHUP does; the timer does not)."""
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:  # one reload at a time; requests never wait on it
            old = self.current
            skip = {old.stamp} if old else set()
            if self._refused is not None and not retry:
                skip.add(self._refused)
            self._trying = None
            try:
                new = await anyio.to_thread.run_sync(self._load, skip)
                if new is not None and old is not None and new.contract != old.contract:
                    raise ModelError(
                        f"{new.origin} has latent width and classes {new.contract}, the "
                        f"service's schema {old.contract}; restart the service to change them"
                    )
            except ModelError as error:
                self._refused = self._trying  # None when it failed before knowing (fetch)
                kept = f"still serving {old.origin}" if old else "still not ready"
                log.error("model reload (%s) refused: %s; %s", why, error, kept)
                return False
            if new is None:
                log.log(
                    logging.INFO if retry else logging.DEBUG,
                    "model reload (%s): unchanged, %s",
                    why,
                    old.origin if old else "",
                )
                return False
            self.current, self.reason = new, None
            was = old.origin if old else "none"
            log.info("model reload (%s): now serving %s (was %s)", why, new.origin, was)
            return True


@contextlib.asynccontextmanager
async def reloading(slot: ModelSlot, every_s: float) -> AsyncIterator[None]:
    """While the service runs: :meth:`ModelSlot.reload` on SIGHUP (where this process owns
    its signals: one uvicorn worker; with several, uvicorn's supervisor takes SIGHUP and
    replaces the workers one by one) and every ``every_s`` seconds when it is not 0."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[bool]] = set()

    def on_hangup() -> None:
        task = loop.create_task(slot.reload("SIGHUP"))
        tasks.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(tasks.discard)

    hangup = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGHUP")
    if hangup:
        loop.add_signal_handler(signal.SIGHUP, on_hangup)

    async def poll() -> None:
        while True:
            await asyncio.sleep(every_s)
            await slot.reload(f"every {every_s:g} s", retry=False)

    poller = loop.create_task(poll()) if every_s > 0 else None
    try:
        yield
    finally:
        if hangup:
            loop.remove_signal_handler(signal.SIGHUP)
        for task in (poller, *tasks):
            if task is not None:
                task.cancel()
