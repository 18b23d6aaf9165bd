"""Load benchmark of the generation service on loopback.

    .venv/bin/python bench/serve_load.py --model models/generator.onnx [--duration 10]

Starts ``python -m pipeline.serve`` as users do (access log on; ``--workers``), measures the
cold start to ready (spawn -> first 200 from /readyz, best of 3), then for each target
runs a bounded load (fixed duration, 32 connections) with ``wrk`` (Debian: apt-get install
wrk) or, without it, an asyncio/httpx client with a fixed request count. ``/healthz`` is
the reference run beside the others: the HTTP stack without the model, so the ratio says
what generating costs on top. Reports req/s, p50/p99 latency, errors (non-2xx and socket
errors) and the server's RSS before and after, as JSON (``--out`` to keep it).
"""

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
TARGETS = {
    "healthz (reference)": "/healthz",
    "n=1 json": "/generate?n=1&format=json",
    "n=16 png": "/generate?n=16&format=png",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(
    model: Path, port: int, log: Path, workers: int, concurrency: int
) -> tuple[subprocess.Popen, float]:
    """The server process and its cold start: seconds from spawn to /readyz answering 200."""
    command = [sys.executable, "-m", "pipeline.serve", "--model", str(model), "--port", str(port)]
    command += ["--workers", str(workers)]
    # Admit every connection: this measures throughput, not the 429s of the limit.
    env = {**os.environ, "MNIST_GAN_MAX_CONCURRENCY": str(concurrency)}
    start = time.perf_counter()
    with log.open("a") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=sink)
    deadline = start + 30
    while time.perf_counter() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process, time.perf_counter() - start
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.005)
    stop_server(process)
    sys.exit(f"server not ready within 30 s:\n{log.read_text()[-2000:]}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def rss_mb(pid: int) -> float:
    """Resident memory of the server and its worker processes."""
    status = Path(f"/proc/{pid}/status").read_text()
    own = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return own + sum(rss_mb(int(child)) for child in children)


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def run_wrk(url: str, connections: int, duration: float) -> dict:
    command = ["wrk", "-t2", f"-c{connections}", f"-d{round(duration)}s", "--latency", url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.MULTILINE))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    return {
        "tool": "wrk -t2",
        "requests": requests,
        "req_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": _ms(percentiles["50"]),
        "p99_ms": _ms(percentiles["99"]),
        "errors": (int(non_2xx.group(1)) if non_2xx else 0)
        + (sum(map(int, socket_errors.groups())) if socket_errors else 0),
    }


async def run_httpx(url: str, connections: int, duration: float, count: int) -> dict:
    """Fallback client: ``count`` requests over ``connections`` workers, stopped early at
    ``duration`` seconds; slower than wrk, so it caps what it can measure."""
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:
        start = time.perf_counter()
        deadline = start + duration
        remaining = iter(range(count))

        async def worker() -> None:
            nonlocal errors
            for _ in remaining:
                if time.perf_counter() > deadline:
                    return
                sent = time.perf_counter()
                try:
                    ok = (await client.get(url)).status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - sent)
                errors += not ok

        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - start
    cuts = statistics.quantiles(latencies, n=100)
    return {
        "tool": "httpx (asyncio)",
        "requests": len(latencies),
        "req_per_s": len(latencies) / elapsed,
        "p50_ms": cuts[49] * 1000,
        "p99_ms": cuts[98] * 1000,
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "generator.onnx")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per target")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="server processes")
    parser.add_argument("--requests", type=int, default=50_000, help="cap (httpx fallback)")
    parser.add_argument("--client", choices=["auto", "wrk", "httpx"], default="auto")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args()
    if not args.model.is_file():
        sys.exit(f"no model at {args.model}: run `dvc repro export` or pass --model")
    use_wrk = args.client == "wrk" or (args.client == "auto" and shutil.which("wrk"))

    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "server.log"
        cold_starts = []
        server = (args.workers, args.connections)
        for _ in range(3):
            process, seconds = start_server(args.model, free_port(), log, *server)
            cold_starts.append(seconds)
            stop_server(process)
        port = free_port()
        process, _ = start_server(args.model, port, log, *server)
        try:
            base = f"http://127.0.0.1:{port}"
            for path in TARGETS.values():  # warm-up: first-call allocations, JIT-free paths
                for _ in range(200):
                    httpx.get(base + path).raise_for_status()
            rss_before = rss_mb(process.pid)
            results = {}
            for name, path in TARGETS.items():
                if use_wrk:
                    results[name] = run_wrk(base + path, args.connections, args.duration)
                else:
                    run = run_httpx(base + path, args.connections, args.duration, args.requests)
                    results[name] = asyncio.run(run)
            rss_after = rss_mb(process.pid)
        finally:
            stop_server(process)

    reference = results["healthz (reference)"]["req_per_s"]
    for result in results.values():
        result["vs_reference"] = round(result["req_per_s"] / reference, 3)
    report = {
        "model": str(args.model),
        "cpus": os.cpu_count(),
        "connections": args.connections,
        "workers": args.workers,
        "duration_s": args.duration,
        "cold_start_s": {"best": min(cold_starts), "all": cold_starts},
        "rss_mb": {"before": round(rss_before, 1), "after": round(rss_after, 1)},
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
