"""`make compare` and `make sweep` without running anything: the table built from a real
`dvc exp show --json` (captured from the queued two-run sweep of tests/test_tracking.py, with
more runs added by copying them with other params), and the grid a sweep queues."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.core.params import ParamsError
from pipeline.experiments import compare
from pipeline.experiments.sweep import grid, queue_commands, run_name

# `dvc exp show --json` after `python -m pipeline.experiments.sweep smoke seed=1,2` and
# `dvc queue start`.
CAPTURED = Path(__file__).parent / "data" / "exp_show_sweep.json"


@pytest.fixture
def shown() -> list[dict[str, Any]]:
    return json.loads(CAPTURED.read_text())


def _widen(shown: list[dict[str, Any]], params: dict[str, Any]) -> list[dict[str, Any]]:
    """One more experiment: a copy of the first, with ``params`` (dotted keys) changed."""
    ranges = next(base for base in shown if base.get("experiments"))["experiments"]
    extra = copy.deepcopy(ranges[0])
    state = extra["revs"][0]
    state["name"] = "smoke-" + "-".join(f"{k}-{v}" for k, v in params.items())
    tree = state["data"]["params"]["params.yaml"]["data"]
    for key, value in params.items():
        *parents, last = key.split(".")
        node = tree
        for part in parents:
            node = node[part]
        node[last] = value
    ranges.append(extra)
    return shown


def test_the_captured_sweep_shows_the_swept_param_then_the_headline(
    shown: list[dict[str, Any]],
) -> None:
    lines = compare.table(shown, width=120).splitlines()
    assert lines[0].split() == ["Experiment", "seed", *compare.HEADLINE]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.startswith("smoke-")}
    assert set(rows) == {"smoke-seed-1", "smoke-seed-2"}
    assert rows["smoke-seed-1"][1] == "1" and rows["smoke-seed-2"][1] == "2"
    # 3 significant digits, from the metrics DVC read
    assert all(len(value.replace(".", "").lstrip("0")) <= 3 for value in rows["smoke-seed-1"][2:])


def test_many_differing_params_fit_and_the_rest_are_named(shown: list[dict[str, Any]]) -> None:
    for change in ({"train.lr_g": 0.000123456}, {"model.d_dropout": 0.3}, {"loss.kind": "hinge"}):
        shown = _widen(shown, {**change, "train.lr_d": 0.0005, "model.activation": "relu"})
    text = compare.table(shown, width=120)
    assert max(map(len, text.splitlines())) <= 120, text
    assert text.splitlines()[0].split()[-len(compare.HEADLINE) :] == list(compare.HEADLINE)
    narrow = compare.table(shown, width=80)
    assert max(map(len, narrow.splitlines())) <= 80, narrow
    assert "make compare WIDE=1 shows" in narrow
    wide = compare.table(shown, width=None, wide=True)
    header = wide.splitlines()[0].split()
    assert {"lr_g", "d_dropout", "kind", "lr_d", "activation", "seed"} <= set(header)
    assert {"real.fid", "d_loss", "classes_present"} <= set(header)


def test_a_row_without_metrics_is_named_not_shown(shown: list[dict[str, Any]]) -> None:
    lines = compare.table(shown, width=120).splitlines()
    assert lines[-1].startswith("no metrics here"), lines
    assert "!" not in "\n".join(lines[:-1])


def test_a_sweep_is_every_combination_named_after_its_values() -> None:
    assert grid(["train.lr_g=1e-4,4e-4", "seed=1,2"]) == [
        ["train.lr_g=1e-4", "seed=1"],
        ["train.lr_g=1e-4", "seed=2"],
        ["train.lr_g=4e-4", "seed=1"],
        ["train.lr_g=4e-4", "seed=2"],
    ]
    assert run_name("default", ["train.lr_g=1e-4", "seed=1"], {"train.lr_g"}) == (
        "default-lr_g-1e-4"
    )
    commands = queue_commands("smoke", ["seed=1,2", "train.epochs=2"])
    assert [command[5] for command in commands] == ["smoke-seed-1", "smoke-seed-2"]
    assert all(command[:5] == ["dvc", "exp", "run", "--queue", "-n"] for command in commands)
    assert "seed=2" in commands[1] and "train.epochs=2" in commands[1]


def test_a_bad_sweep_is_refused_before_anything_is_queued() -> None:
    with pytest.raises(ParamsError, match=r"train\.lr_g"):
        queue_commands("smoke", ["train.lr_g=1e-4,-1"])
    with pytest.raises(ParamsError, match="expected KEY=V1,V2"):
        queue_commands("smoke", ["seed"])
