"""The CPU facts training records beside its numbers: the ISA class, read from Linux's flags
and capped by oneDNN's own switch, and whether bfloat16 runs in hardware."""

from __future__ import annotations

import pytest

from pipeline.core.cpu import isa_class, native_bfloat16

ZEN3 = "fpu sse4_1 sse4_2 avx avx2 fma"
ZEN4 = f"{ZEN3} avx512f avx512bw avx512_bf16"
SAPPHIRE_RAPIDS = f"{ZEN4} amx_tile amx_bf16 amx_int8"


@pytest.mark.parametrize(
    ("flags", "cap", "expected"),
    [
        (ZEN3, "", "avx2"),
        (ZEN4, "", "avx512_bf16"),
        (SAPPHIRE_RAPIDS, "", "amx"),
        ("fpu sse4_1 avx2 avx512f", "", "avx512"),
        ("fpu", "", "baseline"),
        (SAPPHIRE_RAPIDS, "AVX2", "avx2"),  # ONEDNN_MAX_CPU_ISA restricts what oneDNN runs
        (SAPPHIRE_RAPIDS, "avx512_core_bf16", "avx512_bf16"),
        (SAPPHIRE_RAPIDS, "AVX512_CORE", "avx512"),
        (ZEN3, "AVX512_CORE_AMX", "avx2"),  # a cap never adds what the CPU lacks
        (ZEN4, "DEFAULT", "avx512_bf16"),
    ],
)
def test_isa_class(flags: str, cap: str, expected: str) -> None:
    assert isa_class(flags, cap) == expected


def test_a_cap_below_bfloat16_turns_mixed_precision_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Capped at AVX2, oneDNN would emulate bfloat16 (slower than float32): training then
    computes in float32, wherever it runs."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not native_bfloat16()
    assert isa_class() in {"avx2", "sse4", "baseline", "unknown"}
