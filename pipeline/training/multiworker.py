"""Start a multi-worker training on this machine from one command:

    python -m pipeline.training.multiworker --workers 2                  # dvc.yaml's train flags
    python -m pipeline.training.multiworker --workers 2 -- --params p.yaml --data data ...  # others

Each worker is the real train stage (``python -m stages.train``) with its own ``$TF_CONFIG``:
a cluster of ``--workers`` loopback addresses (ports picked free) and its task index. The
params must say ``train.strategy: multi_worker``; worker 0 is the chief and the only one
that writes the stage's outputs and the MLflow run (see ``pipeline.training.train``).
Workers' output lines come out prefixed ``[worker i]``. If one fails, the others are stopped
(SIGTERM, then SIGKILL after ``--grace`` seconds: a worker waiting on a dead peer never
reaches Python) and the launcher exits with the failed worker's code. No TensorFlow here:
the workers import it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import yaml

from pipeline.core import stage
from pipeline.core.errors import UserError
from pipeline.core.params import load_params

POLL_S = 0.1
FINISH_S = 120.0  # all workers end at the same step: one still running this long after is stuck
TRAIN_MODULE = "stages.train"


def dvc_train_args(dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """The flags dvc.yaml's train stage passes to ``python -m stages.train``."""
    words = shlex.split(yaml.safe_load(dvc_yaml.read_text())["stages"]["train"]["cmd"])
    if words[1:3] != ["-m", TRAIN_MODULE]:
        raise UserError(f"{dvc_yaml}: train cmd must start 'python -m {TRAIN_MODULE}'")
    return words[3:]


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (held open together, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tf_config(ports: list[int], index: int) -> str:
    """Worker ``index``'s $TF_CONFIG on loopback."""
    return cluster_config([f"127.0.0.1:{port}" for port in ports], index)


def cluster_config(addresses: list[str], index: int) -> str:
    """Worker ``index``'s $TF_CONFIG for workers at ``addresses`` (HOST:PORT each, one per
    machine or process); worker 0 is the chief (no separate "chief" task)."""
    cluster = {"worker": addresses}
    return json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})


def check_params(args: list[str], workers: int) -> None:
    """One clear line before any worker starts (the workers would check later, in parallel)."""
    if "--params" not in args:
        raise UserError("--params: missing from the train stage's flags")
    params = load_params(Path(args[args.index("--params") + 1]))
    if params.train.strategy != "multi_worker":
        raise UserError(
            f"train.strategy: got {params.train.strategy!r}; set 'multi_worker' to train "
            "over several workers (each would otherwise train alone and write the same files)"
        )
    if params.train.batch_size % workers:
        raise UserError(
            f"train.batch_size: got {params.train.batch_size}; must be a multiple of the "
            f"{workers} workers (it is the global batch, split between them)"
        )


def _relay(index: int, stream: IO[str]) -> None:
    for line in stream:
        print(f"[worker {index}] {line}", end="", flush=True)


def _stop(procs: list[subprocess.Popen[str]], grace_s: float) -> None:
    """SIGTERM (a worker between blocks checkpoints and stops), then SIGKILL after grace."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def launch(workers: int, args: list[str], grace_s: float = 10.0) -> int:
    """Run ``workers`` train stages as one cluster; their exit code (the first failure's)."""
    ports = free_ports(workers)
    procs: list[subprocess.Popen[str]] = []
    relays: list[threading.Thread] = []
    try:
        for index in range(workers):
            env = {**os.environ, "TF_CONFIG": tf_config(ports, index)}
            proc = subprocess.Popen(
                [sys.executable, "-m", TRAIN_MODULE, *args], env=env, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )  # fmt: skip
            procs.append(proc)
            print(f"[launcher] worker {index}: pid {proc.pid}, TF_CONFIG {env['TF_CONFIG']}")
            assert proc.stdout is not None
            relays.append(threading.Thread(target=_relay, args=(index, proc.stdout)))
            relays[-1].start()
        first_done: float | None = None
        while True:
            codes = [proc.poll() for proc in procs]
            failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                index, code = failed[0]
                print(f"[launcher] worker {index} exited with {code}: stopping the others")
                _stop(procs, grace_s)
                return code if code > 0 else 128 - code  # killed by signal n: 128 + n
            if all(code == 0 for code in codes):
                return 0
            if first_done is None and 0 in codes:
                first_done = time.monotonic()
            if first_done is not None and time.monotonic() - first_done > FINISH_S:
                print("[launcher] a worker finished but another never did: stopping it")
                _stop(procs, grace_s)
                return 1
            time.sleep(POLL_S)
    finally:
        _stop(procs, grace_s)  # no-op when all have exited; else Ctrl-C or an error here
        for relay in relays:
            relay.join(timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="workers on 127.0.0.1 (>= 1)")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds from SIGTERM to KILL")
    parser.add_argument("train_args", nargs="*", help="after --: the train stage's flags")
    args = parser.parse_args()
    if args.workers < 1:
        raise UserError(f"--workers: got {args.workers}; must be at least 1")
    train_args = args.train_args or dvc_train_args()
    check_params(train_args, args.workers)
    # SIGTERM unwinds like Ctrl-C, so the workers are stopped too, not orphaned.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    sys.exit(launch(args.workers, train_args, args.grace))


if __name__ == "__main__":
    stage.run(main)
