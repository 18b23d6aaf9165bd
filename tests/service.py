"""The service as a live process, and a load on it: what the hot-swap and fault tests share.
Imported as ``from service import ...``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
from onnx import numpy_helper

from helpers import REPO, Outcome, free_port, load_client


def variant(model: Path, out: Path, shift: float = 0.05) -> Path:
    """``model`` with other weights and the same contract: another training's generator."""
    proto = onnx.load(str(model))
    weights = max(proto.graph.initializer, key=lambda tensor: int(np.prod(tensor.dims)))
    changed = numpy_helper.to_array(weights) + np.float32(shift)
    weights.CopyFrom(numpy_helper.from_array(changed.astype(np.float32), weights.name))
    onnx.save(proto, str(out))
    return out


def pixels(url: str, seed: int = 7) -> np.ndarray:
    answer = httpx.get(
        f"{url}/generate", params={"n": 4, "seed": seed, "format": "json", "dtype": "float32"}
    )
    assert answer.status_code == 200, answer.text
    return np.asarray(answer.json()["images"], np.float32)


class Service:
    """The service as a process (one worker, batching on), its log kept in a file."""

    def __init__(self, tmp: Path, env: dict[str, str], *args: str) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = tmp / f"serve-{self.url.rsplit(':', 1)[1]}.log"
        command = [sys.executable, "-m", "pipeline.serve", "--port", self.url.rsplit(":")[-1]]
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [*command, *args], cwd=REPO, env={**os.environ, **env}, stdout=out,
                stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip

    def metadata(self) -> dict[str, Any]:
        answer = httpx.get(f"{self.url}/metadata", timeout=5)
        assert answer.status_code == 200, answer.text
        found: dict[str, Any] = answer.json()
        return found

    def version(self) -> str | None:
        registry = self.metadata()["registry"]
        return registry["version"] if registry else None

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


class Load:
    """32 clients on keep-alive connections against the service (helpers.load_client)."""

    def __init__(self) -> None:
        self.halt, self.outcomes, self.clients = threading.Event(), list[Outcome](), []

    def start(self, url: str, count: int = 32) -> list[Outcome]:
        params = {"n": 8, "format": "json"}
        for _ in range(count):
            # 10 ms apart: every connection stays busy, and the swaps' own work gets CPU too
            args = (f"{url}/generate", self.halt, self.outcomes, params, 0.01)
            client = threading.Thread(target=load_client, args=args, daemon=True)
            client.start()
            self.clients.append(client)
        return self.outcomes

    def stop(self) -> list[int | str]:
        """Stop and join the clients; every result."""
        self.halt.set()
        for client in self.clients:
            client.join(timeout=30)
        return [outcome.result for outcome in self.outcomes]
