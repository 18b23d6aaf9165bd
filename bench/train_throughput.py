"""Training throughput against the plain per-batch loop and the machine's roofline, measured
so that a noisy machine cannot flip the verdict.

    python -m bench.train_throughput [--nets seed001,default] [--rounds 5] [--epochs 2]
                                     [--images 30000] [--data ../shared/mnist] [--xla]

Variants, each in a fresh process (TensorFlow fixes its thread pools at start-up):

- **plain**: the TensorFlow DCGAN tutorial's loop: a ``tf.function`` step called from Python
  per batch, Keras' Adam and cross-entropy, TensorFlow's default threads, no op determinism.
  The reference.
- **trainer as users run it**: ``pipeline.training.train.train`` as ``dvc repro`` runs it: the
  preset's params, checkpoints, sample grids and MLflow on (a temp SQLite store); the rate
  is the one its own history records per epoch. params.yaml's defaults: each batch as two
  slices side by side (``train.shards: 2``), bfloat16 where the CPU has it in hardware.
- **trainer, float32, one shard**: the defaults before; **float32, train.shards=2**: the
  slices alone; **bfloat16, one shard** (only on a CPU with native bfloat16, AMX or
  AVX512-BF16): bfloat16 alone. A variant computing in bfloat16 is held to bfloat16's
  roofline.
- **trainer + XLA** (``--xla``): ``train.jit_compile=true``.

``--gpu-check`` (``bench/gpu_check.sh``) instead runs, once each on a GPU, the plain loop and
the trainer with XLA and mixed precision on and off, and adds the peak GPU memory.

Protocol: ``--rounds`` rounds; each runs every variant once, in an order rotated per round;
each run times ``--epochs`` epochs after one warm-up epoch. Per variant: the median and the
best epoch over all rounds, each against the plain loop's median and best and as a share of
the roofline (below) of the dtype the variant computes in. CPU busy is the
process' CPU time per wall second during the timed epochs, out of all cores (median over
the rounds); vCPUs busy is each vCPU's busy share over the same time, busiest first (the
whole machine's: run it on an idle one), so a process packed onto one vCPU shows as "99/3%"
and one that leaves both half idle as "55/50%"; steal is the largest share of the machine's
CPU time the hypervisor gave to other guests during one run's timed epochs (a shared VM's
noise, which no code controls).

Roofline: each dense layer's GEMM is timed alone at the net's batch with TensorFlow's matmul,
and weighted by the GEMMs of that layer one training iteration runs (forward, weight and
input gradients of the D and the G step). Timed on all cores, and as one stream on one
thread (times the cores: one GEMM stream per core, as if perfectly parallel); the faster is
the roofline. One stream means one intra-op *and* one inter-op thread: with more inter-op
threads, TensorFlow runs the timing loop's independent matmuls side by side on every core,
and the "one core" figure, then multiplied by the cores, counted each core twice (the
roofline read about 1.9x the machine's; the worker now reports the cores its timing kept busy).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.core.cpu import cores, native_bfloat16

REPO_ROOT = Path(__file__).resolve().parent.parent
CORES = cores()
# name -> the trainer's overrides of params.yaml (None: the plain loop). params.yaml's
# defaults are two shards and bfloat16 where the CPU has it; the rest take one thing away.
FLOAT32 = {"train.mixed_precision": False}
VARIANTS: dict[str, dict[str, Any] | None] = {
    "plain per-batch loop (reference)": None,
    "trainer, float32, one shard (the default until 2026-12-01)": {**FLOAT32, "train.shards": 1},
    "trainer, float32, train.shards=2": {**FLOAT32, "train.shards": 2},
    "trainer as users run it (params.yaml)": {},
}
XLA = ("trainer + XLA (train.jit_compile=true)", {"train.jit_compile": True})
# Only on a CPU with native bfloat16 (pipeline.core.cpu.native_bfloat16), where the default
# computes in it: its roofline is bfloat16's, measured the same way.
BF16 = ("trainer, bfloat16, one shard", {"train.mixed_precision": True, "train.shards": 1})


def worker_spec(spec: dict[str, Any] | None) -> dict[str, Any]:
    """What a variant's worker is told: the plain loop (``None``) or the trainer's overrides,
    which may be empty (``{}``: params.yaml itself; until 2026-12-02 an ``or`` here ran the
    plain loop in the "as users run it" row)."""
    return {"plain": True} if spec is None else spec


def compute_dtype(params: Any) -> str:
    """What the trainer computes in on this CPU (pipeline.training.distribute.configure_devices)."""
    return "bfloat16" if params.train.mixed_precision and native_bfloat16() else "float32"


def load(net: str, overrides: dict[str, Any]) -> Any:
    from pipeline.core.params import load_params
    from pipeline.experiments.presets import load_preset

    return load_params(REPO_ROOT / "params.yaml", {**load_preset(net), **overrides})


class CpuBusy:
    """Over the timed intervals only: this process' CPU time per wall second out of all
    cores; each vCPU's busy share (the whole machine's, from /proc/stat: on an idle machine,
    ours), which tells a process spread over both vCPUs from one packed onto one; and the
    share of the machine's CPU time the hypervisor gave to other guests (steal): what makes a
    shared VM's epochs slow for no reason of ours. Also this process' minor page faults per
    second: memory handed back to the kernel and touched again costs a fault per page (and,
    where the VM reports free pages to its host, a host fault too)."""

    def __init__(self) -> None:
        self.cpu = self.wall = 0.0
        self.faults = 0
        self.ticks: list[list[int]] = []  # per row of /proc/stat ("cpu", "cpu0", ...): deltas

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        # process_time: nanoseconds of all threads' CPU (os.times counts 10 ms ticks, which
        # reads a short epoch as 0 or 2x busy)
        cpu, wall, ticks = time.process_time(), time.perf_counter(), _cpu_ticks()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        yield
        self.faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        self.cpu += time.process_time() - cpu
        self.wall += time.perf_counter() - wall
        delta = _combine(_cpu_ticks(), ticks, -1)
        self.ticks = _combine(self.ticks, delta, 1) if self.ticks else delta

    @property
    def shares(self) -> dict[str, Any]:
        machine, *vcpus = self.ticks or [[0] * (STEAL + 1)]
        busy = [1 - (row[IDLE] + row[IOWAIT]) / max(sum(row), 1) for row in vcpus]
        return {
            "cpu": self.cpu / self.wall / CORES if self.wall else 0.0,
            "steal": machine[STEAL] / max(sum(machine), 1),
            "vcpus": sorted(busy, reverse=True),
            "faults_per_s": self.faults / self.wall if self.wall else 0.0,
        }


IDLE, IOWAIT, STEAL = 3, 4, 7  # columns of /proc/stat's "cpu" lines


def _combine(a: list[list[int]], b: list[list[int]], sign: int) -> list[list[int]]:
    return [[x + sign * y for x, y in zip(p, q, strict=True)] for p, q in zip(a, b, strict=True)]


def _cpu_ticks() -> list[list[int]]:
    """/proc/stat's "cpu" line (the machine) and one "cpuN" line per vCPU, in ticks."""
    with Path("/proc/stat").open() as stat:
        rows = [line.split() for line in stat if line.startswith("cpu")]
    return [[int(value) for value in row[1:]] for row in rows]


def plain_rates(params: Any, data: Path, epochs: int, busy: CpuBusy) -> list[float]:
    """The tutorial's structure, on the preset's nets: Python iterates the batches."""
    import keras
    import tensorflow as tf

    from pipeline.core.images import from_uint8
    from pipeline.data.mnist import load_split
    from pipeline.training.models import build_discriminator, build_generator

    model, train = params.model, params.train
    images, labels = load_split(data, "train")
    images, labels = images[: params.data.limit], labels[: params.data.limit].astype("int32")
    generator, discriminator = build_generator(model), build_discriminator(model)
    g_opt = keras.optimizers.Adam(train.lr_g, beta_1=train.beta1, beta_2=train.beta2)
    d_opt = keras.optimizers.Adam(train.lr_d, beta_1=train.beta1, beta_2=train.beta2)
    bce = keras.losses.BinaryCrossentropy(from_logits=True)
    smooth = 1.0 - params.loss.label_smoothing
    dataset = (
        tf.data.Dataset.from_tensor_slices((from_uint8(images, model.output), labels))
        .shuffle(len(images), seed=params.seed)
        .batch(train.batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )

    def inputs(x: tf.Tensor, y: tf.Tensor) -> Any:
        return [x, y] if model.conditional else x

    @tf.function
    def train_step(real: tf.Tensor, label: tf.Tensor) -> None:
        shape = [train.batch_size, model.latent_dim]
        uniform = model.noise == "uniform"
        noise = tf.random.uniform(shape, -1.0, 1.0) if uniform else tf.random.normal(shape)
        with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
            fake = generator(inputs(noise, label), training=True)
            real_out = discriminator(inputs(real, label), training=True)
            fake_out = discriminator(inputs(fake, label), training=True)
            g_loss = bce(tf.ones_like(fake_out), fake_out)
            d_loss = bce(smooth * tf.ones_like(real_out), real_out)
            d_loss += bce(tf.zeros_like(fake_out), fake_out)
        g_vars, d_vars = generator.trainable_variables, discriminator.trainable_variables
        g_opt.apply(g_tape.gradient(g_loss, g_vars), g_vars)
        d_opt.apply(d_tape.gradient(d_loss, d_vars), d_vars)

    rates = []
    for epoch in range(1 + epochs):  # the first pays for tracing
        began, count = time.perf_counter(), 0
        with busy.timed() if epoch else contextlib.nullcontext():
            for real, label in dataset:
                train_step(real, label)
                count += train.batch_size
        rates.append(count / (time.perf_counter() - began))
    return rates[1:]


def trainer_rates(params: Any, data: Path, epochs: int, busy: CpuBusy) -> list[float]:
    from pipeline.tracking.runs import resolve_store
    from pipeline.training.gan import GAN
    from pipeline.training.train import Outputs, train

    block, calls = GAN.train_block, [0]

    def timed_block(gan: GAN, *args: Any) -> Any:  # CPU busy over the blocks after the first
        calls[0] += 1
        with busy.timed() if calls[0] > 1 else contextlib.nullcontext():
            return block(gan, *args)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = resolve_store({}, cwd=root)  # a throwaway store beside the outputs
        out = Outputs(
            generator=root / "generator.keras", discriminator=root / "discriminator.keras",
            checkpoints=root / "checkpoints", run_file=root / "run.json",
            samples=root / "samples", history=root / "history.csv", metrics=root / "metrics.json",
        )  # fmt: skip
        out.checkpoints.mkdir()
        GAN.train_block = timed_block  # type: ignore[method-assign]  # timed; put back below
        try:
            train(params, data, out, store)
        finally:
            GAN.train_block = block  # type: ignore[method-assign]
        with out.history.open() as handle:
            rows = list(csv.DictReader(handle))
        return [float(row["images_per_s"]) for row in rows[1:]]  # after the warm-up epoch


def roofline(net: str, threads: int, dtype: str) -> dict[str, float]:
    """Seconds of GEMM per training image at the measured matmul rate of each layer in
    ``dtype`` on ``threads`` threads (MLP nets: the only ones whose GEMMs this counts), the
    FLOPs they stand for, and the most cores one GEMM's timing kept busy."""
    import keras
    import tensorflow as tf

    from pipeline.training.models import build_discriminator, build_generator

    # Both pools: the loop's matmuls are independent, and with two inter-op threads two of
    # them run at once, one per core, however few threads each op has. A fresh process
    # (measure): pools are fixed once TensorFlow starts.
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    params = load(net, {})
    batch, seconds, flops, busy = params.train.batch_size, 0.0, 0.0, 0.0
    for build, first_count, other_count in ((build_generator, 3, 4), (build_discriminator, 6, 8)):
        layers = build(params.model).layers
        kernels = [layer.kernel for layer in layers if isinstance(layer, keras.layers.Dense)]
        for index, kernel in enumerate(kernels):
            count = first_count if index == 0 else other_count
            gemm, cores_busy = gemm_seconds(batch, *kernel.shape, dtype)
            seconds += count * gemm / batch
            flops += count * 2 * kernel.shape[0] * kernel.shape[1]
            busy = max(busy, cores_busy)
    peak = 2 * PEAK_SIDE**3 / gemm_seconds(PEAK_SIDE, PEAK_SIDE, PEAK_SIDE, dtype, repeat=20)[0]
    return {"seconds_per_image": seconds, "flops_per_image": flops, "cores_busy": busy,
            "peak_flops": peak}  # fmt: skip


PEAK_SIDE = 1024  # a GEMM large enough to run near the cores' peak: what no roofline may pass


def gemm_seconds(m: int, k: int, n: int, dtype: str, repeat: int = 200) -> tuple[float, float]:
    """The best of five timings of one ``[m, k] x [k, n]`` matmul, and the cores it kept busy
    (CPU time per wall second of all five)."""
    import tensorflow as tf

    a, b = (tf.cast(tf.random.normal(shape), dtype) for shape in ([m, k], [k, n]))

    @tf.function
    def many() -> tf.Tensor:
        total = tf.zeros([m, n], dtype)
        for _ in tf.range(repeat):
            total += tf.matmul(a, b)
        return total

    many().numpy()
    best, cpu, wall = float("inf"), time.process_time(), time.perf_counter()
    for _ in range(5):
        began = time.perf_counter()
        many().numpy()
        best = min(best, (time.perf_counter() - began) / repeat)
    return best, (time.process_time() - cpu) / (time.perf_counter() - wall)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement, in this process."""
    if args.worker == "roofline":
        return roofline(args.net, args.threads, args.dtype)
    if args.worker == "gpu":
        return {"runs": gpu_runs(args)}
    overrides = json.loads(args.worker)
    plain = overrides.pop("plain", False)
    overrides.update({"data.limit": args.images, "train.epochs": 1 + args.epochs})
    params = load(args.net, overrides)
    busy = CpuBusy()
    rates = (plain_rates if plain else trainer_rates)(params, args.data, args.epochs, busy)
    return {"rates": rates, **busy.shares}


ONE_SHARD = {"train.shards": 1}  # a GPU computes a whole batch at once
GPU_VARIANTS: dict[str, dict[str, Any] | None] = {  # --gpu-check: one process per net
    "plain per-batch loop (reference)": None,
    "trainer, float32": {**ONE_SHARD, **FLOAT32},
    "trainer + XLA": {**ONE_SHARD, **FLOAT32, "train.jit_compile": True},
    "trainer + mixed precision": {**ONE_SHARD, "train.mixed_precision": True},
    "trainer + XLA + mixed precision": {
        **ONE_SHARD,
        "train.jit_compile": True,
        "train.mixed_precision": True,
    },
    "trainer as users run it (params.yaml)": {},
}


def gpu_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every GPU variant on one net, one after the other in this process (on a GPU no thread
    pool is fixed at start-up), with the peak GPU memory of each."""
    import tensorflow as tf

    gpu = bool(tf.config.list_logical_devices("GPU"))  # also starts the runtime
    results = []
    for name, overrides in GPU_VARIANTS.items():  # each trainer gives its float policy back
        if gpu:
            tf.config.experimental.reset_memory_stats("GPU:0")
        spec = {"plain": True} if overrides is None else overrides
        result = worker(argparse.Namespace(**{**vars(args), "worker": json.dumps(spec)}))
        peak = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20 if gpu else None
        results.append({"name": name, **result, "peak_mb": peak})
    return results


def gpu_report(args: argparse.Namespace) -> None:
    print(
        "| net | variant | images/s | s/epoch (60k) | peak GPU memory |\n|---|---|---:|---:|---:|"
    )
    for net in args.nets.split(","):
        for row in measure(args, "--net", net, "--worker", "gpu")["runs"]:
            rate = statistics.median(row["rates"])
            peak = "-" if row["peak_mb"] is None else f"{row['peak_mb']:,.0f} MiB"
            print(f"| {net} | {row['name']} | {rate:,.0f} | {60_000 / rate:.2f} | {peak} |")


def measure(args: argparse.Namespace, *worker_args: str) -> dict[str, Any]:
    """Run ``worker`` in a fresh Python process and return what it measured."""
    command = [sys.executable, "-m", "bench.train_throughput", "--data", str(args.data),
               "--images", str(args.images), "--epochs", str(args.epochs),
               *worker_args]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(args: argparse.Namespace, net: str, variants: dict[str, Any]) -> None:
    rates: dict[str, list[float]] = {name: [] for name in variants}
    busy: dict[str, list[float]] = {name: [] for name in variants}
    steal: dict[str, list[float]] = {name: [] for name in variants}
    vcpus: dict[str, list[list[float]]] = {name: [] for name in variants}
    names = list(variants)
    for round_ in range(args.rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            spec = variants[name]
            result = measure(args, "--net", net, "--worker", json.dumps(worker_spec(spec)))
            rates[name] += result["rates"]
            busy[name].append(result["cpu"])
            steal[name].append(result["steal"])
            vcpus[name].append(result["vcpus"])
            print(f"  {net} round {round_ + 1}: {name}: {[round(r) for r in result['rates']]} "
                  f"img/s, vCPUs busy {_percents(result['vcpus'])}, "
                  f"{result['faults_per_s']:,.0f} page faults/s", file=sys.stderr)  # fmt: skip

    def ceiling(threads: int, dtype: str) -> tuple[float, dict[str, float]]:
        """Images/s if the GEMMs ran at their measured rate, and what the worker measured."""
        gemms = measure(args, "--net", net, "--worker", "roofline", "--threads", str(threads),
                        "--dtype", dtype)  # fmt: skip
        return CORES / threads / gemms["seconds_per_image"], gemms

    params = load(net, {})
    print(f"\n**{net}** net, batch {params.train.batch_size}, {args.images:,} images an epoch, "
          f"{args.rounds} rounds x {args.epochs} epochs per variant.")  # fmt: skip
    roofs = {}
    dtypes = {
        name: compute_dtype(load(net, FLOAT32 if spec is None else spec))
        for name, spec in variants.items()
    }
    for dtype in sorted(set(dtypes.values()), reverse=True):
        (all_cores, whole), (per_core, stream) = ceiling(CORES, dtype), ceiling(1, dtype)
        roofs[dtype] = max(all_cores, per_core)
        print(f"Roofline in {dtype}: {roofs[dtype]:,.0f} images/s "
              f"({roofs[dtype] * stream['flops_per_image'] / 1e9:,.0f} GFLOP/s), the faster of "
              f"TF matmul on all {CORES} cores ({all_cores:,.0f}) and one single-threaded GEMM "
              f"stream per core ({per_core:,.0f}; its timing kept {stream['cores_busy']:.2f} "
              f"cores busy). A {PEAK_SIDE}x{PEAK_SIDE} GEMM: {whole['peak_flops'] / 1e9:,.0f} "
              f"GFLOP/s on all cores, {stream['peak_flops'] / 1e9:,.0f} on one.")  # fmt: skip
    print()
    print("| variant | median img/s | best img/s | x plain (median) | x plain (best) "
          "| roofline (median) | roofline (best) | CPU busy | vCPUs busy | steal |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    base = rates[names[0]]
    for name in names:
        median, best = statistics.median(rates[name]), max(rates[name])
        print(f"| {name} | {median:,.0f} | {best:,.0f} | {median / statistics.median(base):.2f}x "
              f"| {best / max(base):.2f}x | {median / roofs[dtypes[name]]:.0%} "
              f"| {best / roofs[dtypes[name]]:.0%} "
              f"| {statistics.median(busy[name]):.0%} "
              f"| {_percents([statistics.median(c) for c in zip(*vcpus[name], strict=True)])} "
              f"| {max(steal[name]):.0%} |")  # fmt: skip


def _percents(shares: list[float]) -> str:
    """Busy shares, busiest vCPU first: "98/41%" (one vCPU idle half the time)."""
    return "/".join(f"{share:.0%}".rstrip("%") for share in shares) + "%"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nets", default="seed001,default", help="presets whose nets to time")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per run")
    parser.add_argument("--images", type=int, default=30_000, help="images per epoch")
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "data")
    parser.add_argument("--xla", action="store_true", help="also time train.jit_compile=true")
    parser.add_argument(
        "--gpu-check", action="store_true", help="GPU matrix: XLA, mixed precision (one run)"
    )
    parser.add_argument("--net", help=argparse.SUPPRESS)  # the worker's arguments
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.data = args.data.resolve()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.gpu_check:
        gpu_report(args)
        return
    variants = dict(VARIANTS)
    if args.xla:
        variants[XLA[0]] = XLA[1]
    if native_bfloat16():
        variants[BF16[0]] = BF16[1]
    for net in args.nets.split(","):
        report(args, net, variants)


if __name__ == "__main__":
    main()
