"""What this machine's CPU offers training: the cores this process may use, its ISA class,
and whether it multiplies bfloat16 in hardware. No TensorFlow here: the benchmarks' parent
process asks too, and importing TensorFlow costs 3-15 s."""

from __future__ import annotations

import os
import re
from pathlib import Path


def cores() -> int:
    """The cores this process may run on (its affinity mask: a container's or `taskset`'s
    limit, where ``os.cpu_count()`` would report the whole machine)."""
    return len(os.sched_getaffinity(0))


# What oneDNN can use for training's GEMMs, weakest first, each as Linux's /proc/cpuinfo
# flag that marks it. The class a run trained on is recorded beside its numbers: float32
# and bfloat16 runs, and kernels of different ISAs, round differently.
ISA_CLASSES = (
    ("sse4", "sse4_1"),
    ("avx2", "avx2"),
    ("avx512", "avx512f"),
    ("avx512_bf16", "avx512_bf16"),
    ("amx", "amx_bf16"),
)
BFLOAT16_CLASSES = ("avx512_bf16", "amx")  # bfloat16 in hardware; elsewhere it is emulated
# oneDNN's ONEDNN_MAX_CPU_ISA caps (its names, prefix-matched) -> the strongest class left.
ONEDNN_CAPS = (
    ("AVX10_1_512_AMX", "amx"),
    ("AVX512_CORE_AMX", "amx"),
    ("AVX10", "avx512_bf16"),
    ("AVX512_CORE_BF16", "avx512_bf16"),
    ("AVX512_CORE_FP16", "avx512_bf16"),
    ("AVX512", "avx512"),
    ("AVX2", "avx2"),
    ("AVX", "sse4"),
    ("SSE41", "sse4"),
)


def isa_class(flags: str | None = None, cap: str | None = None) -> str:
    """The strongest of :data:`ISA_CLASSES` this CPU has (``flags``: /proc/cpuinfo's text)
    and oneDNN may use (``cap``: ``$ONEDNN_MAX_CPU_ISA``, which restricts it); "unknown"
    off Linux."""
    if flags is None:
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux
            return "unknown"
    have = set(re.findall(r"\w+", flags))
    names = [name for name, flag in ISA_CLASSES if flag in have]
    best = names[-1] if names else "baseline"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "") if cap is None else cap
    limit = next((name for prefix, name in ONEDNN_CAPS if cap.upper().startswith(prefix)), None)
    order = [name for name, _ in ISA_CLASSES]
    if limit is not None and best in order and order.index(limit) < order.index(best):
        return limit
    return best


def native_bfloat16() -> bool:
    """Whether oneDNN multiplies bfloat16 in hardware here (AMX or AVX512-BF16, not capped
    by ``$ONEDNN_MAX_CPU_ISA``). There it ran the default net's GEMMs 2-2.6x faster in
    bfloat16 than in float32; elsewhere bfloat16 is emulated, slower than float32."""
    return isa_class() in BFLOAT16_CLASSES
