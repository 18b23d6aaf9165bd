"""What this machine's CPU offers training: the cores this process may use, and whether it
multiplies bfloat16 in hardware. No TensorFlow here: the benchmarks' parent process asks
too, and importing TensorFlow costs 3-15 s."""

from __future__ import annotations

import os
import re
from pathlib import Path


def cores() -> int:
    """The cores this process may run on (its affinity mask: a container's or `taskset`'s
    limit, where ``os.cpu_count()`` would report the whole machine)."""
    return len(os.sched_getaffinity(0))


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16, as Linux lists
    its flags). There oneDNN ran the default net's GEMMs 2-2.6x faster in bfloat16 than in
    float32; elsewhere bfloat16 is emulated, slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return False
    return re.search(r"\b(amx_bf16|avx512_bf16)\b", flags) is not None
