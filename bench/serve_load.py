"""Load benchmark of the generation service on loopback, with and without dynamic batching.

    .venv/bin/python bench/serve_load.py --model models/generator.onnx [--duration 10]

Starts ``python -m pipeline.serve`` as users do (access log on; ``--workers``) once per
server configuration (:data:`CONFIGS`: the defaults, i.e. batching on; batching off; and
the settings before batching existed), measures the cold start to ready (spawn -> first 200
from /readyz, best of 3), then for each target runs a bounded load (fixed duration, 32
connections) with ``wrk`` (Debian: apt-get install wrk) or, without it, an asyncio/httpx
client with a fixed request count. ``/healthz`` is the reference run beside the others on
the same server: the HTTP stack without the model, so the ratio says what generating costs
on top. Reports req/s, the share refused (429/503: the service's limits), served images/s,
p50/p99 latency and the server's RSS before and after, as JSON (``--out`` to keep it) and
as a Markdown table.
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
# name -> (path, images per response)
TARGETS = {
    "healthz (reference)": ("/healthz", 0),
    "n=1 json": ("/generate?n=1&format=json", 1),
    "n=16 png": ("/generate?n=16&format=png", 16),
}
# name -> environment of the server (on top of the caller's)
CONFIGS = {
    "batching (default)": {},
    "no batching": {"MNIST_GAN_BATCHING": "false"},
    "before batching": {"MNIST_GAN_BATCHING": "false", "MNIST_GAN_MAX_CONCURRENCY": "8"},
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(
    model: Path, port: int, log: Path, workers: int, config: dict[str, str]
) -> tuple[subprocess.Popen, float]:
    """The server process and its cold start: seconds from spawn to /readyz answering 200."""
    command = [sys.executable, "-m", "pipeline.serve", "--model", str(model), "--port", str(port)]
    command += ["--workers", str(workers)]
    env = {**os.environ, **config}
    start = time.perf_counter()
    with log.open("a") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=sink)
    deadline = start + 120  # a busy shared machine may take a while
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
    sys.exit(f"server not ready within 120 s:\n{log.read_text()[-2000:]}")


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
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.MULTILINE))
    requests, seconds = re.search(r"(\d+) requests in ([\d.]+)s", out).groups()
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    return {
        "tool": "wrk -t2",
        "requests": int(requests),
        "seconds": float(seconds),
        "p50_ms": _ms(percentiles["50"]),
        "p99_ms": _ms(percentiles["99"]),
        # wrk counts statuses only as 2xx/3xx or not: the service's non-2xx here are its
        # refusals (429 in-flight limit, 503 queue timeout).
        "refused": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": sum(map(int, socket_errors.groups())) if socket_errors else 0,
    }


async def run_httpx(url: str, connections: int, duration: float, count: int) -> dict:
    """Fallback client: ``count`` requests over ``connections`` workers, stopped early at
    ``duration`` seconds; slower than wrk, so it caps what it can measure."""
    latencies: list[float] = []
    refused = errors = 0
    limits = httpx.Limits(max_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:
        start = time.perf_counter()
        deadline = start + duration
        remaining = iter(range(count))

        async def worker() -> None:
            nonlocal refused, errors
            for _ in remaining:
                if time.perf_counter() > deadline:
                    return
                sent = time.perf_counter()
                try:
                    refused += (await client.get(url)).status_code in (429, 503)
                except httpx.HTTPError:
                    errors += 1
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - start
    cuts = statistics.quantiles(latencies, n=100)
    return {
        "tool": "httpx (asyncio)",
        "requests": len(latencies),
        "seconds": elapsed,
        "p50_ms": cuts[49] * 1000,
        "p99_ms": cuts[98] * 1000,
        "refused": refused,
        "socket_errors": errors,
    }


def summarize(result: dict, images: int, reference: float | None) -> dict:
    """Rates from the counts: all answers, the refused share, served images per second."""
    served = result["requests"] - result["refused"] - result["socket_errors"]
    result["req_per_s"] = round(result["requests"] / result["seconds"], 1)
    result["served_per_s"] = round(served / result["seconds"], 1)
    result["refused_pct"] = round(100 * result["refused"] / max(result["requests"], 1), 2)
    result["images_per_s"] = round(result["served_per_s"] * images)
    if reference:
        result["vs_healthz"] = round(result["served_per_s"] / reference, 3)
    return result


def measure(args: argparse.Namespace, config: dict[str, str], log: Path, use_wrk: bool) -> dict:
    """One server configuration: cold start (best of --cold-starts), then each target."""
    cold_starts = []
    for _ in range(args.cold_starts):
        process, seconds = start_server(args.model, free_port(), log, args.workers, config)
        cold_starts.append(seconds)
        stop_server(process)
    port = free_port()
    process, _ = start_server(args.model, port, log, args.workers, config)
    try:
        base = f"http://127.0.0.1:{port}"
        for path, _ in TARGETS.values():  # warm-up: first-call allocations
            for _ in range(50):
                httpx.get(base + path).raise_for_status()
        rss_before = rss_mb(process.pid)
        results: dict[str, dict] = {}
        reference = None
        for name, (path, images) in TARGETS.items():
            if use_wrk:
                result = run_wrk(base + path, args.connections, args.duration)
            else:
                run = run_httpx(base + path, args.connections, args.duration, args.requests)
                result = asyncio.run(run)
            results[name] = summarize(result, images, reference)
            reference = reference or results[name]["served_per_s"]
        rss_after = rss_mb(process.pid)
    finally:
        stop_server(process)
    return {
        "env": config,
        "cold_start_s": {"best": round(min(cold_starts), 3), "all": cold_starts},
        "rss_mb": {"before": round(rss_before, 1), "after": round(rss_after, 1)},
        "results": results,
    }


def table(report: dict) -> str:
    """The README's Markdown table."""
    lines = [
        "| server | target | served req/s | × healthz | images/s | refused | p50 ms | p99 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for config, run in report["configs"].items():
        for target, r in run["results"].items():
            ratio = f"{r['vs_healthz']:.2f}" if "vs_healthz" in r else "1"
            lines.append(
                f"| {config} | {target} | {r['served_per_s']:,.0f} | {ratio} "
                f"| {r['images_per_s']:,} | {r['refused_pct']:.1f}% "
                f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "generator.onnx")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per target")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="server processes")
    parser.add_argument("--requests", type=int, default=50_000, help="cap (httpx fallback)")
    parser.add_argument("--client", choices=["auto", "wrk", "httpx"], default="auto")
    parser.add_argument("--cold-starts", type=int, default=3, help="best of this many")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args()
    if not args.model.is_file():
        sys.exit(f"no model at {args.model}: run `dvc repro export` or pass --model")
    use_wrk = args.client == "wrk" or (args.client == "auto" and bool(shutil.which("wrk")))

    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "server.log"
        configs = {}
        for name in args.configs:
            configs[name] = measure(args, CONFIGS[name], log, use_wrk)
            print(name, json.dumps(configs[name]["results"]), file=sys.stderr, flush=True)
    report = {
        "model": str(args.model),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),  # the machine may be shared: say how busy it was
        "connections": args.connections,
        "workers": args.workers,
        "duration_s": args.duration,
        "configs": configs,
    }
    text = json.dumps(report, indent=2)
    print(text)
    print(table(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
