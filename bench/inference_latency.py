"""Per-call latency of the exported ONNX generator vs the Keras generator it came from.

    python -m bench.inference_latency [--repeat-s 1.0]

Same process, same weights (the default preset's architecture, freshly initialised: latency
does not depend on what the weights learned), batches of 1, 64 and 1,024. Also the cold
start of the generation CLI vs a bare `import tensorflow`. Prints Markdown tables.
Goal: onnxruntime at batch 1 at least 2x faster than calling the Keras model.

The reference beside the export: the same graph with its [0, 1] scaling moved after the
final reshape, onto [N, 28, 28, 1], as the export wrote it before; onnxruntime broadcasts
over that trailing 1 one element at a time (pipeline/training/export.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import onnx

from pipeline.core.images import cycle_labels
from pipeline.core.params import load_params
from pipeline.inference.generator import Generator
from pipeline.training.export import export_model
from pipeline.training.models import build_generator

BATCHES = (1, 64, 1024)
REPO = Path(__file__).resolve().parent.parent


def per_call_ms(call: Callable[[], object], budget_s: float) -> float:
    """Median wall time of one call, over as many calls as fit in ``budget_s`` (at least 5);
    the median shrugs off the odd call slowed by another process on a shared machine."""
    for _ in range(3):  # warm-up: first calls build kernels and caches
        call()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 5 or time.perf_counter() < deadline:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def cold_start_s(command: list[str], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, cwd=REPO, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def scaled_on_4d(path: Path, out: Path) -> None:
    """``path``'s graph as exported before: the output's scaling on [N, 28, 28, 1]."""
    model = onnx.load(path)
    flatten, add, multiply, reshape = model.graph.node[-4:]
    assert [node.op_type for node in (flatten, add, multiply, reshape)] == [
        "Reshape", "Add", "Mul", "Reshape"
    ]  # fmt: skip
    add.input[list(add.input).index(flatten.output[0])] = flatten.input[0]  # the 4-d image
    multiply.output[0] = reshape.output[0]
    for node in (flatten, reshape):
        model.graph.node.remove(node)
    onnx.checker.check_model(model)
    onnx.save(model, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat-s", type=float, default=1.0, help="time budget per cell")
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    keras.utils.set_random_seed(0)
    model = build_generator(params.model)
    cores = os.cpu_count() or 1

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "generator.onnx"
        export_model(model, params, path)
        one_thread = Generator(path)
        all_threads = Generator(path, threads=cores)
        scaled_on_4d(path, Path(tmp) / "before.onnx")
        before = Generator(Path(tmp) / "before.onnx")

        rows = []
        for n in BATCHES:
            z = one_thread.sample_noise(n, seed=0)
            labels = cycle_labels(n).astype(np.int32)
            inputs = [z, labels] if params.model.conditional else z
            rows.append(
                (
                    n,
                    per_call_ms(lambda z=z, n=n: one_thread.generate(n, z=z), args.repeat_s),
                    per_call_ms(lambda z=z, n=n: all_threads.generate(n, z=z), args.repeat_s),
                    per_call_ms(lambda z=z, n=n: before.generate(n, z=z), args.repeat_s),
                    per_call_ms(lambda i=inputs: model(i, training=False).numpy(), args.repeat_s),
                    per_call_ms(
                        lambda i=inputs, n=n: model.predict(i, batch_size=n, verbose=0),
                        args.repeat_s,
                    ),
                )
            )

        cli = [sys.executable, "-m", "pipeline.inference.generate", "--model", str(path)]
        cli += ["--n", "1", "--seed", "0", "--out", str(Path(tmp) / "one.png")]
        cli_s = cold_start_s(cli)
        tf_s = cold_start_s([sys.executable, "-c", "import tensorflow"])

    arch = f"{params.model.arch} {params.model.g_hidden}, conditional={params.model.conditional}"
    print(f"Generator: default preset ({arch}); {cores} CPU cores; median ms per call.\n")
    print(
        f"| batch | onnxruntime, 1 thread | onnxruntime, {cores} threads "
        "| 1 thread, scaled on [N, 28, 28, 1] (before) | before / now | Keras model(z) "
        "| Keras model.predict | model(z) / ort 1 thread |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, ort_1, ort_all, ort_before, call, predict in rows:
        print(
            f"| {n:,} | {ort_1:.3f} | {ort_all:.3f} | {ort_before:.3f} | {ort_before / ort_1:.1f}x "
            f"| {call:.3f} | {predict:.3f} | {call / ort_1:.1f}x |"
        )
    print("\n| cold start (median of 3) | seconds |\n|---|---:|")
    print(f"| `python -m pipeline.inference.generate --n 1` (whole run) | {cli_s:.2f} |")
    print(f'| `python -c "import tensorflow"` | {tf_s:.2f} |')


if __name__ == "__main__":
    main()
