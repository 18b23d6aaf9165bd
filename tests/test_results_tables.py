"""tools/results_tables.py never puts FIDs from different yardsticks in one column silently."""

from __future__ import annotations

from tools.results_tables import PER_MACHINE, UNKNOWN, Run, glance_table, trained_on

FLOOR = {"fid": 0.5, "classifier_score": 9.7, "precision": 0.9, "recall": 0.9}


def _run(name: str, yardstick: str, fid: float, trained_on: str = "bfloat16 on amx") -> Run:
    metrics = {"fid": fid, "classifier_score": 9.5, "precision": 0.9, "recall": 0.8}
    metrics |= {"min_class_share": 0.09} | {f"real.{k}": v for k, v in FLOOR.items()}
    metrics["real.min_class_share"] = 0.089
    params = {"train.epochs": "30", "train.steps": "None"}
    train = {"train_seconds": 60.0}
    return Run(name, name, "make exp", "0" * 32, params, metrics, train, {}, yardstick, trained_on)


def test_one_yardstick_one_floor_no_note() -> None:
    lines = glance_table([_run("a", "4011a5c75d0f", 3.7), _run("b", "4011a5c75d0f", 9.1)])
    text = "\n".join(lines)
    assert text.count("real data (floor)") == 1
    assert "Mixed yardsticks" not in text
    assert all("`4011a5c75d0f`" in line for line in lines[2:])  # every row names it


def test_mixed_yardsticks_are_said_and_floored_apart() -> None:
    runs = [_run("a", "4011a5c75d0f", 3.7), _run("old", PER_MACHINE, 4.5)]
    text = "\n".join(glance_table(runs))
    assert text.count("real data (floor)") == 2
    assert "Mixed yardsticks" in text and f"`{PER_MACHINE}`" in text


def test_rows_say_where_they_trained_and_a_mix_is_said() -> None:
    same = "\n".join(glance_table([_run("a", "4011a5c75d0f", 1.5), _run("b", "4011a5c75d0f", 1.6)]))
    assert "| bfloat16 on amx |" in same and "Mixed machines" not in same
    runs = [_run("a", "4011a5c75d0f", 1.5), _run("b", "4011a5c75d0f", 1.5, "float32 on avx2")]
    mixed = "\n".join(glance_table(runs))
    assert "| float32 on avx2 |" in mixed
    assert "Mixed machines" in mixed and "bfloat16 on amx, float32 on avx2" in mixed
    assert trained_on({}) == UNKNOWN
    assert trained_on({"compute_dtype": "float32", "cpu_isa": "avx2"}) == "float32 on avx2"
