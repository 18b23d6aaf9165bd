"""Load benchmark of the generation service on loopback, with and without dynamic batching.

    .venv/bin/python bench/serve_load.py --model models/generator.onnx [--duration 10]

Starts ``python -m pipeline.serve`` as users do (access log on; ``--workers``) once per
server configuration (:data:`CONFIGS`: the defaults, i.e. batching on; batching off; and
the limit before batching existed), measures the cold start to ready (spawn -> first 200
from /readyz, best of 3), then runs every (configuration, target) pair as a bounded load
(fixed duration, 32 connections), interleaved over ``--rounds`` rounds and keeping each
pair's best round, with ``wrk`` (Debian: apt-get install wrk) or, without it, an
asyncio/httpx client with a fixed request count. ``/healthz`` is the reference run beside
the others on the same server: the HTTP stack without the model, so the ratio says what
generating costs on top. Reports req/s, the share refused (429/503: the service's
limits), served images/s, p50/p99 latency and the servers' RSS before and after, as JSON
(``--out`` to keep it) and as a Markdown table.
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


def cold_start(args: argparse.Namespace, config: dict[str, str], log: Path) -> list[float]:
    seconds = []
    for _ in range(args.cold_starts):
        process, spent = start_server(args.model, free_port(), log, args.workers, config)
        seconds.append(round(spent, 3))
        stop_server(process)
    return seconds


def load(args: argparse.Namespace, url: str, use_wrk: bool) -> dict:
    if use_wrk:
        return run_wrk(url, args.connections, args.duration)
    return asyncio.run(run_httpx(url, args.connections, args.duration, args.requests))


def measure(args: argparse.Namespace, log: Path, use_wrk: bool) -> dict:
    """Every configuration's server runs at once (an idle one costs nothing), and the runs
    interleave: round by round, target by target, one configuration after the other, so
    that on a shared machine each sees much the same background load. Each cell keeps its
    best round (the least disturbed), its ratio to the same configuration's best healthz."""
    cold = {name: cold_start(args, CONFIGS[name], log) for name in args.configs}
    servers = {}
    try:
        for name in args.configs:
            port = free_port()
            process, _ = start_server(args.model, port, log, args.workers, CONFIGS[name])
            servers[name] = (process, f"http://127.0.0.1:{port}")
        for _, base in servers.values():
            for path, _ in TARGETS.values():  # warm-up: first-call allocations
                for _ in range(50):
                    httpx.get(base + path).raise_for_status()
        rss_before = {name: rss_mb(process.pid) for name, (process, _) in servers.items()}
        rounds: dict[str, dict[str, list[dict]]] = {n: {t: [] for t in TARGETS} for n in servers}
        for round_ in range(args.rounds):
            for target, (path, _) in TARGETS.items():
                for name, (_, base) in servers.items():
                    result = load(args, base + path, use_wrk)
                    result["round"] = round_
                    rounds[name][target].append(result)
                    print(name, target, json.dumps(result), file=sys.stderr, flush=True)
        rss_after = {name: rss_mb(process.pid) for name, (process, _) in servers.items()}
    finally:
        for process, _ in servers.values():
            stop_server(process)
    report = {}
    for name in servers:
        results: dict[str, dict] = {}
        reference = None
        for target, (_, images) in TARGETS.items():
            runs = [summarize(dict(run), images, None) for run in rounds[name][target]]
            best = max(runs, key=lambda run: run["served_per_s"])
            results[target] = summarize(best, images, reference)
            results[target]["all_rounds_served_per_s"] = [run["served_per_s"] for run in runs]
            reference = reference or best["served_per_s"]
        report[name] = {
            "env": CONFIGS[name],
            "cold_start_s": {"best": min(cold[name]), "all": cold[name]},
            "rss_mb": {"before": round(rss_before[name], 1), "after": round(rss_after[name], 1)},
            "results": results,
        }
    return report


def table(report: dict) -> str:
    """The Markdown table of docs/benchmarks.md."""
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
    parser.add_argument("--rounds", type=int, default=3, help="best of this many, interleaved")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args()
    if not args.model.is_file():
        sys.exit(f"no model at {args.model}: run `dvc repro export` or pass --model")
    use_wrk = args.client == "wrk" or (args.client == "auto" and bool(shutil.which("wrk")))

    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "server.log"
        configs = measure(args, log, use_wrk)
    report = {
        "model": str(args.model),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),  # the machine may be shared: say how busy it was
        "connections": args.connections,
        "workers": args.workers,
        "duration_s": args.duration,
        "rounds": args.rounds,
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
