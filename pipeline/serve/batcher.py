"""Dynamic batching for ``/generate``: what Triton's dynamic batcher does, for one worker.

Concurrent requests queue a job each; one drain task per event loop waits at most ``delay``
after the oldest queued job for more to arrive (or until ``max_batch`` images are queued),
then, in ONE worker-thread call for the whole batch: builds all the jobs' inputs at once
(each its own latents and labels, :meth:`Generator.feeds`), makes ONE onnxruntime call, and
hands each job its own slice of the output to render (PNG or JSON). Up to ``parallel``
batches run at once, each in its own thread, while the next one gathers. Each image depends
only on its own latent and label, so a request gets the same pixels whether it ran alone or
in a batch.

Why it pays: the fixed costs of a request's model work (a thread hop, session dispatch, a
few small numpy calls) are paid once per batch instead of once per request, and the event
loop stays free to parse requests while a batch runs in the thread.

Bounded, never a hang: the caller (:class:`pipeline.serve.middleware.Limits`) caps the
requests in flight, and a job that has waited ``max_wait`` seconds without its batch
starting fails with :class:`QueueTimeoutError` (the service answers 503 with Retry-After).
A started batch is always finished: it holds at most ``max_batch`` images (one larger
request runs alone), so it takes bounded time.
"""

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
import numpy as np

from pipeline.inference.generator import Draw, Generator

# Up to this many images one batch (model call plus rendering) takes well under a
# millisecond, less than handing it to a worker thread costs, so it runs on the event loop.
INLINE_MAX_IMAGES = 8


class QueueTimeoutError(Exception):
    """The request waited longer than the queue allows without its batch starting."""


@dataclass(eq=False)
class _Job:
    draw: Draw  # this request's checked inputs: draw.n images
    finish: Callable[[np.ndarray], Any]  # its images [n, 28, 28] -> what it answers
    result: asyncio.Future[Any]
    arrived: float  # the event loop's clock
    expiry: asyncio.TimerHandle | None = field(default=None)


class Batcher:
    """Coalesces concurrent :meth:`generate` calls on one event loop into single
    :meth:`Generator.run` calls of at most ``max_batch`` images."""

    def __init__(
        self,
        generator: Generator,
        *,
        max_batch: int,
        delay: float,
        max_wait: float,
        parallel: int = 1,
    ) -> None:
        self.generator = generator
        self.max_batch = max_batch
        self.parallel = parallel  # batches running at once, each in its own thread
        self.delay = delay  # seconds after the oldest queued request
        self.max_wait = max_wait  # seconds a request may wait for its batch to start
        self._queue: deque[_Job] = deque()
        self._queued_images = 0
        self._full: asyncio.Future[None] | None = None  # set when max_batch images wait
        self._drainer: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._slot_free: asyncio.Future[None] | None = None  # set when a running batch ends
        self.batches = 0  # onnxruntime calls made (the tests read it)

    async def generate(self, draw: Draw, finish: Callable[[np.ndarray], Any]) -> Any:
        """``finish(images)`` for the images of ``draw`` (from :meth:`Generator.draw`),
        drawn with the rest of the batch."""
        loop = asyncio.get_running_loop()
        job = _Job(draw, finish, loop.create_future(), loop.time())
        job.expiry = loop.call_later(self.max_wait, self._expire, job)
        self._queue.append(job)
        self._queued_images += draw.n
        if self._queued_images >= self.max_batch and self._full and not self._full.done():
            self._full.set_result(None)
        drainer = self._drainer
        # A drain left on another (closed) loop never runs again: e.g. a test client's.
        if drainer is None or drainer.done() or drainer.get_loop() is not loop:
            self._drainer = loop.create_task(self._drain())
        # A cancelled request (client gone) cancels its future; the drain skips it.
        return await job.result

    def _expire(self, job: _Job) -> None:
        """Still queued after ``max_wait``: refuse it (a started batch is never cut short)."""
        if job in self._queue:
            self._queue.remove(job)
            self._queued_images -= job.draw.n
            if not job.result.done():
                waited = f"{self.max_wait * 1000:.0f} ms"
                job.result.set_exception(QueueTimeoutError(f"queued over {waited}"))

    async def _drain(self) -> None:
        """Starts batches until the queue is empty (then the next request starts a new
        drain), at most ``parallel`` running at once: the next batch gathers meanwhile."""
        loop = asyncio.get_running_loop()
        while self._queue:
            while len(self._running) >= self.parallel:
                self._slot_free = loop.create_future()
                await self._slot_free
            await self._gather()
            batch = self._take()
            if batch:
                run = loop.create_task(self._run(batch))
                self._running.add(run)

    async def _gather(self) -> None:
        """Wait until ``delay`` after the oldest queued request, or until a full batch."""
        loop = asyncio.get_running_loop()
        remaining = self._queue[0].arrived + self.delay - loop.time()
        if remaining <= 0 or self._queued_images >= self.max_batch:
            return
        self._full = loop.create_future()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(remaining):
                await self._full
        self._full = None

    def _take(self) -> list[_Job]:
        """The oldest jobs, up to ``max_batch`` images (at least one job, however large)."""
        batch: list[_Job] = []
        images = 0
        while self._queue and (not batch or images + self._queue[0].draw.n <= self.max_batch):
            job = self._queue.popleft()
            self._queued_images -= job.draw.n
            if job.expiry:
                job.expiry.cancel()
            if job.result.done():  # cancelled by its client while queued
                continue
            batch.append(job)
            images += job.draw.n
        return batch

    async def _run(self, batch: list[_Job]) -> None:
        images = sum(job.draw.n for job in batch)
        try:
            if images <= INLINE_MAX_IMAGES:
                outcomes = self._work(batch)
            else:
                outcomes = await anyio.to_thread.run_sync(self._work, batch)
        except BaseException:  # cancelled (shutdown): nobody may wait forever
            for job in batch:
                job.result.cancel()
            raise
        finally:  # the slot is free before the waiters hear back
            self._running.discard(asyncio.current_task())
            if self._slot_free and not self._slot_free.done():
                self._slot_free.set_result(None)
        self.batches += 1
        for job, outcome in zip(batch, outcomes, strict=True):
            if job.result.done():  # its client went away meanwhile
                continue
            if isinstance(outcome, BaseException):
                job.result.set_exception(outcome)
            else:
                job.result.set_result(outcome)

    def _work(self, batch: list[_Job]) -> list[Any]:
        """The batch's model call and each job's rendering (in the worker thread), each
        job's outcome an answer or the exception only that job hears of."""
        try:
            images = self.generator.run(self.generator.feeds([job.draw for job in batch]))
        except Exception as error:  # a broken graph: every job hears of it
            return [error] * len(batch)
        outcomes: list[Any] = []
        start = 0
        for job in batch:
            try:
                outcomes.append(job.finish(images[start : start + job.draw.n]))
            except Exception as error:
                outcomes.append(error)
            start += job.draw.n
        return outcomes
