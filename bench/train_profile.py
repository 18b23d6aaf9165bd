"""Where a training step's time goes: TensorFlow's profiler over the trainer's own steps.

    python -m bench.train_profile [--preset default] [--steps 50] [--data data] [--top 12]

Builds the preset's GAN as ``pipeline.train`` does (same threads, op determinism, strategy
and input stream), runs a warm-up block, times ``--steps`` steps twice, then profiles
``--steps`` more and sums the CPU time of every TensorFlow op (kernel time, all threads, so
it can exceed the wall time on several cores). Prints per step: the wall time, the ops'
CPU time by op type, and the costliest op instances. Kernel names tell the backend:
``_Mkl*`` ops run oneDNN, plain ``MatMul`` Eigen.
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


def op_times(logdir: Path) -> tuple[collections.Counter, collections.Counter]:
    """CPU picoseconds by op type and by op instance ("name:Type" events of the host plane)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    by_type: collections.Counter = collections.Counter()
    by_name: collections.Counter = collections.Counter()
    for path in logdir.rglob("*.xplane.pb"):
        space = xplane_pb2.XSpace.FromString(path.read_bytes())
        for plane in space.planes:
            if plane.name != "/host:CPU":
                continue
            for line in plane.lines:
                for event in line.events:
                    name = plane.event_metadata[event.metadata_id].name
                    op_type = name.rsplit(":", 1)[-1].strip() if ":" in name else ""
                    if op_type and not op_type.startswith("__") and op_type not in WRAPPERS:
                        by_type[op_type] += event.duration_ps
                        by_name[name] += event.duration_ps
    return by_type, by_name


def profile(preset: str, data: Path, steps: int) -> dict[str, Any]:
    import tensorflow as tf

    from bench.train_throughput import load
    from pipeline.distribute import input_batches, set_up
    from pipeline.gan import GAN
    from pipeline.mnist import load_split

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
            by_type, by_name = op_times(Path(folder))
    per_step = 1e6 * steps  # picoseconds over the profiled steps -> microseconds per step
    return {
        "preset": preset,
        "batch_size": params.train.batch_size,
        "wall_us_per_step": [round(w * 1e6) for w in walls],
        "images_per_s": [round(params.train.batch_size / w) for w in walls],
        "op_us_per_step": round(sum(by_type.values()) / per_step),
        "by_type": {k: round(v / per_step) for k, v in by_type.most_common()},
        "by_op": {k: round(v / per_step) for k, v in by_name.most_common()},
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
    for title, table in (("op type", result["by_type"]), ("op", result["by_op"])):
        print(f"\n| {title} | CPU µs a step |\n|---|---:|")
        for name, micros in list(table.items())[: args.top]:
            print(f"| `{name.removeprefix('while/body/_1/')}` | {micros:,} |")


if __name__ == "__main__":
    main()
