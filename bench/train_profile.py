"""Where a training step's time goes: TensorFlow's profiler over the trainer's own steps.

    python -m bench.train_profile [--preset default] [--steps 50] [--data data] [--top 12]

Builds the preset's GAN as ``pipeline.training.train`` does (same threads, op determinism, strategy
and input stream), runs a warm-up block, times ``--steps`` steps twice, then profiles
``--steps`` more and sums the CPU time of every TensorFlow op (kernel time, all threads, so
it can exceed the wall time on several cores). Prints per step: the wall time, the ops'
CPU time by op type, the costliest op instances, how much of the time 0, 1, 2... kernels
ran at once, and the ops that ran alone (while one core worked, the other waited: where
the step runs serially). Kernel names tell the backend: ``_Mkl*`` ops run oneDNN, plain
``MatMul`` Eigen.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# Events that wrap others (the function call, the executor): not kernels.
WRAPPERS = ("Process", "Run", "Start", "Root", "DoCompute")


def op_type(name: str) -> str:
    """The op type of a host-plane event named "name:Type" ("" for events without one)."""
    return name.rsplit(":", 1)[-1].strip() if ":" in name else ""


def kernels(logdir: Path) -> list[tuple[int, int, str]]:
    """(start, end, "name:Type") in picoseconds of every op kernel on the host plane."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    events = []
    for path in logdir.rglob("*.xplane.pb"):
        space = xplane_pb2.XSpace.FromString(path.read_bytes())
        for plane in space.planes:
            if plane.name != "/host:CPU":
                continue
            for line in plane.lines:
                for event in line.events:
                    name = plane.event_metadata[event.metadata_id].name
                    kind = op_type(name)
                    kernel = kind and not kind.startswith("__") and kind not in WRAPPERS
                    if kernel and event.duration_ps > 0:
                        start = line.timestamp_ns * 1000 + event.offset_ps
                        events.append((start, start + event.duration_ps, name))
    return events


def overlap(events: list[tuple[int, int, str]]) -> tuple[collections.Counter, collections.Counter]:
    """Picoseconds during which k kernels ran at once (k = 0, 1, 2...), from the first
    kernel's start to the last one's end, and by op instance the time it ran alone."""
    edges = sorted([(start, 1, name) for start, _, name in events]
                   + [(end, -1, name) for _, end, name in events])  # fmt: skip
    at_once: collections.Counter = collections.Counter()
    alone: collections.Counter = collections.Counter()
    running: collections.Counter = collections.Counter()
    last = edges[0][0] if edges else 0
    for time_ps, change, name in edges:
        level = sum(running.values())
        at_once[level] += time_ps - last
        if level == 1:
            alone[next(iter(running))] += time_ps - last
        running[name] += change
        running += collections.Counter()  # drops the ops that ended
        last = time_ps
    return at_once, alone


def profile(preset: str, data: Path, steps: int) -> dict[str, Any]:
    import tensorflow as tf

    from bench.train_throughput import load
    from pipeline.data.mnist import load_split
    from pipeline.training.distribute import input_batches, set_up
    from pipeline.training.gan import GAN

    params = load(preset, {})
    with set_up(params) as strategy:  # restores the process' float policy afterwards
        images, labels = load_split(data, "train")
        gan = GAN(params, strategy, 10 * steps)
        batches = input_batches(params, strategy, images, labels, 0)
        gan.train_block(batches, tf.constant(min(steps, 20)))  # warm-up: tracing, first calls
        walls = []
        for _ in range(2):
            start = time.perf_counter()
            gan.train_block(batches, tf.constant(steps))
            walls.append((time.perf_counter() - start) / steps)
        with tempfile.TemporaryDirectory() as folder:
            tf.profiler.experimental.start(folder)
            gan.train_block(batches, tf.constant(steps))
            tf.profiler.experimental.stop()
            events = kernels(Path(folder))
    by_type: collections.Counter = collections.Counter()
    by_name: collections.Counter = collections.Counter()
    for start, end, name in events:
        by_type[op_type(name)] += end - start
        by_name[name] += end - start
    at_once, alone = overlap(events)
    span = sum(at_once.values())
    per_step = 1e6 * steps  # picoseconds over the profiled steps -> microseconds per step
    return {
        "preset": preset,
        "batch_size": params.train.batch_size,
        "wall_us_per_step": [round(w * 1e6) for w in walls],
        "images_per_s": [round(params.train.batch_size / w) for w in walls],
        "op_us_per_step": round(sum(by_type.values()) / per_step),
        "by_type": {k: round(v / per_step) for k, v in by_type.most_common()},
        "by_op": {k: round(v / per_step) for k, v in by_name.most_common()},
        "kernels_at_once": {k: at_once[k] / span for k in sorted(at_once)},
        "alone_us_per_step": {k: round(v / per_step) for k, v in alone.most_common()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "data")
    parser.add_argument("--top", type=int, default=12, help="rows of each table")
    args = parser.parse_args()
    result = profile(args.preset, args.data, args.steps)
    walls = ", ".join(f"{w:,} µs" for w in result["wall_us_per_step"])
    print(f"{args.preset}, batch {result['batch_size']}: {walls} a step (wall, two timings); "
          f"ops {result['op_us_per_step']:,} µs of CPU a step")  # fmt: skip
    shares = ", ".join(f"{k}: {v:.0%}" for k, v in result["kernels_at_once"].items())
    print(f"kernels running at once, share of the profiled time: {shares}")
    tables = {"op type": result["by_type"], "op": result["by_op"],
              "op, running alone": result["alone_us_per_step"]}  # fmt: skip
    for title, table in tables.items():
        print(f"\n| {title} | CPU µs a step |\n|---|---:|")
        for name, micros in list(table.items())[: args.top]:
            print(f"| `{name.removeprefix('while/body/_1/')}` | {micros:,} |")


if __name__ == "__main__":
    main()
