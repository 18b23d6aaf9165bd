"""Dynamic batching in the service (pipeline/serve/batcher.py), in-process: httpx's
AsyncClient over ASGITransport sends truly concurrent requests into one event loop, with
real onnxruntime on the small exported generators. Checks that batching changes no pixel,
that concurrent requests really share onnxruntime calls, and that a full or slow queue
answers at once (429 / 503 with Retry-After) instead of hanging."""

import asyncio
import time
from collections.abc import Awaitable
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from pipeline.inference.generator import Generator
from pipeline.serve.app import Settings, create_app

# Every wait in these tests is bounded: no request may take longer than this.
TIMEOUT_S = 10.0


async def send_all(app: FastAPI, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    """All ``requests`` ((method, params or JSON body)) at once to ``/generate``."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

        def send(method: str, fields: dict) -> Awaitable[httpx.Response]:
            if method == "GET":
                return client.get("/generate", params=fields)
            return client.post("/generate", json=fields)

        calls = (send(method, fields) for method, fields in requests)
        return await asyncio.wait_for(asyncio.gather(*calls), TIMEOUT_S)


def run(app: FastAPI, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    return asyncio.run(send_all(app, requests))


@pytest.mark.parametrize("kind", ["conditional", "unconditional"])
def test_batched_requests_get_the_pixels_of_unbatched_calls(
    onnx_generators: dict[str, Path], kind: str
) -> None:
    model = onnx_generators[kind]
    # A long delay, so that all the concurrent requests surely land in shared batches.
    app = create_app(Settings(model=model, max_n=64, batch_delay_ms=200, max_batch=40))
    generator = Generator(model)
    digits = [None, 3, 7] if generator.conditional else [None]
    z = generator.sample_noise(3, seed=999) * 0.5  # explicit latents, not any seed's
    asks = [
        {"n": n, "seed": seed, "digit": digits[i % len(digits)]}
        for i, (n, seed) in enumerate([(1, 0), (5, 1), (16, 2), (2, 3), (9, 4), (1, 5), (30, 6)])
    ]
    requests = [("GET", {**ask, "format": "json", "dtype": "float32"}) for ask in asks]
    requests = [(m, {k: v for k, v in f.items() if v is not None}) for m, f in requests]
    requests.append(("POST", {"z": z.tolist(), "format": "json", "dtype": "float32"}))

    responses = run(app, requests)

    assert [r.status_code for r in responses] == [200] * len(requests), responses[-1].text
    for ask, response in zip(asks, responses, strict=False):
        expected = generator.generate(ask["n"], seed=ask["seed"], digit=ask["digit"])
        np.testing.assert_allclose(response.json()["images"], expected, rtol=0, atol=1e-6)
    explicit = generator.generate(3, z=z)
    np.testing.assert_allclose(responses[-1].json()["images"], explicit, rtol=0, atol=1e-6)
    # 67 images in 8 requests, at most 40 images a call: shared calls, at least two.
    assert 2 <= app.state.slot.current.batcher.batches < len(requests)


def test_batching_off_serves_each_request_alone(onnx_generators: dict[str, Path]) -> None:
    model = onnx_generators["conditional"]
    app = create_app(Settings(model=model, batching=False))
    assert app.state.slot.current.batcher is None
    responses = run(app, [("GET", {"n": 4, "seed": s, "format": "json"}) for s in range(4)])
    for seed, response in enumerate(responses):
        expected = np.rint(Generator(model).generate(4, seed=seed) * 255)
        np.testing.assert_array_equal(response.json()["images"], expected)


def test_full_queue_is_refused_at_once_with_retry_after(onnx_generators: dict[str, Path]) -> None:
    # Two in flight at most; the batch waits 500 ms for company, so the rest find it full.
    settings = Settings(model=onnx_generators["conditional"], max_concurrency=2, batch_delay_ms=500)
    app = create_app(settings)

    async def timed(client: httpx.AsyncClient, seed: int) -> tuple[httpx.Response, float]:
        start = time.perf_counter()
        response = await client.get("/generate", params={"n": 1, "seed": seed})
        return response, time.perf_counter() - start

    async def burst() -> list[tuple[httpx.Response, float]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            calls = asyncio.gather(*(timed(client, seed) for seed in range(8)))
            return await asyncio.wait_for(calls, TIMEOUT_S)

    results = asyncio.run(burst())
    statuses = sorted(response.status_code for response, _ in results)
    assert statuses == [200] * 2 + [429] * 6
    for response, seconds in results:
        if response.status_code == 429:
            assert response.headers["retry-after"] == "1"
            assert "MNIST_GAN_MAX_CONCURRENCY" in response.json()["detail"]
            assert seconds < 0.4  # answered before the batch even ran
    assert app.state.slot.current.batcher.batches == 1  # the two admitted shared one call


def test_request_waiting_too_long_gets_503_not_a_hang(onnx_generators: dict[str, Path]) -> None:
    # One request per call (max_batch = max_n) and a 1 ms queue limit: while the first
    # call for 256 images runs, the requests queued behind it run out of time. (The drain
    # takes the first request before its 1 ms timer can fire: asyncio runs the callbacks
    # already scheduled before the timers that came due meanwhile.)
    settings = Settings(
        model=onnx_generators["conditional"],
        max_n=256,
        max_batch=256,
        batch_delay_ms=0,
        queue_timeout_ms=1,
    )
    app = create_app(settings)
    start = time.perf_counter()
    responses = run(app, [("GET", {"n": 256, "seed": seed}) for seed in range(8)])
    assert time.perf_counter() - start < TIMEOUT_S
    statuses = [response.status_code for response in responses]
    assert 200 in statuses and 503 in statuses, statuses
    refused = next(response for response in responses if response.status_code == 503)
    assert refused.headers["retry-after"] == "1"
    assert "MNIST_GAN_QUEUE_TIMEOUT_MS" in refused.json()["detail"]
    # The queue recovers: the next request on its own is served.
    assert run(app, [("GET", {"n": 1})])[0].status_code == 200


def test_bad_input_is_refused_before_it_reaches_a_batch(onnx_generators: dict[str, Path]) -> None:
    app = create_app(Settings(model=onnx_generators["conditional"], batch_delay_ms=100))
    latent_dim = Generator(onnx_generators["conditional"]).latent_dim
    good = ("GET", {"n": 2, "seed": 1})
    bad = ("POST", {"n": 2, "z": [[0.0] * latent_dim]})  # n disagrees with len(z)
    responses = run(app, [good, bad, good])
    assert [r.status_code for r in responses] == [200, 422, 200]
    assert responses[1].json()["detail"][0]["loc"] == ["body", "n"]
    assert responses[0].content == responses[2].content
    assert app.state.slot.current.batcher.batches == 1
