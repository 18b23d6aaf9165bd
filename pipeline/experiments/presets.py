"""Presets: named recipes as flat ``{"train.lr_g": 0.001, ...}`` overrides of params.yaml,
exactly what ``dvc exp run -S`` takes, so a preset run is an ordinary DVC experiment.

    python -m pipeline.experiments.presets exp-args seed001 [KEY=VALUE ...]   # used by `make exp`

No stage imports this module: a preset reaches a stage only as the params it set.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.params import ParamsError, load_params

PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets"


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset is a flat ``{"train.lr_g": 0.001, ...}`` mapping of overrides: exactly what
    ``dvc exp run -S`` takes, so a preset run is an ordinary DVC experiment. A variant names
    its ``base`` preset and lists only what it changes, so the difference is all it says."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ParamsError(f"preset: got {name!r}; allowed: {preset_names()}")
    if name in _seen:
        raise ParamsError(f"base: preset {name!r} is its own base ({' -> '.join(_seen)})")
    with path.open() as handle:
        overrides = yaml.safe_load(handle) or {}
    base = overrides.pop("base", None)
    return {**load_preset(base, (*_seen, name)), **overrides} if base else overrides


def parse_assignments(pairs: list[str]) -> dict[str, Any]:
    """``["train.epochs=300", ...]`` -> ``{"train.epochs": 300}``: values read as YAML, as
    DVC's ``-S`` reads them."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ParamsError(f"override: got {pair!r}; expected KEY=VALUE, e.g. train.epochs=300")
        overrides[key] = yaml.safe_load(value)
    return overrides


def exp_run_args(
    name: str, base: str | Path = "params.yaml", extra: dict[str, Any] | None = None
) -> list[str]:
    """The ``dvc exp run`` arguments (``-S key=value`` each) that run preset ``name`` with
    ``extra`` overrides on top, checked against the schema first. Values are written as
    JSON, which DVC's (Hydra) override parser reads back as the same numbers, lists,
    strings and nulls."""
    overrides = {**load_preset(name), **(extra or {})}
    load_params(base, overrides, f"preset {name}")
    args: list[str] = []
    for key, value in overrides.items():
        plain = isinstance(value, str) and yaml.safe_load(value) == value
        args += ["-S", f"{key}={value if plain else json.dumps(value)}"]
    return args


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] != "exp-args":
        sys.exit(
            "usage: python -m pipeline.experiments.presets exp-args PRESET [KEY=VALUE ...]  "
            f"(presets: {preset_names()})"
        )
    try:
        print(shlex.join(exp_run_args(argv[1], extra=parse_assignments(argv[2:]))))
    except ParamsError as exc:
        sys.exit(str(exc))


if __name__ == "__main__":
    main(sys.argv[1:])
